"""Checkpoints: the loop's state (TrainState) and tensors, written atomically, read back only if they fit.

A checkpoint is a folder of `trainable.pt` (the trained weights), `optimizer.pt` (optimizer, scheduler and
RNG states) and `state.json` (TrainState and the files' checksums), in `checkpoints/last` with the one it
replaced kept as `checkpoints/previous`; the best epoch's weights are in `checkpoints/best`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("trainable.pt", "optimizer.pt")


@dataclass
class TrainState:
    """Where a run stands and what it has measured: everything a checkpoint keeps besides tensors."""

    snapshot: dict  # what a checkpoint must match to be resumed: config, hyperparameters, data hash, prompt
    data_hash: str
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps taken
    tokens: int = 0
    train_seconds: float = 0.0
    epoch_loss_sum: float = 0.0  # this epoch's summed answer-token loss so far
    epoch_loss_tokens: int = 0
    epochs: list = field(default_factory=list)  # one dict per finished epoch (the report's `epochs`)
    step_losses: list = field(default_factory=list)  # [step, loss] for the loss curve
    best_val: float | None = None
    best_epoch: int | None = None
    bad_evals: int = 0  # validations in a row without improvement (early stopping)
    stopped_early: bool = False
    best_score: float | None = None  # what chose best_epoch (validation loss, or miscited share: grounded)
    best_no_answer_p: list | None = None  # P([0]) of each validation question at the best epoch
    val_loss_before: float | None = None

    OPTIONAL = ("best_score", "best_no_answer_p", "val_loss_before")  # absent in older checkpoints

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(saved, dict) or names - set(cls.OPTIONAL) - set(saved):
            raise ValueError("state.json lacks some of the run's state")
        return cls(**{k: v for k, v in saved.items() if k in names})

    @property
    def tokens_per_s(self) -> float:
        return round(self.tokens / max(1e-9, self.train_seconds), 1)


def trainable_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_trainable(model, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def _rng_state() -> dict:
    import torch

    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FILES = ("trainable.pt", "optimizer.pt")


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def load_tensors(path: Path):
    """torch.load that builds only tensors and plain containers (no pickled code), on the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, state: TrainState,
                    keep_previous: bool = True) -> None:
    """Write atomically (a killed process leaves the previous checkpoint intact), tensors and plain values only.

    state.json, written last, holds the files' checksums: a truncated, damaged or half-synced checkpoint is
    recognized on resume. With keep_previous the checkpoint it replaces stays as `previous`, to fall back to.
    """
    import torch

    from tuning.artifacts import atomic_dir

    with atomic_dir(folder, keep_as=folder.with_name("previous") if keep_previous else None) as tmp:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "optimizer.pt")
        sums = {name: _sha256(tmp / name) for name in CHECKPOINT_FILES}
        (tmp / "state.json").write_text(json.dumps({**state.to_dict(), "checksums": sums}, indent=1))


def _read_checkpoint(folder: Path, *, model, optimizer) -> tuple[TrainState, dict, dict]:
    """(state, trainable weights, optimizer/scheduler/RNG states) of one checkpoint, checked against this run.

    Raises ValueError (or whatever the damaged file makes json/torch raise) when it cannot be resumed from.
    """
    saved = json.loads((folder / "state.json").read_text())
    state = TrainState.from_dict(saved)
    sums = saved.get("checksums")  # absent in checkpoints written before checksums were
    for name in CHECKPOINT_FILES:
        if sums is not None and _sha256(folder / name) != sums.get(name):
            raise ValueError(f"{name} does not match its checksum")
    trainable, extra = load_tensors(folder / "trainable.pt"), load_tensors(folder / "optimizer.pt")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params) or any(trainable[k].shape != p.shape for k, p in params.items()):
        raise ValueError("its weights are not this model's")
    groups, mine = extra["optimizer"]["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise ValueError("its optimizer state is for other parameters")
    flat = [p for g in mine for p in g["params"]]
    for index, values in extra["optimizer"]["state"].items():
        if any(hasattr(v, "shape") and v.dim() and v.shape != flat[index].shape for v in values.values()):
            raise ValueError("its optimizer state is for other parameters")
    if not {"scheduler", "rng"} <= set(extra):
        raise ValueError("optimizer.pt lacks the scheduler or RNG state")
    return state, trainable, extra


def resume(ckpt_dir: Path, *, snapshot: dict, model, optimizer, scheduler, ranks) -> TrainState | None:
    """Load the newest usable checkpoint into the model, optimizer, scheduler and RNGs; its state, or None.

    A damaged checkpoint is skipped for the previous one, then for a fresh start, and the log (the job's log)
    says so: retrying a job must not fail the same way every time. A checkpoint of other data or settings
    means a fresh start too. What cannot be used is removed once every rank has read the checkpoints.
    """
    chosen, unusable = None, []
    candidates = [d for d in (ckpt_dir / "last", ckpt_dir / "previous") if d.is_dir()]
    for i, folder in enumerate(candidates):
        try:
            loaded = _read_checkpoint(folder, model=model, optimizer=optimizer)
        except Exception as exc:  # noqa: BLE001 - a damaged file makes json, zipfile and torch raise many types
            rest = "trying the previous one" if i + 1 < len(candidates) else "starting over"
            log.warning("checkpoint %s cannot be resumed from (%s: %s); %s", folder, type(exc).__name__, exc, rest)
            unusable.append(folder)
            continue
        if loaded[0].snapshot != json.loads(json.dumps(snapshot)):
            log.warning("ignoring the checkpoint in %s: data or config changed", ckpt_dir)
            unusable = [ckpt_dir]
            break
        chosen = folder, loaded
        break
    ranks.barrier()  # every rank has read the checkpoints before rank 0 removes any
    if ranks.main:
        for folder in unusable:
            shutil.rmtree(folder, ignore_errors=True)
    if chosen is None:
        return None
    folder, (saved, trainable, extra) = chosen
    load_trainable(model, trainable)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    log.info("resuming %s from step %d (epoch %d) of checkpoint %s", ckpt_dir.parent, saved.step,
             saved.epoch + 1, folder.name)
    return saved


def save_best(folder: Path, model) -> None:
    """The best epoch's trained weights (replaced atomically)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(trainable_state(model), folder / "trainable.pt.tmp")
    os.replace(folder / "trainable.pt.tmp", folder / "trainable.pt")


def load_best(folder: Path, model) -> bool:
    """Roll the model back to the best epoch's weights, if saved."""
    if not (folder / "trainable.pt").exists():
        return False
    load_trainable(model, load_tensors(folder / "trainable.pt"))
    return True
