"""Jobs run here, each in its own subprocess (`python -m tuning.jobs.child`): its environment, its start, and
what its exit status means. tuning.jobs.ray_executor runs the portable kinds on a Ray cluster instead."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from storage import Job, Store
from tuning.jobs.executors import job_key

ROOT = Path(__file__).resolve().parents[2]

# The bot's secrets, kept from job processes unless the job's kind needs them (no job talks to Telegram).
SECRET_NAMES = ("TELEGRAM_BOT_TOKEN", "OPENAI_API_KEY")
SECRET_PATTERN = re.compile(r"TUNEBOT_\w*(TOKEN|KEY|SECRET|PASSWORD)S?")
SECRETS_BY_KIND = {"generate": ("OPENAI_API_KEY", "TUNEBOT_OPENAI_API_KEY")}  # the larger model's endpoint


def job_environment(kind: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a job process of this kind starts with: `environ` without the secrets it does not need."""
    needed = SECRETS_BY_KIND.get(kind, ())
    return {name: value for name, value in environ.items()
            if name in needed or not (name in SECRET_NAMES or SECRET_PATTERN.fullmatch(name))}


def job_log_path(log_dir: str | Path, job: Job) -> Path:
    """A job's log: beside its artifacts folder, not inside it (that folder is what users download)."""
    return Path(log_dir) / f"{job_key(job)}.log"


class LaunchFailed(Exception):
    """A job could not be started; `retry` when another attempt may work (a cluster hiccup), else it fails."""

    def __init__(self, reason: str, *, retry: bool, failure: dict | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry, self.failure = reason, retry, failure


class LocalExecutor:
    """Runs every job kind as a subprocess of this worker, on the devices the worker gives it.

    tuning.jobs.ray_executor.RayExecutor has the same interface: tick(), launch(), close().
    """

    def __init__(self, *, python: str, db_path: str, artifacts, default_base_model: str, cache_dir,
                 auto_promote: bool, worker_id: str) -> None:
        self.python, self.db_path, self.artifacts = python, db_path, artifacts
        self.default_base_model, self.cache_dir, self.auto_promote = default_base_model, cache_dir, auto_promote
        self.worker_id = worker_id

    def tick(self, store: Store, running: set[int]) -> None:
        """Nothing to relay: a local child writes its own progress."""

    def launch(self, store: Store, job: Job, *, devices: tuple[int, ...], log_path: Path) -> "LocalRun":
        """Start the job's process on `devices`, its output appended to its log."""
        cmd = [self.python, "-m", "tuning.jobs.child", "--db", self.db_path, "--job", str(job.id),
               "--artifacts", str(self.artifacts), "--base-model", self.default_base_model,
               "--parent-pid", str(os.getpid())]
        if self.cache_dir:
            cmd += ["--cache-dir", str(self.cache_dir)]
        if self.auto_promote:
            cmd.append("--auto-promote")
        env = job_environment(job.kind, os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            with open(log_path, "ab") as out:
                out.write(f"--- attempt {job.attempts} by {self.worker_id} on devices {list(devices)}\n".encode())
                out.flush()
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
        except OSError as exc:
            raise LaunchFailed(f"could not start the job process: {exc}", retry=False) from None
        return LocalRun(job.id, proc, devices, log_path)

    def close(self) -> None:
        """Nothing held: the worker stops the children itself."""


def describe_exit(code: int, log_path: Path | None = None) -> str:
    """A reason a user can read for a child's exit status."""
    if code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else "?"
        if sig == signal.SIGKILL:
            return f"killed (signal 9, {name}: out of memory?)"
        return f"killed by signal {sig} ({name})"
    tail = ""
    if log_path is not None and log_path.exists():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        tail = f": {lines[-1].strip()[:300]}" if lines else ""
    return f"exited with code {code}{tail}"


def exit_failure(code: int) -> dict:
    """What describe_exit says, for a front end to word in its user's language: {"code", "params"}, where the
    bot's catalogue key is "jobfail_<code>" (the log's last line stays in the log and in `error`)."""
    if code < 0:
        if -code == signal.SIGKILL:
            return {"code": "killed_oom", "params": {}}
        return {"code": "killed_signal", "params": {"signal": -code}}
    return {"code": "exit_code", "params": {"code": code}}


@dataclass
class LocalRun:
    """A job running in a local subprocess (tuning.jobs.ray_executor.RayRun has the same interface)."""

    job_id: int
    proc: subprocess.Popen
    devices: tuple[int, ...]
    log_path: Path
    term_at: float | None = None
    seen: tuple = field(default=())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def cancel(self) -> None:
        """SIGTERM; the worker kills it after its grace period."""
        self.proc.terminate()

    def reason(self, code: int) -> str:
        return describe_exit(code, self.log_path)

    def failure(self, code: int) -> dict:
        return exit_failure(code)

    def complete(self, store: Store, job: Job) -> None:
        """Nothing to do: the child wrote the result before exiting 0."""
