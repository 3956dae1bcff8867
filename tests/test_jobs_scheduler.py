"""Time with a controllable clock: scheduled jobs, quiet hours, periodic retraining policies, restarts."""

from __future__ import annotations

import datetime as dt

import pytest

from storage import Store, open_db
from tuning.jobs import JobError, Scheduler, Worker, enqueue_training, is_quiet, next_fire, set_policy
from jobs_helpers import Clock, add_examples


def utc(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc)


def test_quiet_hours_wrap_midnight_and_follow_the_timezone():
    assert is_quiet(utc("2026-06-01 23:30"), "22:00-06:00")
    assert is_quiet(utc("2026-06-01 05:59"), "22:00-06:00")
    assert not is_quiet(utc("2026-06-01 06:00"), "22:00-06:00")
    assert is_quiet(utc("2026-06-01 10:00"), "09:00-18:00")
    assert not is_quiet(utc("2026-06-01 10:00"), "")
    # 06:30 UTC is 09:30 in Moscow (UTC+3): inside 09:00-18:00 there, not in UTC.
    assert is_quiet(utc("2026-06-01 06:30"), "09:00-18:00", "Europe/Moscow")
    assert not is_quiet(utc("2026-06-01 06:30"), "09:00-18:00", "UTC")
    with pytest.raises(JobError):
        is_quiet(utc("2026-06-01 06:30"), "9-18")


def test_next_fire_reads_cron_in_the_timezone():
    assert next_fire("0 3 * * 1", utc("2026-06-01 02:00")) == utc("2026-06-01 03:00")  # a Monday
    assert next_fire("0 3 * * 1", utc("2026-06-01 03:00")) == utc("2026-06-08 03:00")
    assert next_fire("0 3 * * *", utc("2026-06-01 12:00"), "Europe/Moscow") == utc("2026-06-02 00:00")
    with pytest.raises(JobError, match="cron"):
        next_fire("every monday", utc("2026-06-01 12:00"))


def test_scheduled_job_is_queued_at_its_time(db_path, assistant):
    clock = Clock("2026-06-01 12:00:00")
    store = Store(open_db(db_path), clock=clock)
    add_examples(store, assistant.id, 2)
    job = enqueue_training(store, assistant.id, at=utc("2026-06-02 02:00"))
    assert job.status == "scheduled"
    clock.set("2026-06-02 01:59:59")
    assert Scheduler(store).tick() == []
    clock.set("2026-06-02 02:00:00")
    assert [j.id for j in Scheduler(store).tick()] == [job.id]
    assert store.get_job(job.id).status == "queued"


def test_worker_does_not_start_training_in_quiet_hours(db_path, assistant, tmp_path):
    clock = Clock("2026-06-01 23:00:00")
    store = Store(open_db(db_path), clock=clock)
    add_examples(store, assistant.id, 2)
    job = enqueue_training(store, assistant.id, at=utc("2026-06-02 02:00"))
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=0, quiet_hours="01:00-06:00", clock=clock)
    clock.set("2026-06-02 02:00:00")  # due, but quiet
    worker.run_once()
    assert store.get_job(job.id).status == "queued" and worker.running == []
    clock.set("2026-06-02 05:59:00")
    worker.run_once()
    assert worker.running == []
    clock.set("2026-06-02 06:00:00")
    worker.run_once()
    try:
        assert worker.running == [job.id]
        assert store.get_job(job.id).status == "running"
    finally:
        worker.shutdown()  # stops the just-started process and requeues the job uncharged
    after = store.get_job(job.id)
    assert (after.status, after.attempts) == ("queued", 0)


def test_periodic_policy_fires_only_with_enough_new_examples_and_survives_restart(db_path, assistant):
    clock = Clock("2026-05-31 12:00:00")  # a Sunday
    store = Store(open_db(db_path), clock=clock)
    add_examples(store, assistant.id, 2, prefix="old")
    set_policy(store, assistant.id, cron="0 3 * * 1", min_new=3)  # Mondays 03:00
    clock.set("2026-06-01 02:59:00")
    assert Scheduler(store).fire_policies() == []
    clock.set("2026-06-01 03:00:30")
    assert Scheduler(store).fire_policies() == []  # fired, but only 2 new examples < 3
    assert store.get_retrain_policy(assistant.id).last_run_at == "2026-06-01 03:00:30"
    add_examples(store, assistant.id, 2, prefix="new")
    clock.set("2026-06-01 04:00:00")
    assert Scheduler(store).fire_policies() == []  # not due again until next Monday

    # Restart: a new connection and scheduler see the policy from the database.
    restarted = Store(open_db(db_path), clock=clock)
    clock.set("2026-06-29 09:00:00")  # three Mondays were missed while down: one run, not three
    jobs = Scheduler(restarted, gpus=2, max_attempts=5).fire_policies()  # TUNEBOT_TRAIN_GPUS, _JOB_MAX_ATTEMPTS
    assert len(jobs) == 1 and jobs[0].kind == "train" and "4 new examples" in jobs[0].params["reason"]
    assert (jobs[0].gpus, jobs[0].max_attempts) == (2, 5)
    assert Scheduler(restarted).fire_policies() == []


def test_policy_counts_only_examples_since_the_active_version(db_path, assistant):
    clock = Clock("2026-05-31 12:00:00")
    store = Store(open_db(db_path), clock=clock)
    add_examples(store, assistant.id, 5, prefix="before")
    clock.advance(hours=1)
    version = store.add_model_version(assistant.id, adapter_path="/x", base_model="m")
    store.activate_version(version.id)
    set_policy(store, assistant.id, cron="0 3 * * *", min_new=2)
    clock.advance(hours=1)
    add_examples(store, assistant.id, 1, prefix="after")
    clock.set("2026-06-01 03:00:00")
    assert Scheduler(store).fire_policies() == []
    clock.advance(hours=1)
    pending = store.add_example(assistant.id, "a pending one?", "yes", status="pending")
    store.approve(pending.id)  # approval counts as new
    clock.set("2026-06-02 03:00:00")
    assert len(Scheduler(store).fire_policies()) == 1


def test_cron_weekdays_follow_crontab_numbering():
    # 2026-06-07 is a Sunday: crontab 0 and 7 both mean Sunday, 1-5 Monday to Friday.
    assert next_fire("0 9 * * 0", utc("2026-06-01 12:00")) == utc("2026-06-07 09:00")
    assert next_fire("0 9 * * 7", utc("2026-06-01 12:00")) == utc("2026-06-07 09:00")
    assert next_fire("0 9 * * 1-5", utc("2026-06-05 12:00")) == utc("2026-06-08 09:00")
    assert next_fire("0 9 * * sat", utc("2026-06-01 12:00")) == utc("2026-06-06 09:00")
    assert next_fire("0 0 1 */3 *", utc("2026-06-01 12:00")) == utc("2026-07-01 00:00")  # quarterly
