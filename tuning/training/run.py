"""train(): the one entry point of a training run, in this process or as data-parallel ranks."""

from __future__ import annotations

from typing import Callable, Sequence

from tuning.data.dataset import TrainItem
from tuning.errors import TrainingError
from tuning.training.config import TrainConfig, TrainingReport
from tuning.training.progress import TrainProgress
from tuning.training.ranks import Ranks, processes_for


def train(items: Sequence[TrainItem], *, out_dir, config: TrainConfig = TrainConfig(), system_prompt: str = "",
          cache_dir=None, on_progress: Callable[[TrainProgress], None] | None = None,
          should_stop: Callable[[], bool] | None = None, resume: bool = True) -> TrainingReport:
    """Train on the train split, validate every epoch, keep the best epoch; write everything to out_dir.

    With several processes (config.processes, or one per visible GPU) the run is data-parallel:
    tuning.training.distributed starts the ranks and relays their progress; the result is the same files.
    """
    from tuning.training.train import train_rank, training_splits

    if config.accumulate < 1:
        raise TrainingError("accumulate must be at least 1")
    world = processes_for(config)
    if world > 1:
        from tuning.training.distributed import launch

        training_splits(items, config)  # fail here, before starting any process
        return launch(items, out_dir=out_dir, config=config, world_size=world, system_prompt=system_prompt,
                      cache_dir=cache_dir, on_progress=on_progress, should_stop=should_stop, resume=resume)
    return train_rank(items, out_dir=out_dir, config=config, system_prompt=system_prompt, cache_dir=cache_dir,
                      on_progress=on_progress, should_stop=should_stop, resume=resume, ranks=Ranks())
