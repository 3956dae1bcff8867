"""What a running training shows: TrainProgress (one report, the same for everyone who reads it) and the loss
curve it plots at the end.

The loop (tuning.training.train) passes one to on_progress after each optimizer step and each epoch; the
data-parallel launcher relays them from rank 0; a job stores `to_dict()` in its progress (merged with the
job's own keys: phase, evaluation counts, attempt, node), and the CLI, the Telegram message and the API read
the training part back with `TrainProgress.of_job`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class TrainProgress:
    step: int  # optimizer steps taken (over all epochs)
    total_steps: int
    epoch: int  # the epoch running, or just finished (1-based)
    epochs: int
    loss: float | None = None  # this step's mean loss, or the finished epoch's
    val_loss: float | None = None  # the last validation's
    tokens_per_s: float | None = None
    eta_s: float | None = None
    processes: int = 1  # data-parallel processes
    epoch_done: bool = False  # reported at the end of an epoch (after its validation)
    stopped_early: bool = False
    checkpoint: bool = False  # a checkpoint was written at this step

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainProgress":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def of_job(cls, progress: dict | None) -> "TrainProgress | None":
        """The training part of a job's stored progress; None before its training reported a step."""
        progress = progress or {}
        if not progress.get("total_steps"):
            return None
        return cls.from_dict({"step": 0, "epoch": 0, "epochs": 0, **progress})


def plot_loss_curve(epochs: Sequence[dict], path: Path, *, step_losses: Sequence[tuple[int, float]] = ()) -> None:
    """loss_curve.png: training loss per step and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if step_losses:
        ax.plot([s for s, _ in step_losses], [v for _, v in step_losses], lw=0.8, alpha=0.6, label="train (step)")
    ax.plot([e["step"] for e in epochs], [e["train_loss"] for e in epochs], "o-", label="train (epoch mean)")
    val = [(e["step"], e["val_loss"]) for e in epochs if e.get("val_loss") is not None]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "s-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
