"""Everything from examples to answers: formats, synthetic data, training, evaluation, inference, jobs."""
