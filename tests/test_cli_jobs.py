"""The job commands of the `tunebot` CLI, run in-process against a real database."""

from __future__ import annotations

import json
import re

import pytest

from bot.cli import main
from bot.cli.jobs import parse_at
from storage import Store, open_db
from jobs_helpers import add_examples


@pytest.fixture
def env(monkeypatch, tmp_path, db_path):
    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNEBOT_DATABASE", str(db_path))
    monkeypatch.setenv("TUNEBOT_TIMEZONE", "Europe/Moscow")
    monkeypatch.chdir(tmp_path)
    return Store(open_db(db_path))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_jobs_list_show_cancel(env, capsys):
    a = env.create_assistant("acme")
    add_examples(env, a.id, 2)
    job = env.create_job("train", assistant_id=a.id)
    code, out, _ = run(capsys, "jobs", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [job.id]
    code, out, _ = run(capsys, "jobs", "--assistant", "acme")
    assert code == 0 and f"#{job.id}" in out and "queued" in out
    code, out, _ = run(capsys, "jobs", "cancel", str(job.id))
    assert code == 0 and "cancelled" in out
    assert env.get_job(job.id).status == "cancelled"
    code, _, err = run(capsys, "jobs", "cancel", str(job.id))
    assert code == 2 and err.strip() == f"tunebot: error: job #{job.id} has already cancelled"
    code, _, err = run(capsys, "jobs", "show", "999")
    assert code == 2 and "job #999 not found" in err
    code, _, err = run(capsys, "jobs", "--assistant", "nope")
    assert code == 2 and "no assistant named 'nope'" in err


def test_versions_promote_rollback(env, capsys):
    a = env.create_assistant("acme")
    v1 = env.add_model_version(a.id, adapter_path="/m/1", base_model="b", metrics={"accuracy": 0.4})
    v2 = env.add_model_version(a.id, adapter_path="/m/2", base_model="b", metrics={"accuracy": 0.6})
    assert run(capsys, "promote", str(v1.id))[0] == 0
    code, out, _ = run(capsys, "promote", str(v2.id))
    assert code == 0 and f"version #{v2.id} is now active for acme" in out
    code, out, _ = run(capsys, "versions", "--assistant", "acme")
    assert f"* #{v2.id}" in out and "accuracy 0.6" in out
    code, out, _ = run(capsys, "rollback", "--assistant", "acme")
    assert code == 0 and f"version #{v1.id} is active" in out
    assert env.get_assistant(a.id).active_version_id == v1.id
    code, out, _ = run(capsys, "versions", "--assistant", "acme", "--json")
    assert {v["id"]: v["status"] for v in json.loads(out)} == {v1.id: "active", v2.id: "archived"}
    assert run(capsys, "promote", "42")[0] == 2


def test_schedule_sets_shows_and_validates(env, capsys):
    a = env.create_assistant("acme")
    code, out, _ = run(capsys, "schedule", "--assistant", "acme", "--cron", "0 3 * * 1", "--min-new", "5", "--json")
    info = json.loads(out)
    assert code == 0 and (info["cron"], info["min_new"], info["enabled"]) == ("0 3 * * 1", 5, True)
    assert info["next_check"].endswith("+03:00") and "T03:00:00" in info["next_check"]  # Moscow time
    assert env.get_retrain_policy(a.id).min_new == 5
    code, out, _ = run(capsys, "schedule", "--assistant", "acme")
    assert "when at least 5 new approved examples" in out
    code, _, err = run(capsys, "schedule", "--assistant", "acme", "--cron", "weekly")
    assert code == 2 and "not a valid cron line" in err
    assert run(capsys, "schedule", "--assistant", "acme", "--disable")[0] == 0
    assert env.get_retrain_policy(a.id).enabled == 0


def test_parse_at_reads_the_timezone():
    import datetime as dt

    now = dt.datetime(2026, 6, 1, 22, 0, tzinfo=dt.timezone.utc)  # 01:00 in Moscow on June 2
    assert parse_at("2026-12-01 02:00", timezone="Europe/Moscow", now=now).astimezone(dt.timezone.utc) == \
        dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.timezone.utc)
    assert parse_at("02:00", timezone="Europe/Moscow", now=now).astimezone(dt.timezone.utc) == \
        dt.datetime(2026, 6, 1, 23, 0, tzinfo=dt.timezone.utc)  # later tonight, not tomorrow


def test_train_assistant_at_schedules_in_the_timezone(env, capsys):
    a = env.create_assistant("acme")
    add_examples(env, a.id, 2)
    code, out, err = run(capsys, "train", "--assistant", "acme", "--at", "2099-12-01 02:00", "--epochs", "2",
                         "--json")
    assert code == 0, err
    job = json.loads(out)
    assert (job["status"], job["scheduled_at"], job["params"]) == (
        "scheduled", "2099-11-30 23:00:00", {"config": {"epochs": 2}})
    code, _, err = run(capsys, "train", "--assistant", "acme", "--at", "soon")
    assert code == 2 and "--at: expected" in err


def test_train_assistant_wait_runs_a_worker_here_and_activates_the_first_version(env, capsys, tiny_model_dir):
    a = env.create_assistant("acme", base_model=tiny_model_dir, system_prompt="Be brief.")
    add_examples(env, a.id, 4, test=1)
    code, out, err = run(capsys, "train", "--assistant", "acme", "--wait", "--epochs", "1", "--batch-tokens", "64")
    assert code == 0, err
    assert "no worker is running: running the job in this process" in err
    # Live progress lines while running (not a terminal here); how many steps are seen depends on speed.
    assert re.search(r"job #1 running .*step \d+/\d+", err), err
    version = env.list_model_versions(a.id)[0]
    # Nothing was active before, so the first version is (it cannot be worse than nothing trained).
    assert out.startswith(f"version #{version.id} registered: promoted to active")
    assert env.get_assistant(a.id).active_version_id == version.id
    assert version.metrics["n_test"] == 1 and "accuracy" in version.metrics
    assert env.get_job(version.job_id).params == {"config": {"epochs": 1, "batch_tokens": 64}}
