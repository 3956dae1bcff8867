"""Time: scheduled jobs, quiet hours, and periodic retraining policies (cron + minimum new examples)."""

from __future__ import annotations

import datetime as dt
import logging
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from storage import Job, Store
from storage.common import parse_time
from tuning.jobs.queue import JobError, enqueue_training

log = logging.getLogger(__name__)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise JobError(f"unknown timezone {name!r}; use a name like Europe/Moscow") from None


def next_clock_time(hour: int, minute: int, *, timezone: str, now: dt.datetime | None = None) -> dt.datetime:
    """The next hour:minute on the clock of `timezone` (today, else tomorrow), as an aware datetime: one rule
    for the CLI's `--at HH:MM` and the bot's "pick a time" and "tonight"."""
    tz = zone(timezone)
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(tz)
    when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return when if when > now else when + dt.timedelta(days=1)


def parse_quiet_hours(text: str) -> tuple[dt.time, dt.time] | None:
    """'22:00-06:00' -> (22:00, 06:00); '' -> None."""
    if not text:
        return None
    try:
        start, end = (dt.time.fromisoformat(part.strip()) for part in text.split("-"))
    except ValueError:
        raise JobError(f"quiet hours must look like 09:00-18:00, got {text!r}") from None
    return start, end


def is_quiet(now: dt.datetime, quiet_hours: str, timezone: str = "UTC") -> bool:
    """Whether `now` (aware) falls in the quiet hours, read in `timezone`; the range may wrap midnight."""
    parsed = parse_quiet_hours(quiet_hours)
    if parsed is None:
        return False
    start, end = parsed
    local = now.astimezone(zone(timezone)).time().replace(tzinfo=None)
    if start <= end:
        return start <= local < end
    return local >= start or local < end


_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _weekdays(field: str) -> str:
    """Crontab weekdays (0 or 7 = Sunday) as names; APScheduler 3 counts from Monday = 0."""
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.lower().split(","):
        part, _, step = part.partition("/")
        if part == "*":
            lo, hi = 0, 6
        else:
            lo_s, _, hi_s = part.partition("-")
            lo = _DAYS.index(lo_s[:3]) if lo_s[:3] in _DAYS else int(lo_s)
            hi = (_DAYS.index(hi_s[:3]) if hi_s[:3] in _DAYS else int(hi_s)) if hi_s else lo
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi):
            raise ValueError(f"bad weekday {part!r}")
        days.update(d % 7 for d in range(lo, hi + 1, int(step or 1)))
    return ",".join(_DAYS[d] for d in sorted(days))


def cron_trigger(cron: str, timezone: str = "UTC") -> CronTrigger:
    """An APScheduler trigger from a 5-field crontab line ('0 3 * * 1' = Mondays 03:00)."""
    try:
        fields = cron.split()
        if len(fields) != 5:
            raise ValueError(f"expected 5 fields, got {len(fields)}")
        minute, hour, day, month, weekday = fields
        return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=_weekdays(weekday),
                           timezone=zone(timezone))
    except ValueError as exc:
        raise JobError(f"not a valid cron line {cron!r} ({exc}); "
                       "use 5 fields: minute hour day month weekday, e.g. '0 3 * * 1'") from None


def next_fire(cron: str, after: dt.datetime, timezone: str = "UTC") -> dt.datetime | None:
    """The first time strictly after `after` at which the cron line fires."""
    trigger = cron_trigger(cron, timezone)
    return trigger.get_next_fire_time(None, after + dt.timedelta(seconds=1))


def new_examples_since_active(store: Store, assistant_id: int) -> int:
    """Approved examples added or approved since the active version's training started."""
    assistant = store.get_assistant(assistant_id)
    since = None
    if assistant.active_version_id:
        version = store.get_model_version(assistant.active_version_id)
        since = version.created_at
        if version.job_id:
            job = store.get_job(version.job_id)
            since = job.started_at or since
    return store.count_approved_since(assistant_id, since)


class Scheduler:
    """Driven by `tick()` (the worker calls it every loop), so tests control time through the store's clock."""

    def __init__(self, store: Store, *, timezone: str = "UTC", max_attempts: int = 3, gpus: int = 0) -> None:
        self.store = store
        self.timezone = timezone
        self.max_attempts = max_attempts
        self.gpus = gpus  # per training run it starts; several train data-parallel

    def tick(self) -> list[Job]:
        """Release due scheduled jobs and fire due retraining policies; returns jobs made queued."""
        released = [self.store.get_job(i) for i in self.store.release_due_jobs()]
        return released + self.fire_policies()

    def fire_policies(self) -> list[Job]:
        """Each enabled policy whose cron time has passed since its last check enqueues a run if enough is new."""
        now = self.store.clock()
        started = []
        for policy in self.store.list_retrain_policies():
            last = parse_time(policy.last_run_at or policy.created_at)
            due = next_fire(policy.cron, last, self.timezone)
            if due is None or due > now:
                continue
            # Several missed fire times (the machine was off) coalesce into one check.
            self.store.mark_policy_run(policy.assistant_id)
            new = new_examples_since_active(self.store, policy.assistant_id)
            if new < policy.min_new:
                log.info("policy of assistant #%s: %d new examples < %d, not retraining",
                         policy.assistant_id, new, policy.min_new)
                continue
            try:
                job = enqueue_training(self.store, policy.assistant_id, max_attempts=self.max_attempts,
                                       gpus=self.gpus,
                                       params={"reason": f"policy {policy.cron!r}: {new} new examples"})
            except JobError as exc:
                log.info("policy of assistant #%s skipped: %s", policy.assistant_id, exc)
                continue
            started.append(job)
        return started


def set_policy(store: Store, assistant_id: int, *, cron: str, min_new: int = 1, enabled: bool = True,
               timezone: str = "UTC"):
    """Validate the cron line and store the assistant's retraining policy (it survives restarts)."""
    cron_trigger(cron, timezone)
    if min_new < 0:
        raise JobError("the number of new examples that starts a run must be 0 or more", code="min_new_negative")
    return store.set_retrain_policy(assistant_id, cron=cron, min_new=min_new, enabled=enabled)
