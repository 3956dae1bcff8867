"""The Telegram progress message of a running job, in both languages."""

from __future__ import annotations

import re

from bot.telegram.progress import render_progress
from storage.records import Job


def running(progress: dict) -> Job:
    return Job(id=7, kind="train", assistant_id=1, status="running", progress=progress)


def test_running_job_shows_steps_loss_eta_and_where_it_runs():
    p = {"step": 5, "total_steps": 20, "epoch": 1, "loss": 1.25, "val_loss": None, "eta_s": 75}
    plain = render_progress(running(p), "en")
    assert "#7" in plain and "5" in plain and "20" in plain and "About 1 min 15 s left" in plain
    assert "Data parallel" not in plain and "node" not in plain
    wide = render_progress(running({**p, "processes": 4, "node": "10.0.0.3"}), "en")
    assert "Data parallel: 4 processes" in wide and "On node 10.0.0.3" in wide
    ru = render_progress(running({**p, "processes": 4, "node": "10.0.0.3"}), "ru")
    assert "процессов: 4" in ru and "Узел: 10.0.0.3" in ru and "Data parallel" not in ru
    assert "Осталось около 1 мин 15 с" in ru


def test_durations_are_said_in_the_users_language():
    from bot.telegram.texts import duration

    assert [duration(s, "en") for s in (0, 9, 60, 235, 3600, 5430)] == [
        "0 s", "9 s", "1 min 0 s", "3 min 55 s", "1 h 0 min", "1 h 30 min"]
    assert [duration(s, "ru") for s in (9, 235, 5430)] == ["9 с", "3 мин 55 с", "1 ч 30 мин"]


def failed(failure: dict | None, error: str) -> Job:
    return Job(id=9, kind="train", assistant_id=1, status="failed", error=error,
               result={"failure": failure} if failure else {})


def test_a_failed_job_says_why_in_the_users_language():
    cases = [({"code": "killed_oom", "params": {}, "attempts": 3}, "killed (signal 9, SIGKILL: out of memory?)",
              "не хватило памяти", "(попыток: 3)"),
             ({"code": "exit_code", "params": {"code": 1}, "attempts": 1}, "exited with code 1: RuntimeError: x",
              "кодом 1", ""),
             ({"code": "worker_died", "params": {}, "attempts": 2}, "its worker died during attempt 2 of 2",
              "остановился обработчик", "(попыток: 2)"),
             ({"code": "domain", "params": {}, "error": {"code": "no_training_examples", "params": {"name": "severo"}}},
              "assistant 'severo' has no approved training examples", "у severo нет одобренных", "")]
    for failure, error, said, attempts in cases:
        ru = render_progress(failed(failure, error), "ru")
        assert ru.startswith("❌ Обучение #9 не удалось: ") and said in ru and attempts in ru, ru
        latin = [w for w in re.findall(r"[A-Za-z]+", ru) if w not in ("severo", "review", "add")]
        assert latin == [], ru
        assert error not in ru
    en = render_progress(failed(cases[0][0], cases[0][1]), "en")
    assert "out of memory" in en and "(after 3 attempts)" in en


def test_a_failure_with_no_known_code_shows_the_recorded_text():
    old = render_progress(failed(None, "exited with code 2"), "ru")  # a job from before failures had codes
    assert old.endswith("exited with code 2")
    unknown = render_progress(failed({"code": "domain", "error": {"code": "nope"}}, "bad data"), "ru")
    assert unknown.endswith("bad data")
