"""Jobs, in the order a job goes: `queue` (the `jobs` table; `scheduler` enqueues periodic runs), the `worker`
claims it and runs it in a subprocess (`local`, `child`) or as a Ray task (`ray_executor`); `executors` is what
each kind does there (reporting `progress`, judged by `evaluation`), and `versions` registers and promotes the
model version it made; `events` tells the bot."""

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
