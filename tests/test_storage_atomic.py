"""Every Store method that writes more than once commits all of it or none: a process killed between two of
its statements leaves the database as before the call or as after it, never half of each.

The kill comes from sqlite3's own trace callback (`Connection.set_trace_callback`, called as each statement
starts): a forked child runs one method and `os._exit`s as its k-th write (or COMMIT) begins, for every k.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
import sqlite_utils

from storage import NewExample, Store, migrate, open_db
from storage.common import parse_time

NOW = parse_time("2026-03-01 10:00:00")
KILLED = 77
# Statements that change the database, and the COMMIT that makes them durable.
EVENTS = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "ALTER", "DROP", "COMMIT", "END")
RANDOM = {"invites": ("token",), "api_keys": ("prefix", "key_hash")}  # new on every run: compared as "set"


def clock() -> dt.datetime:
    return NOW


def first_word(sql: str) -> str:
    return sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""


def snapshot(path: Path) -> dict[str, list]:
    """The schema and every row of every table, with the values that are random on each run replaced by a mark."""
    conn = sqlite3.connect(path)
    try:
        out = {"schema": sorted(r[0] for r in conn.execute("select sql from sqlite_master where sql is not null"))}
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table' "
                                             "and name not like 'sqlite_%'")]
        for table in tables:
            cur = conn.execute(f"select * from [{table}]")
            names = [d[0] for d in cur.description]
            rows = []
            for row in cur.fetchall():
                record = dict(zip(names, row))
                for col in RANDOM.get(table, ()):
                    record[col] = "set" if record[col] else record[col]
                if table == "audit_log" and record.get("details"):
                    record["details"] = {k: v for k, v in json.loads(record["details"]).items() if k != "prefix"}
                rows.append(repr(sorted(record.items())))
            out[table] = sorted(rows)
        return out
    finally:
        conn.close()


def copy_db(src: Path, dst: Path) -> None:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    a.backup(b)
    a.close()
    b.close()


def count_events(work: Callable[[Callable[[sqlite3.Connection], None]], None]) -> int:
    """Run `work` to the end; how many write/COMMIT statements it executed on the connection it armed."""
    seen: list[str] = []
    work(lambda conn: conn.set_trace_callback(lambda sql: seen.append(first_word(sql))))
    return sum(word in EVENTS for word in seen)


def run_killed(work: Callable[[Callable[[sqlite3.Connection], None]], None], kill_at: int) -> int:
    """Fork a child that runs `work` and dies (os._exit) as the kill_at-th event on the connection it armed starts."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            events = 0

            def trace(sql: str) -> None:
                nonlocal events
                if first_word(sql) in EVENTS:
                    events += 1
                    if events == kill_at:
                        os._exit(KILLED)

            work(lambda conn: conn.set_trace_callback(trace))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def assert_all_or_none(name: str, base_path: Path, tmp_path: Path, work_on: Callable) -> None:
    """`work_on(path)` gives the work on a copy of base_path: killed at each of its events, all or none persists."""
    done = tmp_path / "done.db"
    copy_db(base_path, done)
    events = count_events(work_on(done))
    before, after = snapshot(base_path), snapshot(done)
    assert before != after and events >= 1
    for kill_at in range(1, events + 1):
        path = tmp_path / f"killed-{kill_at}.db"
        copy_db(base_path, path)
        assert run_killed(work_on(path), kill_at) == KILLED
        state = snapshot(path)
        written = sorted(t for t in state if state[t] != before[t])
        assert state in (before, after), (f"{name}, killed at statement {kill_at} of {events}: these tables were "
                                          f"written, the others not (yet): {written}")


def base(store: Store) -> dict:
    """One assistant with a member, examples in several states, versions, an invite, a key and an open question."""
    a = store.create_assistant("acme", owner_id=1)
    store.add_member(a.id, 2, "expert")
    live = store.add_example(a.id, "When do you open?", "At nine.")
    gone = store.add_example(a.id, "Old question?", "Old answer.")
    store.delete_example(gone.id)
    pending = store.add_example(a.id, "Pending question?", "Pending answer.", status="pending", source="synthetic")
    active = store.add_model_version(a.id, adapter_path="/v1", base_model="m")
    store.activate_version(active.id)
    candidate = store.add_model_version(a.id, adapter_path="/v2", base_model="m")
    invite = store.create_invite(a.id, "tester", uses=2)
    key, _ = store.create_api_key(a.id, name="k")
    asked = store.add_unanswered(a.id, "Do you deliver?")
    other = store.add_unanswered(a.id, "Is it spam?")
    return {"a": a.id, "live": live.id, "gone": gone.id, "pending": pending.id, "active": active.id,
            "candidate": candidate.id, "token": invite.token, "key": key.id, "asked": asked.id, "other": other.id}


OPERATIONS: dict[str, Callable[[Store, dict], object]] = {
    "create_assistant": lambda s, c: s.create_assistant("beta", owner_id=9),
    "add_member": lambda s, c: s.add_member(c["a"], 10, "expert"),
    "set_member_role": lambda s, c: s.set_member_role(c["a"], 2, "owner", by=1),
    "remove_member": lambda s, c: s.remove_member(c["a"], 2),
    "create_invite": lambda s, c: s.create_invite(c["a"], "expert"),
    "redeem_invite": lambda s, c: s.redeem_invite(c["token"], 11),
    "add_example": lambda s, c: s.add_example(c["a"], "Do you sell gift cards?", "Yes."),
    "add_examples": lambda s, c: s.add_examples(c["a"], [NewExample("First new?", "One."),
                                                         NewExample("Second new?", "Two.")]),
    "edit_example": lambda s, c: s.edit_example(c["live"], answer="At ten.", by=2),
    "delete_example": lambda s, c: s.delete_example(c["live"], by=2),
    "restore_example": lambda s, c: s.restore_example(c["gone"], by=2),
    "approve": lambda s, c: s.approve(c["pending"], by=2),
    "create_job": lambda s, c: s.create_job("train", assistant_id=c["a"], created_by=1),
    "add_model_version": lambda s, c: s.add_model_version(c["a"], adapter_path="/v3", base_model="m"),
    "activate_version": lambda s, c: s.activate_version(c["candidate"], by=1),
    "archive_active_version": lambda s, c: s.set_version_status(c["active"], "archived", by=1),
    "create_api_key": lambda s, c: s.create_api_key(c["a"], name="new"),
    "revoke_api_key": lambda s, c: s.revoke_api_key(c["key"], by=1),
    "answer_unanswered": lambda s, c: s.answer_unanswered(c["asked"], "Yes, within the city.", by=2),
    "dismiss_unanswered": lambda s, c: s.dismiss_unanswered(c["other"], by=2),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_a_write_killed_between_its_steps_leaves_all_of_it_or_none(tmp_path, name):
    setup = Store(open_db(tmp_path / "base.db"), clock=clock)
    context = base(setup)
    setup.db.conn.close()

    def work_on(path: Path):
        def work(arm) -> None:
            store = Store(open_db(path), clock=clock)
            arm(store.db.conn)
            OPERATIONS[name](store, context)
            store.db.conn.close()
        return work

    assert_all_or_none(name, tmp_path / "base.db", tmp_path, work_on)


def test_a_migration_killed_midway_leaves_nothing_and_is_applied_whole_on_the_next_open(tmp_path):
    old = tmp_path / "old.db"
    open_db(old, migrate_to="0004_workers").conn.close()

    def work_on(path: Path):
        def work(arm) -> None:
            db = sqlite_utils.Database(path)
            arm(db.conn)
            migrate(db)
            db.conn.close()
        return work

    assert_all_or_none("migrate", old, tmp_path, work_on)
    db = open_db(tmp_path / "killed-1.db")
    assert "unanswered" in db.table_names() and "sources" in db["messages"].columns_dict
    db.conn.close()
