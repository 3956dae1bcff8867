"""What a training run is asked to do (TrainConfig) and what it reports (TrainingReport)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tuning.errors import TrainingError

METHODS = ("lora", "dora", "qlora", "full")
RECIPES = ("grounded", "closed")
FULL_MAX_PARAMS = 1_500_000_000


class TrainingCancelled(TrainingError):
    """should_stop() asked to stop; the last checkpoint lets the run resume."""


@dataclass(frozen=True)
class TrainConfig:
    """What to train; None values are chosen by tuning.training.hparams from the data size."""

    base_model: str = "bundled:smollm2-135m"
    method: str = "lora"
    epochs: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    batch_tokens: int | None = None
    seed: int = 0
    patience: int | None = None
    val_share: float = 0.2
    max_seq_tokens: int = 1024
    lora_dropout: float = 0.0
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_delta: float = 1e-3
    fast_path: bool = True  # per-example attention in packed rows, fused LoRA linears (same math, faster)
    accumulate: int = 1  # packed rows per process per optimizer step
    checkpoint_minutes: float = 10.0  # also checkpoint mid-epoch this often: a killed long epoch resumes near its end
    processes: int | None = None  # data-parallel processes; None = one per visible CUDA GPU (tuning.training.distributed)
    recipe: str = "grounded"  # "grounded": rows carry retrieved examples (tuning.grounding); "closed": closed book
    grounded_k: int = 3  # retrieved examples per grounded row (and per answer)


@dataclass(frozen=True)
class TrainingReport:
    """What a finished run produced; also written as training_report.json."""

    out_dir: str
    method: str
    base_model: str
    data_hash: str
    counts: dict
    hyperparameters: dict
    epochs: list[dict]
    best_epoch: int | None
    best_val_loss: float | None
    val_kind: str
    stopped_early: bool
    resumed_from_step: int
    steps: int
    tokens_per_s: float
    peak_rss_mb: float
    duration_s: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
