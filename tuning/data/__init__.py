"""Training data, in the order it flows: `formats` reads files (and `quickform` a pair typed in chat),
`importing` and `documents` turn them (and documents) into examples, `dedup` keeps each question once,
`mutate` and `synthetic` (its client in `synthetic_client`, its prompts in `synthetic_prompts`) propose
variations, `review` decides them, `dataset` renders approved examples as training rows, and `writing` writes
examples back out."""
