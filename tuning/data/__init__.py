"""Training data, in the order it flows: `formats` reads files, `importing` and `documents` turn them (and
documents) into examples, `dedup` keeps each question once, `mutate` and `synthetic` propose variations,
`review` decides them, and `dataset` renders approved examples as training rows."""
