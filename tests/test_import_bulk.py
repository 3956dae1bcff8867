"""Bulk import: batches of one transaction each, keeping dedup, per-line errors, history and saved work."""

from __future__ import annotations

import json
import sqlite3

import pytest

from storage import Store, open_db
from tuning.data.importing import IMPORT_BATCH, import_file


def faq(n: int, *, answer=lambda i: f"Answer {i}.") -> bytes:
    return "".join(json.dumps({"question": f"Question {i}?", "answer": answer(i)}) + "\n" for i in range(n)).encode()


N = 2 * IMPORT_BATCH + 200  # three batches, the last one partial


def test_large_import_in_batches_keeps_history_audit_and_dedup(store, assistant):
    seen = []
    report = import_file(store, assistant.id, faq(N), filename="big.jsonl", author_id=5,
                         on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(IMPORT_BATCH, N), (2 * IMPORT_BATCH, N), (N, N)]
    assert report.added == N and report.ok and report.duplicates == []
    assert report.example_ids == sorted(report.example_ids)
    assert [e.question for e in store.list_examples(assistant.id)] == [f"Question {i}?" for i in range(N)]
    history = store.db.execute("select example_id, action, changed_by from example_history order by example_id")
    assert [tuple(r) for r in history] == [(i, "create", 5) for i in report.example_ids]
    assert store.audit_entries(assistant_id=assistant.id)[0].details == {
        "filename": "big.jsonl", "added": N, "duplicates": 0, "errors": 0}

    again = import_file(store, assistant.id, faq(N), filename="big.jsonl")
    assert again.added == 0 and len(again.duplicates) == N
    assert again.duplicates[-1] == (N, report.example_ids[-1])  # line numbers start at 1


def test_a_line_the_database_refuses_is_reported_and_the_others_kept(store, assistant):
    store.db.execute("create trigger refuse before insert on examples when new.answer = 'Answer 700.' "
                     "begin select raise(abort, 'answers about 700 are not allowed'); end")
    report = import_file(store, assistant.id, faq(N))
    assert report.added == N - 1
    [error] = report.errors
    assert (error.line, error.code) == (701, "storage")
    assert "answers about 700 are not allowed" in error.reason
    assert "Question 700?" not in {e.question for e in store.list_examples(assistant.id)}


def test_stopping_half_way_keeps_the_saved_batches(store, assistant, db_path):
    before = store.add_example(assistant.id, "Saved long before", "kept")

    def stop_after_second_batch(done: int, total: int) -> None:
        if done == 2 * IMPORT_BATCH:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_file(store, assistant.id, faq(N), on_progress=stop_after_second_batch)
    fresh = Store(open_db(db_path))
    assert fresh.count_examples(assistant.id) == 1 + 2 * IMPORT_BATCH
    assert fresh.get_example(before.id).answer == "kept"

    rest = import_file(fresh, assistant.id, faq(N))
    assert rest.added == N - 2 * IMPORT_BATCH and len(rest.duplicates) == 2 * IMPORT_BATCH
    assert fresh.count_examples(assistant.id) == 1 + N


def test_a_batch_the_database_aborts_is_rolled_back_whole_and_earlier_batches_stay(store, assistant, db_path):
    store.db.execute("create trigger abort_batch before insert on examples when new.answer = 'Answer 700.' "
                     "begin select raise(rollback, 'disk full'); end")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        import_file(store, assistant.id, faq(N))
    fresh = Store(open_db(db_path))
    ids = [e.id for e in fresh.list_examples(assistant.id)]
    assert len(ids) == IMPORT_BATCH  # the first batch, none of the second
    assert fresh.db.execute("select count(*) from example_history").fetchone()[0] == IMPORT_BATCH
    fresh.db.execute("drop trigger abort_batch")
    rest = import_file(fresh, assistant.id, faq(N))
    assert rest.added == N - IMPORT_BATCH and fresh.count_examples(assistant.id) == N
