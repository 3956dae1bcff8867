"""A job's progress as it runs: training reports merged with the job's own (phase, evaluation counts, attempt),
sent to a sink at a bounded rate (the jobs table locally, a message to the worker from a Ray task)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Callable

from storage import Store

log = logging.getLogger(__name__)


class ProgressWriter:
    """on_progress for training: merges each report into the job's progress, sent at most every `every_s`.

    `sink(progress)` delivers it: a DB write in the local child, a message to the worker from a Ray task.
    """

    def __init__(self, sink: Callable[[dict], None], *, attempt: int, progress: dict | None = None,
                 every_s: float = 1.0, fault: dict | None = None) -> None:
        self.sink = sink
        self.attempt = attempt
        self.every_s = every_s
        self.fault = fault or {}
        self.progress: dict = dict(progress or {})
        self._last = 0.0

    def __call__(self, info: dict) -> None:
        self.progress.update({k: v for k, v in info.items() if _jsonable(v)})
        self.progress["attempt"] = self.attempt
        step, total = info.get("step"), info.get("total_steps")
        now = time.monotonic()
        if now - self._last >= self.every_s or (step is not None and step == total):
            self.flush()
        self._maybe_fault(step)

    def evaluating(self, mode: str, done: int, total: int) -> None:
        """on_progress for evaluation: which mode, how many questions answered."""
        self.progress.update(phase="evaluating", eval_mode=mode, eval_done=done, eval_total=total)
        if time.monotonic() - self._last >= self.every_s or done == total:
            self.flush()

    def phase(self, name: str) -> None:
        self.progress["phase"] = name
        self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        self.sink(dict(self.progress))

    def _maybe_fault(self, step: int | None) -> None:
        """Test-only fault injection (job params {"fault": {"kill_at_step": N, "on_attempts": [..]}})."""
        at = self.fault.get("kill_at_step")
        attempts = self.fault.get("on_attempts")
        if at is None or step is None or step < at:
            return
        if attempts is not None and self.attempt not in attempts:
            return
        self.flush()
        log.warning("fault injection: SIGKILL at step %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


def db_progress_sink(store: Store, job_id: int) -> Callable[[dict], None]:
    """A ProgressWriter sink that writes jobs.progress (only while the job is running)."""
    return lambda progress: store.transition_job(job_id, from_states=("running",), progress=progress)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
