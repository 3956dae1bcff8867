"""The job queue on the `jobs` table: enqueue, cancel, and recovery of jobs left by dead workers."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid

from storage import Job, Store
from storage.common import fmt_time
from tuning import exitcodes
from tuning.errors import TuningError
from tuning.jobs.events import TERMINAL

log = logging.getLogger(__name__)

ACTIVE = ("scheduled", "queued", "running")
EXIT_USER_ERROR = exitcodes.USER_ERROR  # a job process that cannot succeed as asked (bad data, settings): no retry
EXIT_STOPPED = exitcodes.STOPPED  # stopped early (SIGTERM, cancelled, worker gone): the worker decides what is next


class JobError(TuningError):
    """A job cannot be created, cancelled or run as asked."""


def domain_failure(exc: BaseException) -> dict:
    """A TuningError or StorageError that failed a job, as its result["failure"]: the error's own code and
    params (the bot's catalogue key is "error_<code>"), so that a front end words it in its user's language."""
    return {"code": "domain", "params": {}, "error": {"code": getattr(exc, "code", ""),
                                                     "params": dict(getattr(exc, "params", {}) or {})}}


def new_worker_id() -> str:
    """host:pid:random, so a worker on the same host can tell whether the owner is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _when(at: dt.datetime | str | None) -> str | None:
    if at is None or isinstance(at, str):
        return at
    if at.tzinfo is None:
        raise JobError("a scheduled time needs a timezone")
    return fmt_time(at)


def enqueue_training(store: Store, assistant_id: int, *, at: dt.datetime | str | None = None,
                     priority: int = 0, params: dict | None = None, created_by: int | None = None,
                     tg_chat_id: int | None = None, gpus: int = 0, max_attempts: int = 3) -> Job:
    """Queue (or schedule, with `at`) a training run of the assistant's approved examples."""
    assistant = store.get_assistant(assistant_id)
    if store.count_approved_since(assistant_id, None) == 0:
        raise JobError(f"assistant {assistant.name!r} has no approved examples yet; add or import some first",
                       code="no_approved_examples", params={"name": assistant.name})
    busy = [j for j in store.list_jobs(assistant_id=assistant_id, status=("queued", "running")) if j.kind == "train"]
    if busy and at is None:
        raise JobError(f"training of {assistant.name!r} is already {busy[0].status} as job #{busy[0].id}; "
                       f"wait for it or cancel job #{busy[0].id}", code="training_busy",
                       params={"name": assistant.name, "id": busy[0].id})
    return _create(store, "train", assistant_id, at=at, priority=priority, params=params,
                   created_by=created_by, tg_chat_id=tg_chat_id, gpus=gpus, max_attempts=max_attempts)


def enqueue_generation(store: Store, assistant_id: int, *, per_example: int = 3, seed: int = 0,
                       at: dt.datetime | str | None = None, priority: int = 0,
                       created_by: int | None = None, tg_chat_id: int | None = None) -> Job:
    """Queue a run that proposes rule-based variations (mutations) of the approved examples."""
    store.get_assistant(assistant_id)
    return _create(store, "generate", assistant_id, at=at, priority=priority,
                   params={"method": "mutation", "per_example": per_example, "seed": seed},
                   created_by=created_by, tg_chat_id=tg_chat_id, gpus=0, max_attempts=1)


def _create(store: Store, kind: str, assistant_id: int, *, at, priority, params, created_by, tg_chat_id,
            gpus, max_attempts) -> Job:
    scheduled_at = _when(at)
    if scheduled_at is not None and scheduled_at <= store.now():
        scheduled_at = None  # a time in the past means "now"
    job = store.create_job(kind, assistant_id=assistant_id, params=params or {}, priority=priority, gpus=gpus,
                           scheduled_at=scheduled_at, max_attempts=max_attempts, created_by=created_by)
    if tg_chat_id is not None:
        job = store.update_job(job.id, tg_chat_id=tg_chat_id)
    return job


def cancel_job(store: Store, job_id: int, *, by: int | None = None) -> Job:
    """Cancel a job: a waiting one never starts; the worker running one stops its process within seconds."""
    job = store.get_job(job_id)
    if job.status in TERMINAL:
        raise JobError(f"job #{job_id} has already {job.status}")
    if not store.transition_job(job_id, from_states=ACTIVE, status="cancelled", finished_at=store.now(),
                                error=f"cancelled by {'user ' + str(by) if by else 'request'}"):
        raise JobError(f"job #{job_id} has already {store.get_job(job_id).status}")
    store.audit("job.cancel", user_id=by, assistant_id=job.assistant_id, details={"job_id": job_id})
    return store.get_job(job_id)


def _worker_alive(worker_id: str | None) -> bool | None:
    """True/False for a worker on this host; None when it runs elsewhere (only its heartbeat tells)."""
    try:
        host, pid, _ = (worker_id or "").split(":")
        pid = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fp:
            return fp.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def kill_orphan(job: Job) -> None:
    """SIGKILL the job's child process if it still runs (checked by its command line, not just its pid)."""
    if not job.pid:
        return
    try:
        with open(f"/proc/{job.pid}/cmdline", "rb") as fp:
            cmdline = fp.read().split(b"\0")
    except OSError:
        return
    if b"tuning.jobs.child" in cmdline and str(job.id).encode() in cmdline:
        try:
            os.kill(job.pid, 9)
        except ProcessLookupError:
            pass


def recover_stale(store: Store, *, stale_after_s: float = 60.0, exclude_worker: str | None = None) -> list[Job]:
    """Requeue running jobs whose worker is dead (attempts permitting), else fail them; returns them."""
    now = store.clock()
    recovered = []
    for job in store.list_jobs(status="running"):
        if job.worker_id == exclude_worker:
            continue
        alive = _worker_alive(job.worker_id)
        if alive is None:
            beat = job.heartbeat_at or job.started_at
            alive = beat is not None and (now - dt.datetime.strptime(beat, "%Y-%m-%d %H:%M:%S").replace(
                tzinfo=dt.timezone.utc)).total_seconds() < stale_after_s
        if alive:
            continue
        kill_orphan(job)
        if job.attempts >= job.max_attempts:
            ok = store.transition_job(job.id, from_states=("running",), status="failed", finished_at=store.now(),
                                      pid=None, error=f"its worker died during attempt {job.attempts} of "
                                                      f"{job.max_attempts}; giving up",
                                      result={**(job.result or {}), "failure": {
                                          "code": "worker_died", "params": {}, "attempts": job.attempts}})
        else:
            ok = store.transition_job(job.id, from_states=("running",), status="queued", pid=None,
                                      worker_id=None, devices=None,
                                      error=f"requeued: its worker died during attempt {job.attempts}")
        if ok:
            log.warning("job #%s was left running by dead worker %s: %s", job.id, job.worker_id,
                        store.get_job(job.id).status)
            recovered.append(store.get_job(job.id))
    return recovered


def prune_workers(store: Store, *, stale_after_s: float = 60.0) -> list[str]:
    """Forget registered workers that are dead (same host) or silent for `stale_after_s`; returns their ids."""
    cutoff = fmt_time(store.clock() - dt.timedelta(seconds=stale_after_s))
    gone = [w["id"] for w in store.live_workers(since="")
            if _worker_alive(w["id"]) is False or (w["heartbeat_at"] or "") < cutoff]
    for worker_id in gone:
        store.remove_worker(worker_id)
    return gone
