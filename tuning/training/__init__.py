"""Training, in the order a run goes: `config` says what to train, `run.train` starts it (in this process, or
as `distributed` ranks that talk through `ranks`), `hparams` chooses the values from the data's size, `train`
runs the loop (prepare data → build model and optimizer → resume or start → epochs → results) on the `model`
loaded for training, kept fast by `speed`, saved in `checkpoints`, reported as `progress`."""
