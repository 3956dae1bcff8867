"""Job notifications: a DB-polling watcher (what the bot and the CLI use: it works across processes), and an
in-process bus the worker publishes each state and progress change on, for code running beside it (tests
observe the order of a worker's transitions through it)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from storage import Job, Store

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """`kind` is "state" (the status changed) or "progress" (step, loss, ETA changed)."""

    kind: str
    job: Job


class EventBus:
    """Synchronous publish/subscribe; callbacks run on the publisher's thread (the worker's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[JobEvent], None]] = []

    def subscribe(self, callback: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call `callback(event)` for every event; returns a function that unsubscribes."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def publish(self, event: JobEvent) -> None:
        """Deliver to every subscriber; a failing subscriber is logged and does not stop the others."""
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("job event subscriber %r failed", callback)


bus = EventBus()


def subscribe(callback: Callable[[JobEvent], None]) -> Callable[[], None]:
    """Subscribe to the process-wide bus: events of the workers running in this process."""
    return bus.subscribe(callback)


def _signature(job: Job) -> tuple:
    return (job.status, repr(sorted(job.progress.items())), job.error, repr(sorted(job.result.items())))


def watch_job(store: Store, job_id: int, *, interval: float = 1.0, timeout: float | None = None,
              sleep: Callable[[float], None] = time.sleep) -> Iterator[Job]:
    """Yield the job each time its status, progress, error or result changes, until it ends.

    It polls the database, the source of truth, so it works from any process.
    """
    last = None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = store.get_job(job_id)
        sig = _signature(job)
        if sig != last:
            last = sig
            yield job
        if job.status in TERMINAL:
            return
        if deadline is not None and time.monotonic() > deadline:
            return
        sleep(interval)
