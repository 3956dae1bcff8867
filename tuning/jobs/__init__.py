"""Jobs: a queue on the `jobs` table, a worker running each job in a subprocess, a scheduler, versions."""

from tuning.jobs.events import JobEvent, EventBus, bus, subscribe, watch_job, TERMINAL
from tuning.jobs.queue import JobError, enqueue_training, enqueue_generation, cancel_job, recover_stale
from tuning.jobs.scheduler import Scheduler, is_quiet, next_fire, set_policy, new_examples_since_active
from tuning.jobs.versions import promote_version, rollback, beats, register_candidate
from tuning.jobs.worker import Worker, live_workers, visible_gpus

__all__ = [
    "JobEvent", "EventBus", "bus", "subscribe", "watch_job", "TERMINAL",
    "JobError", "enqueue_training", "enqueue_generation", "cancel_job", "recover_stale",
    "Scheduler", "is_quiet", "next_fire", "set_policy", "new_examples_since_active",
    "promote_version", "rollback", "beats", "register_candidate",
    "Worker", "live_workers", "visible_gpus",
]
