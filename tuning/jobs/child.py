"""The process that runs one job: `python -m tuning.jobs.child --db PATH --job ID …` (started by the worker)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback

from tuning.training.distributed import die_with_parent
from tuning.jobs.queue import EXIT_STOPPED, EXIT_USER_ERROR, domain_failure

log = logging.getLogger("tuning.jobs.child")


class StopFlag:
    """Whether the job should stop: SIGTERM, the job no longer running in the DB, or the worker gone."""

    def __init__(self, store, job_id: int, *, parent_pid: int | None, check_every_s: float = 1.0) -> None:
        self.store = store
        self.job_id = job_id
        self.parent_pid = parent_pid
        self.check_every_s = check_every_s
        self.event = threading.Event()
        self._last_check = 0.0

    def __call__(self) -> bool:
        if self.event.is_set():
            return True
        now = time.monotonic()
        if now - self._last_check >= self.check_every_s:
            self._last_check = now
            if self.parent_pid and os.getppid() != self.parent_pid:
                self.event.set()
            elif self.store.get_job(self.job_id).status != "running":
                self.event.set()
        return self.event.is_set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.jobs.child", description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--job", type=int, required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--cache-dir")
    parser.add_argument("--base-model", default="bundled:smollm2-135m")
    parser.add_argument("--auto-promote", action="store_true")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return EXIT_STOPPED

    from storage import Store, StorageError, open_db
    from tuning.errors import TuningError
    from tuning.jobs import executors

    store = Store(open_db(args.db))
    stop = StopFlag(store, args.job, parent_pid=args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: stop.event.set())
    job = store.get_job(args.job)
    if job.status != "running":
        return EXIT_STOPPED
    log.info("job #%s (%s) attempt %s starting; CUDA_VISIBLE_DEVICES=%s", job.id, job.kind, job.attempts,
             os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    try:
        result = executors.run(store, job, artifacts=args.artifacts, cache_dir=args.cache_dir,
                               default_base_model=args.base_model, auto_promote=args.auto_promote,
                               should_stop=stop)
    except executors.Stopped:
        log.info("job #%s stopped", job.id)
        return EXIT_STOPPED
    except (TuningError, StorageError) as exc:
        log.error("job #%s cannot run: %s", job.id, exc)
        store.transition_job(job.id, from_states=("running",), error=str(exc),
                             result={**(job.result or {}), "failure": domain_failure(exc)})
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - anything else is retried by the worker
        traceback.print_exc()
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    store.transition_job(job.id, from_states=("running",), result=result)
    log.info("job #%s done: %s", job.id, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
