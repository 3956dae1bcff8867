"""Training, in the order a run goes: `hparams` chooses the values from the data's size, `train` runs it
(prepare data, build model and optimizer, resume or start, epochs, results), `speed` keeps its loop fast,
`distributed` runs it data parallel over several processes."""
