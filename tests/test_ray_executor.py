"""The ray executor against a real local Ray head on 127.0.0.1: same rows as local jobs, cancel, a killed task."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import importlib.util

import pytest

if importlib.util.find_spec("ray") is None:  # not imported here: the fixture sets Ray's env first
    pytest.skip("needs the ray extra (pip install -e '.[ray]')", allow_module_level=True)

from storage import Store, open_db  # noqa: E402
from tuning.jobs import EventBus, Worker, cancel_job, enqueue_training  # noqa: E402
from jobs_helpers import add_examples, run_until, tiny_params  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 only (2 CPUs, no GPU, 100 MB object store, no dashboard); its address."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="tbray", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    # Without a cluster flag Ray takes the loopback address as the node IP, so every server binds 127.0.0.1.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", "--object-store-memory=100000000", "--include-dashboard=false", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        # This driver too, or it resolves 127.0.0.1 to the host's address and cannot reach the head.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:  # imported earlier in this session: the flag was read at import
            sys.modules["ray"]._private.ray_constants.ENABLE_RAY_CLUSTER = False
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)  # --block: ray start stops the processes it started
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def _collect(bus: EventBus) -> list:
    seen: list = []
    bus.subscribe(lambda e: seen.append((e.kind, e.job.id, e.job.status)))
    return seen


def _worker(db_path, tmp_path, address, bus, **kw) -> Worker:
    return Worker(db_path, artifacts=tmp_path / "art", executor="ray", ray_address=address, bus=bus,
                  poll_interval=0.1, shutdown_grace_s=10, **kw)


def test_a_training_job_on_ray_gives_the_same_rows_as_a_local_one(ray_head, db_path, store, assistant, tmp_path,
                                                                  tiny_model_dir):
    add_examples(store, assistant.id, 6, test=2)
    job = enqueue_training(store, assistant.id, params=tiny_params(tiny_model_dir, batch_tokens=64))
    bus = EventBus()
    seen = _collect(bus)
    worker = _worker(db_path, tmp_path, ray_head, bus)
    progress_seen = []
    try:
        run_until(worker, lambda: (progress_seen.append(dict(store.get_job(job.id).progress)) or
                                   store.get_job(job.id).status in ("succeeded", "failed")), timeout=150)
    finally:
        worker.shutdown()
    done = store.get_job(job.id)
    assert (done.status, done.attempts, done.error) == ("succeeded", 1, None)
    assert done.pid is None and done.finished_at
    # Progress came back through the channel actor and was written by the worker, as for local jobs.
    assert any(p.get("step") for p in progress_seen)
    assert done.progress["step"] == done.progress["total_steps"] and done.progress["phase"] == "done"
    assert done.progress["node"] == "127.0.0.1" and done.progress["attempt"] == 1
    assert [s for k, i, s in seen if k == "state"] == ["running", "succeeded"]
    # The same result and version as a local run: the first one, so it became active by itself.
    versions = store.list_model_versions(assistant.id)
    assert [(v.job_id, v.status) for v in versions] == [(job.id, "active")]
    version = versions[0]
    assert done.result["version_id"] == version.id and done.result["first_version"] is True
    assert done.result["adapter_dir"] == version.adapter_path == str(tmp_path / "art" / str(assistant.id) /
                                                                       f"job-{job.id}")
    assert (Path(version.adapter_path) / "adapter_model.safetensors").exists()
    assert (Path(version.adapter_path) / "evaluation.json").exists()
    assert version.base_model == tiny_model_dir and version.dataset_hash
    m = version.metrics
    assert m["steps"] == m["total_steps"] > 0 and m["n_test"] == 2 and "accuracy" in m
    log_text = Path(version.adapter_path + ".log").read_text()  # beside the adapter, not in it
    assert "--- attempt 1" in log_text and "on Ray at 127.0.0.1" in log_text


def test_a_cancelled_ray_job_ends_cancelled(ray_head, db_path, store, assistant, tmp_path, tiny_model_dir):
    add_examples(store, assistant.id, 4)
    job = enqueue_training(store, assistant.id, params=tiny_params(tiny_model_dir, epochs=200, batch_tokens=64))
    bus = EventBus()
    seen = _collect(bus)
    worker = _worker(db_path, tmp_path, ray_head, bus, grace_s=3.0)
    try:
        run_until(worker, lambda: store.get_job(job.id).progress.get("step", 0) >= 1, timeout=120)
        cancel_job(Store(open_db(db_path)), job.id, by=1)  # as the bot or the CLI would, from elsewhere
        run_until(worker, lambda: not worker.running, timeout=20, every=0.1)  # the 200 epochs would take minutes
    finally:
        worker.shutdown()
    done = store.get_job(job.id)
    assert done.status == "cancelled" and done.progress["step"] < done.progress["total_steps"]
    assert store.list_model_versions(assistant.id) == []
    assert seen[-1] == ("state", job.id, "cancelled")


def test_a_ray_task_killed_mid_run_is_retried_and_resumes(ray_head, db_path, store, assistant, tmp_path,
                                                         tiny_model_dir):
    add_examples(store, assistant.id, 8)
    params = tiny_params(tiny_model_dir, epochs=2, batch_tokens=64, patience=100)
    params["fault"] = {"kill_at_step": 0, "on_attempts": [1]}  # set below: after the first epoch's checkpoint
    job = enqueue_training(store, assistant.id, params=params, max_attempts=2)
    bus = EventBus()
    seen = _collect(bus)
    worker = _worker(db_path, tmp_path, ray_head, bus)
    # Learn the plan from a probe of the data size: the fault kills the task's worker process one step into epoch 2.
    from tuning.jobs.executors import training_spec
    from tuning.training import hparams as hp
    from tuning.data.dataset import TrainItem, encode_items, epoch_rows, split_items
    from tuning.grounding import grounded_items, training_index
    from tuning.models import load_tokenizer

    spec = training_spec(store, store.get_job(job.id), default_base_model=tiny_model_dir)
    splits = split_items([TrainItem(**i) for i in spec["items"]], val_share=0.2, seed=0)
    rows, _ = grounded_items(splits.train, splits.val, training_index(splits.train), seed=0)
    enc = encode_items(load_tokenizer(tiny_model_dir), rows, system_prompt=spec.get("system_prompt", ""),
                       max_tokens=1024)
    batch = max(hp.choose(n_facts=len({i.group for i in splits.train}), n_items=len(enc),
                          n_tokens=sum(len(e.input_ids) for e in enc), method="lora", recipe="grounded",
                          epochs=2, batch_tokens=64).batch_tokens, max(len(e.input_ids) for e in enc))
    steps_per_epoch = len(epoch_rows(enc, batch_tokens=batch, seed=0, epoch=0))
    total_steps = steps_per_epoch + len(epoch_rows(enc, batch_tokens=batch, seed=0, epoch=1))  # packing varies
    params["fault"]["kill_at_step"] = steps_per_epoch + 1
    store.update_job(job.id, params=params)
    try:
        run_until(worker, lambda: store.get_job(job.id).status in ("succeeded", "failed"), timeout=200)
    finally:
        worker.shutdown()
    done = store.get_job(job.id)
    assert (done.status, done.attempts) == ("succeeded", 2), done.error
    assert [s for k, i, s in seen if k == "state"] == ["running", "queued", "running", "succeeded"]
    metrics = done.result["metrics"]
    assert metrics["resumed_from_step"] == steps_per_epoch  # resumed at the epoch-1 checkpoint, not from scratch
    assert metrics["steps"] == metrics["total_steps"] == total_steps
    log_text = Path(done.result["adapter_dir"] + ".log").read_text()
    assert log_text.count("--- attempt") == 2
    assert "the Ray task died" in log_text
    assert [v.job_id for v in store.list_model_versions(assistant.id)] == [job.id]


def test_tunebot_train_wait_with_the_ray_executor(ray_head, tmp_path, tiny_model_dir):
    """The done-when: `TUNEBOT_EXECUTOR=ray tunebot train --assistant X --wait` against the local head."""
    import json

    db = tmp_path / "data" / "tunebot.db"
    db.parent.mkdir()
    store = Store(open_db(db))
    assistant = store.create_assistant("acme", system_prompt="You answer for ACME.")
    add_examples(store, assistant.id, 6)
    env = {**os.environ, "TUNEBOT_DATA_DIR": str(tmp_path / "data"), "TUNEBOT_EXECUTOR": "ray",
           "TUNEBOT_RAY_ADDRESS": ray_head, "TUNEBOT_BASE_MODEL": tiny_model_dir,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-m", "bot", "train", "--assistant", "acme", "--wait", "--epochs", "1",
                          "--batch-tokens", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no worker is running: running the job in this process" in out.stderr
    assert "step " in out.stderr  # the progress lines, read from the jobs table as the bot reads them
    job = store.list_jobs(assistant_id=assistant.id)[0]
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert job.progress["node"] == "127.0.0.1" and job.progress["phase"] == "done"
    version = store.get_model_version(job.result["version_id"])
    assert f"adapter: {version.adapter_path}" in out.stdout
    assert (Path(version.adapter_path) / "adapter_model.safetensors").exists()
    assert "on Ray at " + ray_head in (tmp_path / "data" / "artifacts" / str(assistant.id) /
                                       f"job-{job.id}.log").read_text()
    assert json.loads((Path(version.adapter_path) / "train_config.json").read_text())["system_prompt"]


def test_a_ray_task_trains_data_parallel_in_several_processes(ray_head, db_path, store, assistant, tmp_path,
                                                              tiny_model_dir):
    """A job asking for 2 processes: the Ray task launches 2 ranks on its node (GPUs on a GPU cluster)."""
    add_examples(store, assistant.id, 6)
    job = enqueue_training(store, assistant.id, params=tiny_params(tiny_model_dir, batch_tokens=64, processes=2))
    worker = _worker(db_path, tmp_path, ray_head, EventBus())
    try:
        run_until(worker, lambda: store.get_job(job.id).status in ("succeeded", "failed"), timeout=200)
    finally:
        worker.shutdown()
    done = store.get_job(job.id)
    assert (done.status, done.attempts) == ("succeeded", 1), done.error
    assert done.progress["processes"] == 2 and done.progress["node"] == "127.0.0.1"
    (version,) = store.list_model_versions(assistant.id)
    assert version.hyperparameters["processes"] == 2
    assert (Path(version.adapter_path) / "adapter_model.safetensors").exists()
