"""Checkpoints: tensors and plain values only, loaded without running pickled code, and a damaged one is
skipped (for the previous checkpoint, else a fresh start) instead of failing every retry the same way."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from train_helpers import fact_items
from tuning.training.config import TrainConfig
from tuning.training.run import train


class Crash(Exception):
    pass


def config(model_dir: str, **kw) -> TrainConfig:
    # batch_tokens=64: the first epoch has more than 3 steps, so a crash at step 3 is mid-epoch
    return TrainConfig(base_model=model_dir, **{"epochs": 2, "learning_rate": 1e-2, "batch_tokens": 64, **kw})


def crashed_at_step_3(model_dir: str, out: Path) -> Path:
    """A run that checkpointed after every step and crashed after step 3: checkpoints/last and /previous."""
    def crash(p):
        if p.step == 3 and not p.epoch_done:
            raise Crash()

    with pytest.raises(Crash):
        train(fact_items(), out_dir=out, config=config(model_dir, checkpoint_minutes=0.0), on_progress=crash)
    return out / "checkpoints"


def step_of(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


def plain(value) -> bool:
    """Only tensors, numbers, strings, None and lists/tuples/dicts of them."""
    import torch

    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """The same run, uninterrupted: what every resumed or restarted run must end like."""
    return train(fact_items(), out_dir=tmp_path_factory.mktemp("full"), config=config(tiny_model_dir))


def test_checkpoints_hold_only_tensors_and_plain_values_and_keep_the_previous_one(tiny_model_dir, tmp_path):
    import torch

    ckpt = crashed_at_step_3(tiny_model_dir, tmp_path / "run")
    assert (step_of(ckpt / "last"), step_of(ckpt / "previous")) == (3, 2)
    for folder in (ckpt / "last", ckpt / "previous"):
        for name in ("trainable.pt", "optimizer.pt"):
            loaded = torch.load(folder / name, weights_only=True)  # raises on anything but plain data
            assert plain(loaded), name
        sums = json.loads((folder / "state.json").read_text())["checksums"]
        assert sums["optimizer.pt"] == hashlib.sha256((folder / "optimizer.pt").read_bytes()).hexdigest()


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_then_to_a_fresh_start(
        tiny_model_dir, tmp_path, full_run, caplog):
    ckpt = crashed_at_step_3(tiny_model_dir, tmp_path / "run")
    optimizer = ckpt / "last" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a disk that filled up
    with caplog.at_level(logging.INFO, logger="tuning.training"):
        resumed = train(fact_items(), out_dir=tmp_path / "run", config=config(tiny_model_dir))
    assert resumed.resumed_from_step == 2
    assert "cannot be resumed from" in caplog.text and "trying the previous one" in caplog.text
    assert resumed.steps == full_run.steps
    assert [e["val_loss"] for e in resumed.epochs] == pytest.approx([e["val_loss"] for e in full_run.epochs],
                                                                    abs=1e-5)

    # Both damaged (a flipped byte, a truncated state file): a fresh start, the same run as one never stopped.
    ckpt = crashed_at_step_3(tiny_model_dir, tmp_path / "again")
    weights = ckpt / "last" / "trainable.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    state = ckpt / "previous" / "state.json"
    state.write_text(state.read_text()[:40])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tuning.training"):
        restarted = train(fact_items(), out_dir=tmp_path / "again", config=config(tiny_model_dir))
    assert restarted.resumed_from_step == 0
    assert "starting over" in caplog.text
    assert restarted.steps == full_run.steps
    assert [e["val_loss"] for e in restarted.epochs] == pytest.approx([e["val_loss"] for e in full_run.epochs],
                                                                      abs=1e-5)


class Payload:
    """Pickles as a call to open(path, "w"): code that runs when the file is unpickled without weights_only."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_carrying_code_is_not_run_and_is_skipped(tiny_model_dir, tmp_path, caplog):
    import torch

    ckpt = crashed_at_step_3(tiny_model_dir, tmp_path / "run")
    marker = tmp_path / "the payload ran"
    # As from a tampered artifacts store: the payload, and state.json's checksum made to match it.
    torch.save({"optimizer": Payload(marker), "scheduler": {}, "rng": {}}, ckpt / "last" / "optimizer.pt")
    state = json.loads((ckpt / "last" / "state.json").read_text())
    state.setdefault("checksums", {})["optimizer.pt"] = hashlib.sha256(
        (ckpt / "last" / "optimizer.pt").read_bytes()).hexdigest()
    (ckpt / "last" / "state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.INFO, logger="tuning.training"):
        resumed = train(fact_items(), out_dir=tmp_path / "run", config=config(tiny_model_dir))
    assert not marker.exists()
    assert resumed.resumed_from_step == 2
    assert "UnpicklingError" in caplog.text
