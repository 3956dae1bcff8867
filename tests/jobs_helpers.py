"""Helpers for the job tests: a controllable clock, assistants with examples, running a worker to the end."""

from __future__ import annotations

import datetime as dt
import time

from storage import Store, open_db


class Clock:
    """A clock the test moves by hand (aware UTC datetimes)."""

    def __init__(self, start: str = "2026-06-01 12:00:00") -> None:
        self.now = dt.datetime.strptime(start, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, when: str) -> None:
        self.now = dt.datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)

    def advance(self, **kw) -> None:
        self.now += dt.timedelta(**kw)


def add_examples(store: Store, assistant_id: int, n: int = 6, *, test: int = 0, prefix: str = "q") -> None:
    for i in range(n):
        store.add_example(assistant_id, f"{prefix} question number {i}?", f"Answer {i} is {i * 7}.")
    for i in range(test):
        store.add_example(assistant_id, f"{prefix} test question {i}?", f"Answer {i} is {i * 7}.",
                          split="test", must_contain=[str(i * 7)])


def tiny_params(model_dir: str, **config) -> dict:
    """Job params for a fast training run of the tiny random model."""
    return {"base_model": model_dir, "config": {"epochs": 1, **config}, "eval_max_new_tokens": 8}


def run_until(worker, predicate, *, timeout: float = 120.0, every: float = 0.2) -> None:
    """Drive `worker.run_once()` until `predicate()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.run_once()
        if predicate():
            return
        time.sleep(every)
    raise AssertionError("timed out waiting for the worker")


def fresh_store(db_path) -> Store:
    return Store(open_db(db_path))
