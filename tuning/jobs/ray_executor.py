"""The `ray` executor: portable jobs run as Ray tasks on a cluster; the worker stays the only DB writer.

The worker reads a job's spec from the database, submits `execute_remote(spec, channel, …)` asking for
the job's GPUs, and drains the progress that the task sends to a `JobChannel` actor into jobs.progress.
When the task's result arrives it records it exactly like a local child's (tuning.jobs.executors).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from storage import Job, Store
from tuning import exitcodes
from tuning.jobs import executors
from tuning.jobs.progress import db_progress_sink
from tuning.jobs.queue import EXIT_STOPPED, EXIT_USER_ERROR

log = logging.getLogger(__name__)

EXIT_TASK_DIED = exitcodes.INCOMPLETE  # like a crashed local child: retried while attempts are left


class JobChannel:
    """A Ray actor between the tasks and the worker: the latest progress of each job, and stop requests."""

    def __init__(self) -> None:
        self.progress: dict[int, dict] = {}
        self.stops: set[int] = set()

    def put(self, job_id: int, progress: dict) -> None:
        self.progress[job_id] = progress

    def drain(self) -> dict[int, dict]:
        out, self.progress = self.progress, {}
        return out

    def stop(self, job_id: int) -> None:
        self.stops.add(job_id)

    def should_stop(self, job_id: int) -> bool:
        return job_id in self.stops

    def ping(self) -> bool:
        return True


class _RemoteStop:
    """should_stop inside a task: asks the channel at most once a second; True when the worker is gone."""

    def __init__(self, channel, job_id: int, *, every_s: float = 1.0) -> None:
        self.channel, self.job_id, self.every_s = channel, job_id, every_s
        self._last, self._stop = 0.0, False

    def __call__(self) -> bool:
        import ray

        if not self._stop and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            try:
                self._stop = ray.get(self.channel.should_stop.remote(self.job_id), timeout=30)
            except Exception:  # noqa: BLE001 - the channel (the worker) is gone: nobody wants the result
                self._stop = True
        return self._stop


def execute_remote(spec: dict, channel, *, artifacts: str, cache_dir: str | None) -> dict:
    """The body of the Ray task: run the job from its spec; returns {"status": ok|stopped|user_error, …}."""
    import os

    import ray

    from tuning.errors import TuningError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_id = spec["job_id"]
    node = ray.util.get_node_ip_address()
    where = {"node": node, "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    log.info("job #%s attempt %s on %s; CUDA_VISIBLE_DEVICES=%s", job_id, spec.get("attempt"), node,
             os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if cache_dir:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError:
            cache_dir = None  # not writable on this node: the default cache
    try:
        outcome = executors.run_job_spec(
            {**spec, "progress": {**(spec.get("progress") or {}), **where}}, artifacts=artifacts,
            cache_dir=cache_dir, progress_cb=lambda p: channel.put.remote(job_id, p),
            should_stop=_RemoteStop(channel, job_id))
        answer = {"status": "ok", "outcome": outcome}
    except executors.Stopped:
        answer = {"status": "stopped"}
    except TuningError as exc:
        answer = {"status": "user_error", "error": str(exc)}
    ray.get(channel.ping.remote())  # the actor runs one caller's calls in order: every put has landed
    return answer


class RayRun:
    """One job running as a Ray task; the same interface as the worker's local child process."""

    def __init__(self, executor: "RayExecutor", job: Job, ref, log_path: Path | None) -> None:
        self.executor, self.job_id, self.ref, self.log_path = executor, job.id, ref, log_path
        self.devices: tuple[int, ...] = ()
        self.pid = None
        self.term_at: float | None = None
        self.seen: tuple = ()
        self.returncode: int | None = None
        self.answer: dict | None = None
        self.error: str | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self.answer = ray.get(self.ref)
        except Exception as exc:  # noqa: BLE001 - task/worker/node died, cancelled: the worker decides
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.error = f"the Ray task died ({type(exc).__name__}{': ' + first[:200] if first else ''})"
            self.returncode = EXIT_TASK_DIED
            self._log(self.error)
            return self.returncode
        status = self.answer.get("status")
        self.returncode = {"ok": 0, "stopped": EXIT_STOPPED}.get(status, EXIT_USER_ERROR)
        if status == "user_error":
            self.error = self.answer.get("error")
            self._log(f"cannot run: {self.error}")
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"ray task of job #{self.job_id}", timeout)
            ray.wait([self.ref], timeout=0.5)
        return self.returncode

    def terminate(self) -> None:
        """Ask the task to stop at its next step (training checkpoints first)."""
        self.executor.channel.stop.remote(self.job_id)

    def kill(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)

    def cancel(self) -> None:
        """The job was cancelled: its result is discarded, so kill the task now."""
        self.kill()

    def reason(self, code: int) -> str:
        return self.error or ("stopped before the end" if code == EXIT_STOPPED else f"ended with code {code}")

    def failure(self, code: int) -> dict:
        """The reason as a catalogue code; the task's own error text stays in `error` and the job log."""
        return {"code": "ray_task", "params": {}}

    def complete(self, store: Store, job: Job) -> None:
        """Record the task's result like the local child does before exiting 0."""
        result = executors.record_outcome(store, job, self.answer["outcome"], auto_promote=self.executor.auto_promote,
                                          progress_cb=db_progress_sink(store, job.id))
        store.transition_job(job.id, from_states=("running",), result=result)
        self._log(f"done: {result}")

    def _log(self, line: str) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as fp:
                fp.write(line.rstrip() + "\n")


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody answers (ray.init would retry for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", ray://…: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise executors.JobError(f"no Ray cluster answers at {address} ({exc}); start one with "
                                 "`ray start --head` or fix TUNEBOT_RAY_ADDRESS") from None


class RayExecutor:
    """Connects to a Ray cluster, submits portable jobs as tasks, relays their progress."""

    def __init__(self, *, address: str, artifacts: str, cache_dir: str | None, default_base_model: str,
                 auto_promote: bool, namespace: str = "tunebot", worker_id: str = "") -> None:
        self.address = address
        self.worker_id = worker_id
        self.artifacts = artifacts
        self.cache_dir = cache_dir
        self.default_base_model = default_base_model
        self.auto_promote = auto_promote
        self.namespace = namespace
        self.channel = None
        self._remote = None
        self._owns_ray = False
        self.cluster_gpus = 0

    def connect(self) -> None:
        """ray.init (once) and the channel actor; `address` empty means a cluster started on this host."""
        if self.channel is not None:
            return
        try:
            import ray
        except ImportError:
            raise executors.JobError("the ray executor needs Ray: pip install 'tunebot[ray]'") from None
        if not ray.is_initialized():
            _check_reachable(self.address)
            try:
                ray.init(address=self.address or "auto", namespace=self.namespace, log_to_driver=False,
                         logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise executors.JobError(f"cannot connect to the Ray cluster at {self.address or 'auto'!r}: {exc}; "
                                         "start one with `ray start --head` or set TUNEBOT_RAY_ADDRESS") from None
            self._owns_ray = True
        self.cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        self.channel = ray.remote(JobChannel).options(num_cpus=0).remote()
        self._remote = ray.remote(execute_remote)
        log.info("connected to Ray at %s: %s", self.address or "auto", ray.cluster_resources())

    def tick(self, store: Store, running: set[int]) -> None:
        """Each pass of the worker: connect (once), and write the tasks' progress."""
        self.connect()
        self.drain(store, running)

    def launch(self, store: Store, job: Job, *, devices: tuple[int, ...] = (), log_path: Path | None) -> RayRun:
        """Submit the job as a task asking for its GPUs (one when it asks for none on a GPU cluster); `devices`
        are this host's and not used: the cluster's GPUs are."""
        from tuning.errors import TuningError
        from tuning.jobs.local import LaunchFailed
        from tuning.jobs.queue import domain_failure

        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as out:
                out.write(f"--- attempt {job.attempts} by {self.worker_id} on Ray at {self.address or 'auto'}\n")
        try:
            self.connect()
            spec = executors.job_spec(store, job, default_base_model=self.default_base_model,
                                      auto_promote=self.auto_promote)
            gpus = job.gpus or (1 if self.cluster_gpus else 0)
            ref = self._remote.options(num_cpus=1, num_gpus=gpus, max_retries=0, retry_exceptions=False,
                                       name=f"tunebot-job-{job.id}").remote(
                spec, self.channel, artifacts=self.artifacts, cache_dir=self.cache_dir)
        except TuningError as exc:  # bad data or settings: retrying cannot help
            raise LaunchFailed(str(exc), retry=False, failure=domain_failure(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the cluster hiccuped: like a crash, retried
            log.exception("job #%s could not be submitted to Ray", job.id)
            raise LaunchFailed(f"could not be submitted to Ray ({type(exc).__name__}: {exc})", retry=True,
                               failure={"code": "ray_submit", "params": {}}) from None
        return RayRun(self, job, ref, log_path)

    def drain(self, store: Store, running: set[int]) -> None:
        """Write the progress the tasks sent since the last call into jobs.progress."""
        if self.channel is None:
            return
        import ray

        for job_id, progress in ray.get(self.channel.drain.remote(), timeout=30).items():
            if job_id in running:
                store.transition_job(job_id, from_states=("running",), progress=progress)

    def close(self) -> None:
        if self.channel is None:
            return
        import ray

        self.channel = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
