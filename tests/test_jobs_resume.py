"""Crash safety: SIGKILL the `tunebot worker` process mid-training; a new one resumes from the checkpoint.
A damaged checkpoint does not fail every retry: the retry resumes from the one before it and says so."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from storage import Store, open_db
from tuning.jobs import Worker, enqueue_training
from tuning.jobs.local import job_log_path
from jobs_helpers import Clock, add_examples, run_until, tiny_params

ROOT = Path(__file__).resolve().parent.parent


def _start_worker(tmp_path: Path, db_path: Path) -> subprocess.Popen:
    env = {**os.environ, "TUNEBOT_DATA_DIR": str(tmp_path / "data"), "TUNEBOT_DATABASE": str(db_path),
           "TUNEBOT_LOG_LEVEL": "INFO"}
    return subprocess.Popen([sys.executable, "-m", "bot", "worker", "--gpus", "none", "--poll", "0.2"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_worker_is_replaced_and_training_resumes_from_its_checkpoint(tmp_path, db_path, tiny_model_dir):
    store = Store(open_db(db_path))
    assistant = store.create_assistant("acme", system_prompt="You answer for ACME.")
    add_examples(store, assistant.id, 8)
    job = enqueue_training(store, assistant.id,
                           params=tiny_params(tiny_model_dir, epochs=3, batch_tokens=64, patience=100))
    first = _start_worker(tmp_path, db_path)
    try:
        # Wait until epoch 1 is done (its checkpoint written) and epoch 2 has begun.
        _wait(lambda: (p := store.get_job(job.id).progress).get("epoch", 0) >= 2
              and p["step"] > p["total_steps"] // 3, timeout=240)
        child = store.get_job(job.id).pid
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    _wait(lambda: _gone(child), timeout=10)  # the job process died with its worker
    assert store.get_job(job.id).status == "running"  # as the dead worker left it
    killed_at = store.get_job(job.id).progress["step"]

    second = _start_worker(tmp_path, db_path)
    try:
        _wait(lambda: store.get_job(job.id).status in ("succeeded", "failed"), timeout=240)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    done = store.get_job(job.id)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    metrics = done.result["metrics"]
    versions = store.list_model_versions(assistant.id)
    epochs = json.loads((Path(versions[0].adapter_path) / "training_report.json").read_text())["epochs"]
    # Resumed at the end-of-epoch checkpoint, not from scratch, and did exactly the planned steps, like an
    # uninterrupted run (early stopping is off with patience 100). Epochs differ in steps (rows are packed
    # anew each epoch), so the first one's end is read from the report, not assumed to be a third.
    assert epochs[0]["step"] <= metrics["resumed_from_step"] <= killed_at
    assert metrics["steps"] == metrics["total_steps"] == epochs[-1]["step"]
    assert metrics["epochs_done"] == len(epochs) == 3
    assert [v.job_id for v in versions] == [job.id]
    assert (Path(versions[0].adapter_path) / "adapter_model.safetensors").exists()
    log_text = Path(done.result["adapter_dir"] + ".log").read_text()  # beside the adapter folder, not in it
    assert log_text.count("--- attempt") == 2
    # The killed worker was forgotten by the second one, which deregistered when it stopped.
    assert store.live_workers(since="") == []


def test_a_retry_skips_a_damaged_checkpoint_and_the_job_log_says_so(tmp_path, db_path, tiny_model_dir):
    from bot.telegram.handlers.admin import adapter_zip

    store = Store(open_db(db_path))
    assistant = store.create_assistant("acme", system_prompt="You answer for ACME.")
    add_examples(store, assistant.id, 8)
    params = tiny_params(tiny_model_dir, epochs=2, batch_tokens=64, checkpoint_minutes=0.0)  # one after every step
    params["fault"] = {"kill_at_step": 3, "on_attempts": [1]}  # the first attempt is SIGKILLed at step 3
    job = enqueue_training(store, assistant.id, params=params)

    class QuietOnceKilled(Clock):
        """Noon until attempt 1 reported step 3 (its last words), then quiet hours: the retry waits, queued."""

        def __call__(self):
            if self.now.hour == 12 and store.get_job(job.id).progress.get("step", 0) >= 3:
                self.set("2026-06-01 13:30:00")
            return self.now

    clock = QuietOnceKilled("2026-06-01 12:00:00")
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=0, clock=clock, quiet_hours="13:00-14:00",
                    poll_interval=0.1)
    run_until(worker, lambda: (j := store.get_job(job.id)).status == "queued" and j.attempts == 1, timeout=180)
    checkpoints = tmp_path / "art" / str(assistant.id) / f"job-{job.id}" / "checkpoints"
    previous_step = json.loads((checkpoints / "previous" / "state.json").read_text())["step"]
    (checkpoints / "last" / "trainable.pt").write_bytes(b"")  # as a full disk leaves it
    clock.set("2026-06-01 14:30:00")
    run_until(worker, lambda: store.get_job(job.id).status in ("succeeded", "failed"), timeout=240)
    done = store.get_job(job.id)
    assert (done.status, done.attempts) == ("succeeded", 2), done.error
    assert done.result["metrics"]["resumed_from_step"] == previous_step > 0
    log_text = job_log_path(tmp_path / "art", done).read_text()
    assert "cannot be resumed from" in log_text and "trying the previous one" in log_text
    # What users download (/export) is the adapter, without the job's log.
    (version,) = store.list_model_versions(assistant.id)
    names = zipfile.ZipFile(io.BytesIO(adapter_zip(version.adapter_path))).namelist()
    assert "adapter_model.safetensors" in names
    assert not any(name.endswith(".log") for name in names), names
