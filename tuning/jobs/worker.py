"""The worker: claims jobs, runs each in its own subprocess on its own GPUs, watches, retries, cancels."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from storage import Job, Store, ThreadStores
from storage.common import utcnow
from tuning.jobs import events
from tuning.jobs.executors import PORTABLE_KINDS
from tuning.jobs.local import LaunchFailed, LocalExecutor, job_log_path
from tuning.jobs.queue import EXIT_STOPPED, EXIT_USER_ERROR, new_worker_id, prune_workers, recover_stale
from tuning.jobs.scheduler import Scheduler, is_quiet

log = logging.getLogger(__name__)


def visible_gpus() -> list[int]:
    """GPU indices this process may use: CUDA_VISIBLE_DEVICES, else nvidia-smi's list, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return list(range(len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])))
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))


def live_workers(store: Store, *, within_s: float = 30.0) -> list[dict]:
    """Workers that sent a heartbeat in the last `within_s` seconds."""
    since = store.clock() - dt.timedelta(seconds=within_s)
    return store.live_workers(since=since.strftime("%Y-%m-%d %H:%M:%S"))


class Worker:
    """Runs queued jobs in subprocesses: one slot per GPU (or `slots` CPU slots), crash-safe, cancellable.

    With executor="ray", training and evaluation jobs run as Ray tasks on the cluster at `ray_address`
    (`slots` of them at once, default one per cluster GPU, else 1); this worker still writes every row.
    """

    def __init__(self, db_path: str | Path, *, artifacts: str | Path, cache_dir: str | Path | None = None,
                 executor: str = "local", ray_address: str = "", log_dir: str | Path | None = None,
                 gpus: int | Sequence[int] | None = None, slots: int = 0,
                 default_base_model: str = "bundled:smollm2-135m", auto_promote: bool = False,
                 quiet_hours: str = "", timezone: str = "UTC", max_attempts: int = 3, train_gpus: int = 0,
                 schedule: bool = True,
                 poll_interval: float = 0.5, heartbeat_s: float = 2.0, stale_after_s: float = 60.0,
                 grace_s: float = 5.0, shutdown_grace_s: float = 30.0, clock: Callable[[], dt.datetime] = utcnow,
                 bus: events.EventBus = events.bus, python: str = sys.executable) -> None:
        from tuning.artifacts import is_remote

        if executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, not {executor!r}")
        self.db_path = str(db_path)
        self.artifacts = str(artifacts) if is_remote(artifacts) else Path(artifacts)
        # Job logs stay on this host: next to the artifacts when they are local.
        self.log_dir = Path(log_dir) if log_dir else (
            Path(tempfile.gettempdir()) / "tunebot-logs" if is_remote(artifacts) else Path(artifacts))
        self.cache_dir = cache_dir
        self.executor = executor
        self.id = new_worker_id()
        # Every kind runs here as a subprocess; with executor="ray" the portable kinds run on the cluster.
        self._local = LocalExecutor(python=python, db_path=self.db_path, artifacts=self.artifacts,
                                    default_base_model=default_base_model, cache_dir=cache_dir,
                                    auto_promote=auto_promote, worker_id=self.id)
        self._ray = None
        self._ray_slots = slots
        if executor == "ray":
            from tuning.jobs.ray_executor import RayExecutor

            self._ray = RayExecutor(address=ray_address, artifacts=str(artifacts),
                                    cache_dir=str(cache_dir) if cache_dir else None,
                                    default_base_model=default_base_model, auto_promote=auto_promote,
                                    worker_id=self.id)
            gpus = 0  # this host's GPUs are not used: the cluster's are
        if gpus is None:
            gpus = visible_gpus()
        self.gpus = list(range(gpus)) if isinstance(gpus, int) else list(gpus)
        if slots and self.gpus:
            self.gpus = self.gpus[:slots]
        self.gpu_mode = bool(self.gpus)
        self.cpu_slots = max(1, slots) if not self.gpu_mode else 0
        self.default_base_model = default_base_model
        self.auto_promote = auto_promote
        self.quiet_hours = quiet_hours
        self.timezone = timezone
        self.max_attempts = max_attempts
        self.train_gpus = train_gpus  # for the runs its scheduler starts
        self.schedule = schedule
        self.poll_interval = poll_interval
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.grace_s = grace_s  # a cancelled job's result is discarded: kill it soon
        self.shutdown_grace_s = shutdown_grace_s  # a stopping worker lets training finish its step and checkpoint
        self.clock = clock
        self.bus = bus
        self.python = python
        self._children: dict = {}  # job id -> LocalRun or RayRun
        self._stores = ThreadStores(db_path, clock=clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._recovered = False
        self._last_beat = 0.0
        self._last_recover = 0.0

    # ------------------------------------------------------------ plumbing
    @property
    def store(self) -> Store:
        """One connection per thread (sqlite3 connections stay on the thread that opened them)."""
        return self._stores()

    @property
    def capacity(self) -> int:
        return len(self.gpus) if self.gpu_mode else self.cpu_slots

    def free_devices(self) -> list[int]:
        used = {d for c in self._children.values() for d in c.devices}
        return [g for g in self.gpus if g not in used]

    def free_slots(self) -> int:
        return len(self.free_devices()) if self.gpu_mode else self.cpu_slots - len(self._children)

    @property
    def running(self) -> list[int]:
        """Ids of the jobs whose processes this worker is running."""
        return sorted(self._children)

    def _publish(self, kind: str, job: Job) -> None:
        self.bus.publish(events.JobEvent(kind, job))

    # ------------------------------------------------------------ the loop
    def run_once(self) -> None:
        """One pass: recover, reap finished children, enforce cancels, heartbeat, schedule, start new jobs."""
        store = self.store
        mono = time.monotonic()
        if not self._recovered or mono - self._last_recover > self.stale_after_s / 2:
            for job in recover_stale(store, stale_after_s=self.stale_after_s, exclude_worker=self.id):
                self._publish("state", job)
            prune_workers(store, stale_after_s=self.stale_after_s)
            self._recovered, self._last_recover = True, mono
        for executor in self._executors:
            executor.tick(store, set(self._children))
        if self._ray is not None and not self._ray_slots:
            self.cpu_slots = max(1, self._ray.cluster_gpus)  # slots default to the cluster's GPU count
        self._reap(store)
        self._watch(store)
        if mono - self._last_beat >= self.heartbeat_s:
            now = store.now()
            store.worker_heartbeat(self.id, host=self.id.split(":")[0], pid=os.getpid(),
                                   slots=f"gpus {self.gpus}" if self.gpu_mode else f"{self.cpu_slots} cpu")
            for job_id in self._children:
                store.transition_job(job_id, from_states=("running",), heartbeat_at=now)
            self._last_beat = mono
        if self.schedule:
            for job in Scheduler(store, timezone=self.timezone, max_attempts=self.max_attempts,
                                 gpus=self.train_gpus).tick():
                self._publish("state", job)
        if not self._stop.is_set():
            self._start_jobs(store)

    @property
    def _executors(self) -> list:
        return [self._local] + ([self._ray] if self._ray is not None else [])

    def run_forever(self) -> None:
        """Loop until stop() (or SIGTERM handled by the caller); then stop the children and requeue their jobs."""
        self._stop.clear()
        log.info("worker %s: %s", self.id,
                 f"GPUs {self.gpus}" if self.gpu_mode else f"{self.cpu_slots} CPU slot(s)")
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:
                    log.exception("worker loop failed; retrying")
                self._stop.wait(self.poll_interval)
        finally:
            self.shutdown()
            self.store.remove_worker(self.id)

    def start(self) -> threading.Thread:
        """Run the loop in a background thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self.run_forever, name="tunebot-worker", daemon=True)
                self._thread.start()
            return self._thread

    def stop(self, *, timeout: float | None = None) -> None:
        """Ask the loop to end; waits for the background thread when there is one."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def shutdown(self) -> None:
        """Stop every child (SIGTERM, SIGKILL after the grace period) and requeue its job uncharged."""
        with self._lock:
            children, self._children = self._children, {}
        if not children:
            for executor in self._executors:
                executor.close()
            return
        store = self.store
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + self.shutdown_grace_s
        for child in children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    log.warning("job #%s did not stop after a kill", child.job_id)
        if self._ray is not None:
            self._ray.drain(store, set(children))  # the last progress the tasks sent
        for job_id, child in children.items():
            job = store.get_job(job_id)
            if child.returncode == 0 and job.status == "running":
                self._complete(store, job, child)
            elif store.transition_job(job_id, from_states=("running",), status="queued", pid=None, worker_id=None,
                                      devices=None, attempts=max(0, job.attempts - 1),
                                      error="requeued: the worker was stopped"):
                self._publish("state", store.get_job(job_id))
        for executor in self._executors:
            executor.close()

    # ------------------------------------------------------------ children
    def _start_jobs(self, store: Store) -> None:
        exclude = ("train",) if is_quiet(self.clock(), self.quiet_hours, self.timezone) else ()
        while self.free_slots() > 0:
            job = store.claim_job(worker_id=self.id, free=self.free_slots(), gpu_mode=self.gpu_mode,
                                  exclude_kinds=exclude)
            if job is None:
                return
            devices = tuple(self.free_devices()[:max(job.gpus or 0, 1)]) if self.gpu_mode else ()
            self._launch(store, job, devices)

    def _launch(self, store: Store, job: Job, devices: tuple[int, ...]) -> None:
        log_path = job_log_path(self.log_dir, job)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        executor = self._ray if self._ray is not None and job.kind in PORTABLE_KINDS else self._local
        try:
            run = executor.launch(store, job, devices=devices, log_path=log_path)
        except LaunchFailed as exc:
            if exc.retry:
                self._retry_or_fail(store, job, exc.reason, exc.failure or {})
                return
            failure = {"result": {**(job.result or {}), "failure": exc.failure}} if exc.failure else {}
            store.transition_job(job.id, from_states=("running",), status="failed", finished_at=store.now(),
                                 error=exc.reason, **failure)
            self._publish("state", store.get_job(job.id))
            return
        self._children[job.id] = run
        if run.pid is not None:  # a local child: its pid and devices, for `tunebot jobs` and recovery
            store.transition_job(job.id, from_states=("running",), pid=run.pid,
                                 devices=",".join(str(d) for d in devices))
        log.info("job #%s (%s) started: %s", job.id, job.kind,
                 f"pid {run.pid}, devices {list(devices)}" if run.pid is not None else "submitted to Ray")
        self._publish("state", store.get_job(job.id))

    def _watch(self, store: Store) -> None:
        """Publish progress; stop the process of a job that was cancelled (or taken away) in the database."""
        for child in list(self._children.values()):
            job = store.get_job(child.job_id)
            if job.status != "running" or job.worker_id != self.id:
                if child.term_at is None:
                    log.info("job #%s is %s: stopping %s", job.id, job.status, child.pid or "its Ray task")
                    child.cancel()
                    child.term_at = time.monotonic()
                elif time.monotonic() - child.term_at > self.grace_s:
                    child.kill()
                continue
            seen = (repr(sorted(job.progress.items())),)
            if seen != child.seen:
                child.seen = seen
                if job.progress:
                    self._publish("progress", job)

    def _reap(self, store: Store) -> None:
        for job_id, child in list(self._children.items()):
            code = child.poll()
            if code is None:
                continue
            del self._children[job_id]
            job = store.get_job(job_id)
            if job.status != "running" or job.worker_id != self.id:
                log.info("job #%s process ended (%s); job is %s", job_id, code, job.status)
                self._publish("state", job)
                continue
            if code == 0:
                self._complete(store, job, child)
            elif code == EXIT_USER_ERROR:
                store.transition_job(job_id, from_states=("running",), status="failed", pid=None,
                                     finished_at=store.now(), error=job.error or child.reason(code))
                self._publish("state", store.get_job(job_id))
            else:
                stopped = code == EXIT_STOPPED
                self._retry_or_fail(store, job, "stopped before the end" if stopped else child.reason(code),
                                    {"code": "stopped", "params": {}} if stopped else child.failure(code))

    def _complete(self, store: Store, job: Job, child) -> None:
        """Record the result (a Ray task's; a local child wrote its own) and mark the job succeeded."""
        try:
            child.complete(store, job)
        except Exception as exc:  # noqa: BLE001 - e.g. the database is locked: retry the job like a crash
            log.exception("job #%s: recording its result failed", job.id)
            self._retry_or_fail(store, store.get_job(job.id), f"its result could not be recorded ({exc})",
                                {"code": "not_recorded", "params": {}})
            return
        self._finish(store, job.id, child)

    def _finish(self, store: Store, job_id: int, child) -> None:
        store.transition_job(job_id, from_states=("running",), status="succeeded", pid=None,
                             finished_at=store.now(), error=None)
        log.info("job #%s succeeded", job_id)
        self._publish("state", store.get_job(job_id))

    def _retry_or_fail(self, store: Store, job: Job, reason: str, failure: dict) -> None:
        """Queue the job for another attempt, or fail it with `reason` (English, for logs and the CLI) and
        `failure` (result["failure"]: the same as a catalogue code, for the bot to word in Russian or English)."""
        if job.attempts < job.max_attempts:
            store.transition_job(job.id, from_states=("running",), status="queued", pid=None, worker_id=None,
                                 devices=None, error=f"attempt {job.attempts} of {job.max_attempts} {reason}; retrying")
            log.warning("job #%s attempt %s %s; requeued", job.id, job.attempts, reason)
        else:
            store.transition_job(job.id, from_states=("running",), status="failed", pid=None,
                                 finished_at=store.now(), error=f"{reason} (after {job.attempts} attempts)",
                                 result={**(job.result or {}), "failure": {**failure, "attempts": job.attempts}})
            log.error("job #%s failed: %s", job.id, reason)
        self._publish("state", store.get_job(job.id))
