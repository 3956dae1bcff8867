"""The worker with real job processes: exclusive claims, GPU slots, retries after a crash, cancel."""

from __future__ import annotations

import os
import time


from storage import Store, open_db
from tuning.jobs import EventBus, Worker, cancel_job, enqueue_generation, enqueue_training
from jobs_helpers import add_examples, run_until, tiny_params


def _collect(bus: EventBus) -> list:
    seen: list = []
    bus.subscribe(lambda e: seen.append((e.kind, e.job.id, e.job.status, e.job.devices)))
    return seen


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as fp:
        return fp.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_two_workers_on_one_database_never_run_the_same_job(db_path, store, tmp_path, tiny_model_dir):
    jobs = []
    for i in range(4):
        a = store.create_assistant(f"a{i}")
        add_examples(store, a.id, 2)
        jobs.append(enqueue_generation(store, a.id, per_example=2, seed=i))
    trained = store.create_assistant("trained", system_prompt="Be brief.")
    add_examples(store, trained.id, 4)
    jobs.append(enqueue_training(store, trained.id, params=tiny_params(tiny_model_dir, batch_tokens=64)))
    buses = [EventBus(), EventBus()]
    seen = [_collect(b) for b in buses]
    workers = [Worker(db_path, artifacts=tmp_path / "art", gpus=0, bus=b, poll_interval=0.1) for b in buses]

    def all_done():
        return all(store.get_job(j.id).status in ("succeeded", "failed") for j in jobs)

    deadline = time.monotonic() + 240
    while not all_done():
        assert time.monotonic() < deadline
        for w in workers:
            w.run_once()
        time.sleep(0.1)
    started = [{job_id for kind, job_id, status, _ in s if kind == "state" and status == "running"} for s in seen]
    assert started[0].isdisjoint(started[1])
    assert started[0] | started[1] == {j.id for j in jobs}
    assert started[0] and started[1]  # both took work
    for j in jobs:
        done = store.get_job(j.id)
        assert (done.status, done.attempts) == ("succeeded", 1), done.error
    # Each generation job ran exactly once: one generation run per assistant.
    for j in jobs[:4]:
        assert len(store.list_generation_runs(j.assistant_id)) == 1
    assert [v.job_id for v in store.list_model_versions(trained.id)] == [jobs[-1].id]


def test_priorities_and_fake_gpu_slots(db_path, store, tmp_path):
    a = store.create_assistant("gpu")
    add_examples(store, a.id, 2)
    low = enqueue_generation(store, a.id, priority=0)
    big = store.create_job("generate", assistant_id=a.id, priority=5, gpus=2, params={"per_example": 1})
    mid1 = enqueue_generation(store, a.id, priority=1, seed=1)
    mid2 = enqueue_generation(store, a.id, priority=1, seed=2)
    bus = EventBus()
    seen = _collect(bus)
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=2, bus=bus)
    assert worker.capacity == 2
    worker.run_once()
    assert worker.running == [big.id]  # the 2-GPU job fills both slots
    assert store.get_job(big.id).devices == "0,1"
    run_until(worker, lambda: store.get_job(big.id).status == "succeeded" and worker.running)
    assert sorted(worker.running) == [mid1.id, mid2.id]  # both priority-1 jobs at once, one GPU each
    assert {store.get_job(mid1.id).devices, store.get_job(mid2.id).devices} == {"0", "1"}
    run_until(worker, lambda: store.get_job(low.id).status == "succeeded")
    order = [job_id for kind, job_id, status, _ in seen if kind == "state" and status == "running"]
    assert order == [big.id, mid1.id, mid2.id, low.id]
    log_text = (tmp_path / "art" / str(a.id) / f"job-{big.id}.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=0,1" in log_text


def test_a_child_that_dies_is_retried_then_failed_with_the_reason(db_path, store, assistant, tmp_path,
                                                                tiny_model_dir):
    add_examples(store, assistant.id, 4)
    params = tiny_params(tiny_model_dir, batch_tokens=64)
    params["fault"] = {"kill_at_step": 1}  # simulates the kernel's OOM killer
    job = enqueue_training(store, assistant.id, params=params, max_attempts=2)
    bus = EventBus()
    seen = _collect(bus)
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=0, bus=bus)
    run_until(worker, lambda: store.get_job(job.id).status == "failed", timeout=180)
    failed = store.get_job(job.id)
    assert failed.attempts == 2
    assert failed.error.startswith("killed (signal 9, SIGKILL: out of memory?)")
    assert failed.result["failure"] == {"code": "killed_oom", "params": {}, "attempts": 2}  # for the bot to word
    states = [status for kind, job_id, status, _ in seen if kind == "state"]
    assert states == ["running", "queued", "running", "failed"]
    assert store.list_model_versions(assistant.id) == []


def test_cancel_stops_a_running_job_within_seconds(db_path, store, assistant, tmp_path, tiny_model_dir):
    add_examples(store, assistant.id, 4)
    job = enqueue_training(store, assistant.id, params=tiny_params(tiny_model_dir, epochs=200, batch_tokens=64))
    bus = EventBus()
    seen = _collect(bus)
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=0, grace_s=3.0, bus=bus)
    run_until(worker, lambda: store.get_job(job.id).progress.get("step", 0) >= 1, timeout=180)
    worker.run_once()
    assert ("progress", job.id, "running", "") in seen  # the worker publishes progress as it sees it
    pid = store.get_job(job.id).pid
    other = Store(open_db(db_path))  # as from another process: the CLI or the bot
    cancel_job(other, job.id, by=1)
    started = time.monotonic()
    run_until(worker, lambda: not worker.running, timeout=10, every=0.1)
    assert time.monotonic() - started < worker.grace_s + 5  # SIGKILL after the grace period, however loaded
    assert _pid_gone(pid)
    done = store.get_job(job.id)
    assert done.status == "cancelled" and done.progress["step"] < done.progress["total_steps"]
    assert store.list_model_versions(assistant.id) == []
    assert seen[-1][:3] == ("state", job.id, "cancelled")
