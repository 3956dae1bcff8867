"""Data-parallel training (tuning.training.distributed): 2 CPU ranks over gloo on a tiny random model.

On a GPU node the same code runs one rank per GPU over NCCL; here the ranks share the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from train_helpers import fact_items
from tuning.errors import TrainingError, TuningError
from tuning.training.config import TrainConfig, TrainingCancelled
from tuning.training.run import train


def config(model_dir: str, **kw) -> TrainConfig:
    return TrainConfig(base_model=model_dir, **{"epochs": 2, "learning_rate": 1e-2, "batch_tokens": 64, **kw})


def adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rank_processes() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "tuning.training.distributed" in " ".join(p.cmdline())]


@contextlib.contextmanager
def one_thread():
    """This process computes with one thread, as the ranks do with OMP_NUM_THREADS=1: float32 sums are then
    reduced in the same order on both sides (2 threads against 1 differed by 4e-5 once, on a loaded machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def accumulated(tiny_model_dir, tmp_path_factory):
    """One process taking 2 packed rows per optimizer step: what 2 ranks of 1 row each must reproduce."""
    out = tmp_path_factory.mktemp("accumulate-2")
    with one_thread():
        return out, train(fact_items(), out_dir=out, config=config(tiny_model_dir, accumulate=2))


def test_two_ranks_take_the_same_steps_as_one_process_accumulating_their_rows(tiny_model_dir, accumulated, tmp_path,
                                                                               monkeypatch):
    acc_dir, acc_report = accumulated
    progress: list = []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each rank's threads, whatever the machine's core count
    report = train(fact_items(), out_dir=tmp_path, config=config(tiny_model_dir, processes=2),
                   on_progress=progress.append)
    # Gradients summed over the ranks: the adapter equals the accumulating run's (it would not if rank 0
    # stepped on its own rows only).
    assert max_diff(adapter(tmp_path), adapter(acc_dir)) < 1e-5
    assert report.steps == acc_report.steps == report.hyperparameters["total_steps"]
    assert [e["train_loss"] for e in report.epochs] == pytest.approx([e["train_loss"] for e in acc_report.epochs],
                                                                     abs=1e-4)
    assert report.best_val_loss == pytest.approx(acc_report.best_val_loss, abs=1e-4)
    assert report.hyperparameters["processes"] == 2 and acc_report.hyperparameters["processes"] == 1
    # Rank 0's progress reached the caller, live and in order; the examples' spec file is gone.
    steps = [p.step for p in progress if not p.epoch_done]
    assert steps == sorted(steps) and steps[-1] == report.steps
    assert all(p.processes == 2 for p in progress)
    assert [p.epoch for p in progress if p.epoch_done] == [1, 2]
    assert not list(tmp_path.glob(".data_parallel_spec.json"))
    for name in ("adapter_config.json", "training_report.json", "loss_curve.png", "fewshot_pool.jsonl"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "training_report.json").read_text())["steps"] == report.steps
    assert not rank_processes()


def test_a_cancelled_run_stops_every_rank_and_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    items = fact_items(n=12)
    cfg = config(tiny_model_dir, processes=2, epochs=6)
    progress: list = []
    with pytest.raises(TrainingCancelled):
        train(items, out_dir=tmp_path / "run", config=cfg, on_progress=progress.append,
              should_stop=lambda: any(p.step >= 3 for p in progress))
    stopped_at = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())["step"]
    assert 3 <= stopped_at < max(p.total_steps for p in progress)  # stopped (and checkpointed) midway
    assert not rank_processes()
    resumed = train(items, out_dir=tmp_path / "run", config=cfg)
    assert resumed.resumed_from_step == stopped_at
    whole = train(items, out_dir=tmp_path / "whole", config=cfg)
    assert resumed.steps == whole.steps
    assert max_diff(adapter(tmp_path / "run"), adapter(tmp_path / "whole")) < 1e-5


# From a rank's death to the caller's error: the launcher polls every 0.2 s, then gives the surviving rank
# 10 s to stop before killing it. Not a speed: the other rank waits in an all-reduce for 10 minutes otherwise.
STOPPED_WITHIN_S = 30


def test_a_crashed_rank_fails_the_run_promptly_instead_of_hanging(tiny_model_dir, tmp_path):
    killed: list[tuple[int, float]] = []
    progress: list = []

    def kill_rank_1(p) -> None:
        progress.append(p)
        if not killed:
            ranks = sorted(rank_processes(), key=lambda p: p.pid)
            victim = next(p for p in ranks if p.environ().get("RANK") == "1")
            killed.append((victim.pid, time.monotonic()))
            os.kill(victim.pid, signal.SIGKILL)

    with pytest.raises(RuntimeError, match="rank 1 of 2 exited with code -9"):  # the dead rank and its SIGKILL
        train(fact_items(n=12), out_dir=tmp_path, config=config(tiny_model_dir, processes=2, epochs=20),
              on_progress=kill_rank_1)
    assert killed and time.monotonic() - killed[0][1] < STOPPED_WITHIN_S
    assert progress[-1].step < progress[-1].total_steps  # it did not train on alone
    assert not rank_processes()


def test_an_error_in_the_ranks_reaches_the_caller_as_its_message(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    broken = TrainConfig(base_model=str(tmp_path / "not-a-model"), epochs=1)
    with pytest.raises(TuningError) as alone:
        train(fact_items(), out_dir=tmp_path / "one", config=broken)
    with pytest.raises(TrainingError) as ranked:
        train(fact_items(), out_dir=tmp_path / "two", config=dataclasses.replace(broken, processes=2))
    assert str(ranked.value) == str(alone.value) and "not-a-model" in str(alone.value)
    assert not rank_processes()


def test_bad_process_counts_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="processes must be at least 1"):
        train(fact_items(), out_dir=tmp_path, config=config(tiny_model_dir, processes=0))
    with pytest.raises(TrainingError, match="accumulate must be at least 1"):
        train(fact_items(), out_dir=tmp_path, config=config(tiny_model_dir, accumulate=0))


def test_a_queued_job_trains_data_parallel_through_the_worker(db_path, store, assistant, tmp_path, tiny_model_dir):
    from jobs_helpers import add_examples, run_until, tiny_params
    from tuning.jobs import Worker, enqueue_training

    add_examples(store, assistant.id, 6, test=2)
    job = enqueue_training(store, assistant.id, params=tiny_params(tiny_model_dir, batch_tokens=64, processes=2))
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=0, poll_interval=0.1)
    run_until(worker, lambda: store.get_job(job.id).status in ("succeeded", "failed"), timeout=240)
    done = store.get_job(job.id)
    assert (done.status, done.attempts) == ("succeeded", 1), done.error
    assert done.progress["processes"] == 2 and done.progress["phase"] == "done"
    (version,) = store.list_model_versions(assistant.id)
    assert version.hyperparameters["processes"] == 2
    assert version.metrics["steps"] == version.hyperparameters["total_steps"]
    assert (Path(version.adapter_path) / "adapter_model.safetensors").exists()
    assert not rank_processes()


LAUNCHER = """
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/tests")
from train_helpers import fact_items
from tuning.training.config import TrainConfig
from tuning.training.run import train
cfg = TrainConfig(base_model={model!r}, epochs=50, learning_rate=1e-2, batch_tokens=64, processes=2)
train(fact_items(n=12), out_dir={out!r}, config=cfg, on_progress=lambda p: print("step", flush=True))
"""


def test_ranks_die_with_a_killed_launcher(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    import psutil

    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(root=root, model=tiny_model_dir,
                                                                   out=str(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().startswith("step")  # training is under way in both ranks
        ranks = [p for p in psutil.Process(proc.pid).children() if "tuning.training.distributed" in " ".join(p.cmdline())]
        assert len(ranks) == 2
    finally:
        proc.kill()
        proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, [p.pid for p in alive]
