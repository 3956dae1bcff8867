"""The job queue: atomic claims, priorities, GPU fit, cancel, recovery, events, versions (no subprocesses)."""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from storage import Store, open_db
from tuning.jobs import (EventBus, JobError, JobEvent, beats, cancel_job, enqueue_training, promote_version,
                         recover_stale, rollback, watch_job)
from jobs_helpers import Clock, add_examples


def test_concurrent_claims_never_hand_out_a_job_twice(store, assistant, db_path):
    ids = {store.create_job("eval", assistant_id=assistant.id).id for _ in range(30)}
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def claimer(name):
        mine = Store(open_db(db_path))
        while (job := mine.claim_job(worker_id=name, free=1, gpu_mode=False)) is not None:
            with lock:
                claimed.append((name, job.id))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [job_id for _, job_id in claimed]
    assert sorted(got) == sorted(ids)  # every job once, none twice
    for job_id in ids:
        job = store.get_job(job_id)
        assert job.status == "running" and job.attempts == 1
        assert job.worker_id == dict((j, w) for w, j in claimed)[job_id]


def test_claim_order_priority_then_age_and_gpu_fit(store, assistant):
    low = store.create_job("eval", assistant_id=assistant.id, priority=0)
    high = store.create_job("eval", assistant_id=assistant.id, priority=5)
    big = store.create_job("eval", assistant_id=assistant.id, priority=9, gpus=2)
    # One free GPU: the 2-GPU job does not fit, so the high-priority 1-GPU job goes first.
    assert store.claim_job(worker_id="w", free=1, gpu_mode=True).id == high.id
    assert store.claim_job(worker_id="w", free=2, gpu_mode=True).id == big.id
    assert store.claim_job(worker_id="w", free=1, gpu_mode=True, exclude_kinds=("eval",)) is None
    assert store.claim_job(worker_id="w", free=1, gpu_mode=False).id == low.id
    assert store.claim_job(worker_id="w", free=1, gpu_mode=False) is None


def test_enqueue_training_checks_and_schedules(store, assistant):
    with pytest.raises(JobError, match="no approved examples"):
        enqueue_training(store, assistant.id)
    add_examples(store, assistant.id, 2)
    later = enqueue_training(store, assistant.id, at="2999-01-01 02:00:00", priority=3, created_by=1, tg_chat_id=77)
    assert (later.status, later.scheduled_at, later.priority, later.tg_chat_id) == (
        "scheduled", "2999-01-01 02:00:00", 3, 77)
    now = enqueue_training(store, assistant.id, at="2000-01-01 00:00:00")  # past: run now
    assert now.status == "queued"
    with pytest.raises(JobError, match=f"already queued as job #{now.id}"):
        enqueue_training(store, assistant.id)


def test_cancelled_queued_job_never_starts(store, assistant):
    add_examples(store, assistant.id, 2)
    job = enqueue_training(store, assistant.id)
    cancelled = cancel_job(store, job.id, by=1)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    assert store.claim_job(worker_id="w", free=1, gpu_mode=False) is None
    with pytest.raises(JobError, match="already cancelled"):
        cancel_job(store, job.id)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_recover_requeues_jobs_of_dead_workers_then_fails_them(db_path, assistant):
    clock = Clock()
    store = Store(open_db(db_path), clock=clock)
    a = store.create_job("eval", assistant_id=assistant.id, max_attempts=2)
    b = store.create_job("eval", assistant_id=assistant.id, max_attempts=2)
    remote = store.create_job("eval", assistant_id=assistant.id)
    alive = store.create_job("eval", assistant_id=assistant.id)
    dead = f"{socket.gethostname()}:{_dead_pid()}:abc"
    store.claim_job(worker_id=dead, free=1, gpu_mode=False)  # a, attempt 1
    store.claim_job(worker_id=dead, free=1, gpu_mode=False)  # b
    store.update_job(b.id, attempts=2)  # b is on its last attempt
    store.claim_job(worker_id="otherhost:1:x", free=1, gpu_mode=False)
    store.claim_job(worker_id=f"{socket.gethostname()}:{__import__('os').getpid()}:me", free=1, gpu_mode=False)
    clock.advance(seconds=30)
    got = {j.id: j for j in recover_stale(store, stale_after_s=60)}
    assert set(got) == {a.id, b.id}  # the remote one's heartbeat is fresh; the live one is alive
    assert got[a.id].status == "queued" and "worker died" in got[a.id].error
    assert got[b.id].status == "failed" and "giving up" in got[b.id].error
    assert got[b.id].result["failure"] == {"code": "worker_died", "params": {}, "attempts": 2}
    clock.advance(seconds=60)
    assert [j.id for j in recover_stale(store, stale_after_s=60)] == [remote.id]
    assert store.get_job(alive.id).status == "running"
    again = store.claim_job(worker_id="w2", free=1, gpu_mode=False)
    assert again.id == a.id and again.attempts == 2


def test_event_bus_isolates_failing_subscribers(store, assistant):
    bus = EventBus()
    seen = []

    def broken(event):
        raise RuntimeError("boom")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(seen.append)
    job = store.create_job("eval", assistant_id=assistant.id)
    bus.publish(JobEvent("state", job))
    unsubscribe()
    bus.publish(JobEvent("state", job))
    assert [e.job.id for e in seen] == [job.id]


def test_watch_job_yields_changes_until_the_end(store, assistant):
    job = store.create_job("eval", assistant_id=assistant.id)
    script = iter([
        dict(status="running"),
        dict(progress={"step": 1, "total_steps": 3}),
        dict(),  # nothing changed: no yield
        dict(progress={"step": 3, "total_steps": 3}),
        dict(status="succeeded", result={"version_id": 1}),
    ])

    def sleep(_):
        store.update_job(job.id, **next(script))

    seen = [(j.status, j.progress.get("step")) for j in watch_job(store, job.id, interval=0, sleep=sleep)]
    assert seen == [("queued", None), ("running", None), ("running", 1), ("running", 3), ("succeeded", 3)]


def test_beats_and_versions_promote_and_roll_back(store, assistant):
    assert beats({"accuracy": 0.5, "f1": 0.1}, {"accuracy": 0.4, "f1": 0.9})
    assert beats({"accuracy": 0.5, "f1": 0.2}, {"accuracy": 0.5, "f1": 0.1})
    assert not beats({"accuracy": 0.5, "f1": 0.1}, {"accuracy": 0.5, "f1": 0.1})
    assert not beats({}, {"accuracy": 0.1})
    assert beats({"accuracy": 0.0}, None)
    v1, v2, v3 = (store.add_model_version(assistant.id, adapter_path=f"/a/{i}", base_model="m") for i in range(3))
    with pytest.raises(JobError, match="no earlier active version"):
        rollback(store, assistant.id)
    promote_version(store, v1.id)
    promote_version(store, v2.id)
    assert store.get_assistant(assistant.id).active_version_id == v2.id
    assert rollback(store, assistant.id).id == v1.id
    assert store.get_model_version(v2.id).status == "archived"
    assert rollback(store, assistant.id, to=v3.id).id == v3.id
    assert store.get_assistant(assistant.id).active_version_id == v3.id
    other = store.create_assistant("other")
    with pytest.raises(JobError, match="another assistant"):
        rollback(store, other.id, to=v1.id)


def test_auto_promotion_compares_with_what_answers_now(store, assistant):
    from tuning.jobs.executors import _maybe_promote

    v = store.add_model_version(assistant.id, adapter_path="/a/1", base_model="m")
    evaluation = {"n": 4, "modes": {"base": {"accuracy": 0.25, "f1": 0.3}, "tuned": {"accuracy": 0.5, "f1": 0.4}}}
    assert _maybe_promote(store, assistant, v, None) == (
        False, "no test examples to compare on; promote it by hand")
    promoted, why = _maybe_promote(store, assistant, v, evaluation)
    assert promoted and why == "beat the base model (0.5 > 0.25)"
    assert store.get_assistant(assistant.id).active_version_id == v.id
    worse = store.add_model_version(assistant.id, adapter_path="/a/2", base_model="m")
    evaluation["modes"]["tuned"]["accuracy"] = 0.25
    evaluation["modes"]["tuned"]["f1"] = 0.2
    store.update_assistant(assistant.id, active_version_id=None)  # compare with the base model again
    promoted, why = _maybe_promote(store, store.get_assistant(assistant.id), worse, evaluation)
    assert not promoted and why == "did not beat the base model (0.25 vs 0.25)"
    assert store.get_model_version(worse.id).status == "candidate"
