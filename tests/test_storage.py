"""The schema, migrations and every Store method, against real SQLite files."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest

from storage import (
    MIGRATIONS, DuplicateExample, InvalidValue, NewExample, NotFound, Store, migrate, normalize_question, open_db,
    question_hash,
)
from storage.common import fmt_time, hash_api_key, parse_time


class Clock:
    """A settable clock for expiry and ordering tests."""

    def __init__(self, start: str = "2026-01-01 12:00:00"):
        self.now = parse_time(start)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += dt.timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cstore(db_path, clock) -> Store:
    return Store(open_db(db_path), clock=clock)


def schema(db) -> list[tuple]:
    return db.execute("select type, name, sql from sqlite_master order by type, name").fetchall()


# ------------------------------------------------------------ schema & migrations

def test_fresh_database_has_full_schema_wal_and_foreign_keys(db_path):
    db = open_db(db_path)
    tables = set(db.table_names())
    assert {"users", "assistants", "members", "invites", "examples", "example_history", "documents",
            "generation_runs", "jobs", "model_versions", "conversations", "messages", "api_keys", "audit_log",
            "retrain_policies", "bot_state", "_migrations"} <= tables
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert db.execute("pragma foreign_keys").fetchone()[0] == 1
    assert [r["name"] for r in db["_migrations"].rows] == [name for name, _ in MIGRATIONS]


def test_applying_migrations_twice_changes_nothing(db_path):
    db = open_db(db_path)
    before = schema(db)
    assert migrate(db) == []
    db.conn.close()
    again = open_db(db_path)
    assert schema(again) == before
    assert again["_migrations"].count == len(MIGRATIONS)


def test_old_database_upgrades_keeping_rows(db_path):
    old = open_db(db_path, migrate_to="0001_initial")
    assert [r["name"] for r in old["_migrations"].rows] == ["0001_initial"]
    assert "retrain_policies" not in old.table_names() and "bot_state" not in old.table_names()
    store = Store(old)
    acme = store.create_assistant("acme", owner_id=7)
    ex = store.add_example(acme.id, "Old question?", "Old answer.")
    store.edit_example(ex.id, answer="Newer answer.")
    old.conn.close()

    new = open_db(db_path)
    assert [r["name"] for r in new["_migrations"].rows] == [name for name, _ in MIGRATIONS]
    store = Store(new)
    assert store.assistant_by_name("acme").id == acme.id
    assert store.get_example(ex.id).answer == "Newer answer."
    assert [r.answer for r in store.example_history(ex.id)] == ["Old answer.", "Newer answer."]
    assert store.role_of(acme.id, 7) == "owner"
    store.set_retrain_policy(acme.id, cron="0 3 * * *")  # tables from later migrations work
    store.set_state("k", {"v": 1})
    assert store.get_state("k") == {"v": 1}


def test_foreign_keys_are_enforced(store):
    with pytest.raises(sqlite3.IntegrityError):
        store.add_example(999, "q", "a")


def test_memory_database_works():
    store = Store(open_db(":memory:"))
    assert store.create_assistant("x").name == "x"


# ------------------------------------------------------------ users, assistants, members

def test_users(store):
    assert store.get_user(5) is None
    user = store.upsert_user(5, name="Ann", language="ru")
    assert (user.id, user.name, user.language) == (5, "Ann", "ru")
    store.upsert_user(5, name="Anna")
    assert store.get_user(5).language == "ru" and store.get_user(5).name == "Anna"
    store.set_user_language(5, "en")
    assert store.get_user(5).language == "en"


def test_assistants_crud(store):
    a = store.create_assistant("  acme ", description="d", system_prompt="sp", base_model="bm", owner_id=1)
    assert (a.name, a.description, a.system_prompt, a.base_model, a.created_by) == ("acme", "d", "sp", "bm", 1)
    assert store.get_assistant(a.id) == a == store.find_assistant("acme") == store.assistant_by_name(" acme")
    assert store.find_assistant("nope") is None
    with pytest.raises(NotFound, match="tunebot assistants list"):
        store.assistant_by_name("nope")
    with pytest.raises(NotFound):
        store.get_assistant(999)
    for bad, msg in (("", "must not be empty"), ("x" * 65, "at most 64"), ("acme", "already exists")):
        with pytest.raises(InvalidValue, match=msg):
            store.create_assistant(bad)
    b = store.create_assistant("clinic", owner_id=2)
    assert [x.name for x in store.list_assistants()] == ["acme", "clinic"]
    assert [x.name for x in store.list_assistants(user_id=2)] == ["clinic"]
    updated = store.update_assistant(a.id, system_prompt="new", base_model="other")
    assert (updated.system_prompt, updated.base_model) == ("new", "other")
    with pytest.raises(InvalidValue, match="cannot update"):
        store.update_assistant(a.id, created_by=3)
    with pytest.raises(InvalidValue, match="already exists"):
        store.update_assistant(b.id, name="acme")
    with pytest.raises(InvalidValue, match="must not be empty"):
        store.update_assistant(b.id, name="  ")
    assert store.update_assistant(b.id, name=" clinic2 ").name == "clinic2"
    assert store.audit_entries(assistant_id=a.id)[-1].action == "assistant.create"


def test_members_and_roles(store, assistant):
    assert store.role_of(assistant.id, 1) == "owner"
    store.add_member(assistant.id, 2, "expert")
    store.add_member(assistant.id, 3, "tester")
    assert store.role_of(assistant.id, 2) == "expert"
    assert store.get_member(assistant.id, 9) is None and store.role_of(assistant.id, 9) is None
    assert [(m.user_id, m.role) for m in store.list_members(assistant.id)] == [(1, "owner"), (2, "expert"),
                                                                              (3, "tester")]
    store.add_member(assistant.id, 3, "expert")  # changing a role
    assert store.role_of(assistant.id, 3) == "expert"
    with pytest.raises(InvalidValue, match="unknown role"):
        store.add_member(assistant.id, 4, "admin")
    with pytest.raises(InvalidValue, match="last owner"):
        store.remove_member(assistant.id, 1)
    store.remove_member(assistant.id, 3, by=1)
    assert store.role_of(assistant.id, 3) is None
    with pytest.raises(NotFound):
        store.remove_member(assistant.id, 3)
    store.add_member(assistant.id, 2, "owner")
    store.remove_member(assistant.id, 1, by=2)  # no longer the last owner
    assert store.role_of(assistant.id, 1) is None


def test_invites_expiry_uses_and_roles(cstore, clock):
    a = cstore.create_assistant("acme", owner_id=1)
    invite = cstore.create_invite(a.id, "expert", uses=2, ttl_hours=24, created_by=1)
    assert invite.expires_at == "2026-01-02 12:00:00" and invite.uses_left == 2
    assert cstore.redeem_invite(invite.token, 10).role == "expert"
    assert cstore.redeem_invite(invite.token, 1).role == "owner"  # a higher role is kept, and so is the use
    assert cstore.redeem_invite(invite.token, 11).role == "expert"
    with pytest.raises(InvalidValue, match="used up"):
        cstore.redeem_invite(invite.token, 14)
    tester = cstore.create_invite(a.id, "tester", ttl_hours=1)
    clock.advance(hours=1, seconds=1)
    with pytest.raises(InvalidValue, match="expired"):
        cstore.redeem_invite(tester.token, 12)
    with pytest.raises(NotFound, match="not valid"):
        cstore.redeem_invite("bogus", 12)
    with pytest.raises(InvalidValue):
        cstore.create_invite(a.id, "expert", uses=0)
    with pytest.raises(InvalidValue):
        cstore.create_invite(a.id, "boss")
    promote = cstore.create_invite(a.id, "expert")
    cstore.add_member(a.id, 13, "tester")
    assert cstore.redeem_invite(promote.token, 13).role == "expert"  # a tester is promoted


# ------------------------------------------------------------ examples

def test_normalization_and_hash():
    assert normalize_question("  Ёлка,   ГДЕ?! ") == "елка где"
    assert question_hash("How much?") == question_hash("how MUCH") != question_hash("how many")


def test_add_example_defaults_and_validation(store, assistant):
    ex = store.add_example(assistant.id, "  Q? ", " A. ", author_id=1, must_contain=["A"])
    assert (ex.question, ex.answer, ex.source, ex.status, ex.split, ex.must_contain, ex.author_id) == (
        "Q?", "A.", "expert", "approved", "train", ["A"], 1)
    assert ex.question_hash == question_hash("Q?")
    for kwargs, msg in (({"source": "web"}, "unknown source"), ({"status": "ok"}, "unknown status"),
                        ({"split": "dev"}, "unknown split")):
        with pytest.raises(InvalidValue, match=msg):
            store.add_example(assistant.id, "other", "a", **kwargs)
    with pytest.raises(InvalidValue, match="non-empty"):
        store.add_example(assistant.id, "  ", "a")


def test_duplicate_detection(store, assistant):
    first = store.add_example(assistant.id, "What are your hours?", "9-5")
    with pytest.raises(DuplicateExample) as exc:
        store.add_example(assistant.id, "what are your HOURS", "other")
    assert exc.value.existing_id == first.id and "duplicate of example #" in str(exc.value)
    assert store.find_duplicate(assistant.id, "What are your hours!!").id == first.id
    assert store.find_duplicate(assistant.id, "What are your hours", exclude_id=first.id) is None
    assert store.add_example(assistant.id, "What are your hours?", "again", allow_duplicate=True).id != first.id
    other = store.create_assistant("other")
    store.add_example(other.id, "What are your hours?", "per assistant")  # other assistants are separate
    # rejected and deleted examples do not block
    rejected = store.add_example(assistant.id, "Rejected?", "r", status="pending")
    store.reject(rejected.id)
    store.add_example(assistant.id, "Rejected?", "again")
    deleted = store.add_example(assistant.id, "Deleted?", "d")
    store.delete_example(deleted.id)
    assert store.find_duplicate(assistant.id, "Deleted?") is None


def test_add_examples_in_bulk_reports_each_item(store, assistant):
    existing = store.add_example(assistant.id, "What are your hours?", "9-5")
    rejected = store.add_example(assistant.id, "Rejected?", "r", status="pending")
    store.reject(rejected.id)
    outcomes = store.add_examples(assistant.id, [
        NewExample(" Q1? ", " A1. ", split="test", must_contain=("A1",)),
        NewExample("what are your HOURS", "dup of a stored one"),
        NewExample("Q1", "dup of an earlier item"),
        NewExample("  ", "empty question"),
        NewExample("Q2", "bad split", split="dev"),
        NewExample("Rejected?", "a rejected example does not block"),
    ], source="import", status="pending", author_id=7)
    first, dup_stored, dup_item, empty, bad_split, again = outcomes
    assert isinstance(dup_stored, DuplicateExample) and dup_stored.existing_id == existing.id
    assert isinstance(dup_item, DuplicateExample) and dup_item.existing_id == first
    assert isinstance(empty, InvalidValue) and "non-empty" in str(empty)
    assert isinstance(bad_split, InvalidValue) and "unknown split" in str(bad_split)
    ex = store.get_example(first)
    assert (ex.question, ex.answer, ex.source, ex.status, ex.split, ex.must_contain, ex.author_id) == (
        "Q1?", "A1.", "import", "pending", "test", ["A1"], 7)
    assert ex.question_hash == question_hash("Q1") and ex.created_at == ex.updated_at
    assert [(h.action, h.question, h.status, h.changed_by) for h in store.example_history(first)] == [
        ("create", "Q1?", "pending", 7)]
    assert store.get_example(again).status == "pending"
    assert store.count_examples(assistant.id) == 4
    with pytest.raises(InvalidValue, match="unknown status"):
        store.add_examples(assistant.id, [NewExample("Q3", "A3")], status="ok")
    assert store.add_examples(assistant.id, []) == []


def test_add_examples_skips_a_row_the_database_refuses_and_keeps_the_rest(store, assistant, db_path):
    # real SQLite triggers stand in for any constraint a row can break (on the row, or on its history row)
    store.db.execute("create trigger refuse_row before insert on examples when new.answer = 'boom' "
                     "begin select raise(abort, 'refused by trigger'); end")
    store.db.execute("create trigger refuse_history before insert on example_history when new.answer = 'bang' "
                     "begin select raise(abort, 'history refused'); end")
    outcomes = store.add_examples(assistant.id, [NewExample("Q1", "A1"), NewExample("Q2", "boom"),
                                                 NewExample("Q3", "bang"), NewExample("Q4", "A4")])
    assert isinstance(outcomes[1], InvalidValue) and "refused by trigger" in str(outcomes[1])
    assert isinstance(outcomes[2], InvalidValue) and "history refused" in str(outcomes[2])
    # Q3's example row went back with its history row: no example without history
    other = Store(open_db(db_path))  # another connection sees what was committed
    assert [e.question for e in other.list_examples(assistant.id)] == ["Q1", "Q4"]
    assert other.db.execute("select count(*) from examples e where not exists (select 1 from example_history h "
                            "where h.example_id = e.id)").fetchone()[0] == 0


def test_add_examples_rolls_back_its_batch_when_the_database_aborts_it(store, assistant):
    store.add_example(assistant.id, "Saved before", "kept")
    store.db.execute("create trigger abort_all before insert on examples when new.answer = 'fatal' "
                     "begin select raise(rollback, 'disk on fire'); end")
    with pytest.raises(sqlite3.IntegrityError, match="disk on fire"):
        store.add_examples(assistant.id, [NewExample("Q1", "A1"), NewExample("Q2", "fatal"), NewExample("Q3", "A3")])
    assert [e.question for e in store.list_examples(assistant.id)] == ["Saved before"]
    assert not store.db.conn.in_transaction
    assert store.add_examples(assistant.id, [NewExample("Q1", "A1")])[0] > 0  # the connection still works


def test_edit_keeps_history_and_checks_duplicates(store, assistant):
    ex = store.add_example(assistant.id, "Q1", "A1", author_id=1)
    store.add_example(assistant.id, "Q2", "A2")
    same = store.edit_example(ex.id, question=" Q1 ", answer="A1")
    assert same == ex  # nothing changed, no history
    edited = store.edit_example(ex.id, answer="A1 better", split="val", by=2)
    assert (edited.answer, edited.split) == ("A1 better", "val")
    with pytest.raises(DuplicateExample):
        store.edit_example(ex.id, question="q2")
    renamed = store.edit_example(ex.id, question="Q1 renamed", by=2)
    assert renamed.question_hash == question_hash("Q1 renamed")
    history = store.example_history(ex.id)
    assert [(h.action, h.question, h.answer, h.changed_by) for h in history] == [
        ("create", "Q1", "A1", 1), ("edit", "Q1", "A1 better", 2), ("edit", "Q1 renamed", "A1 better", 2)]
    with pytest.raises(InvalidValue):
        store.edit_example(ex.id, split="holdout")


def test_soft_delete_and_restore_keep_everything(store, assistant):
    ex = store.add_example(assistant.id, "Q", "A")
    store.delete_example(ex.id, by=3)
    with pytest.raises(NotFound):
        store.get_example(ex.id)
    kept = store.get_example(ex.id, include_deleted=True)
    assert kept.deleted_at is not None and kept.answer == "A"
    assert store.list_examples(assistant.id) == []
    assert store.example_history(ex.id)[-1].action == "delete" and store.example_history(ex.id)[-1].changed_by == 3
    with pytest.raises(NotFound):
        store.delete_example(ex.id)
    restored = store.restore_example(ex.id, by=3)
    assert restored.deleted_at is None and store.list_examples(assistant.id) == [restored]
    assert [h.action for h in store.example_history(ex.id)] == ["create", "delete", "restore"]


def test_restore_refuses_to_create_a_duplicate(store, assistant):
    ex = store.add_example(assistant.id, "Q", "A")
    store.delete_example(ex.id)
    store.add_example(assistant.id, "q", "new answer")
    with pytest.raises(DuplicateExample):
        store.restore_example(ex.id)


def test_status_changes(store, assistant):
    ex = store.add_example(assistant.id, "Q", "A", status="pending")
    approved = store.approve(ex.id, by=5)
    assert (approved.status, approved.reviewer_id) == ("approved", 5)
    assert store.reject(ex.id, by=6).status == "rejected"
    assert store.set_status(ex.id, "pending").status == "pending"
    with pytest.raises(InvalidValue):
        store.set_status(ex.id, "maybe")
    assert [h.action for h in store.example_history(ex.id)] == ["create", "approved", "rejected", "reset"]


def test_list_count_and_counts(store, assistant):
    run = store.create_generation_run(assistant.id, method="paraphrase", model="m")
    root = store.add_example(assistant.id, "root", "a", source="import")
    store.add_example(assistant.id, "root 2", "a", source="import", split="test")
    v1 = store.add_example(assistant.id, "variation 1", "a", source="synthetic", status="pending",
                           parent_id=root.id, generation_run_id=run.id, method="paraphrase")
    v2 = store.add_example(assistant.id, "variation 2", "a", source="synthetic", status="pending",
                           parent_id=root.id, generation_run_id=run.id, method="mutation:typo")
    ids = lambda **kw: [e.id for e in store.list_examples(assistant.id, **kw)]  # noqa: E731
    assert ids(status="pending") == [v1.id, v2.id]
    assert ids(split="test") == [root.id + 1]
    assert ids(source="import") == [root.id, root.id + 1]
    assert ids(generation_run_id=run.id) == ids(parent_id=root.id) == [v1.id, v2.id]
    assert ids(roots_only=True) == [root.id, root.id + 1]
    assert ids(limit=2, offset=1) == [root.id + 1, v1.id]
    assert store.count_examples(assistant.id, status="pending") == 2
    assert store.example_counts(assistant.id) == {
        "source": {"import": 2, "synthetic": 2}, "status": {"approved": 2, "pending": 2},
        "split": {"test": 1, "train": 3}}


# ------------------------------------------------------------ documents, runs

def test_documents(store, assistant):
    doc = store.add_document(assistant.id, "faq.txt", "Some text", uploaded_by=1)
    assert store.get_document(doc.id) == doc and len(doc.sha256) == 64
    ex = store.add_example(assistant.id, "From doc?", "Yes.", source="document", document_id=doc.id,
                           chunk_ref="p1")
    assert (ex.document_id, ex.chunk_ref) == (doc.id, "p1")
    with pytest.raises(NotFound):
        store.get_document(999)


def test_generation_runs(store, assistant):
    run = store.create_generation_run(assistant.id, method="paraphrase", model="gpt", requested=10,
                                      params={"per_example": 5})
    assert (run.status, run.requested, run.params) == ("running", 10, {"per_example": 5})
    store.add_generation_usage(run.id, requests=2, prompt_tokens=100, completion_tokens=50, cost_usd=0.01,
                               generated=6, kept=4)
    store.add_generation_usage(run.id, requests=1, prompt_tokens=10)
    run = store.get_generation_run(run.id)
    assert (run.requests, run.prompt_tokens, run.completion_tokens, run.generated, run.kept) == (3, 110, 50, 6, 4)
    assert run.cost_usd == pytest.approx(0.01)
    done = store.finish_generation_run(run.id, status="failed", error="budget")
    assert (done.status, done.error) == ("failed", "budget") and done.finished_at
    assert store.list_generation_runs(assistant.id) == [done]
    with pytest.raises(NotFound):
        store.get_generation_run(999)


# ------------------------------------------------------------ jobs, versions, policies

def test_jobs(cstore, clock):
    a = cstore.create_assistant("acme")
    job = cstore.create_job("train", assistant_id=a.id, params={"epochs": 2}, priority=5, created_by=1)
    assert (job.status, job.params, job.priority, job.attempts, job.max_attempts) == ("queued", {"epochs": 2},
                                                                                       5, 0, 3)
    later = cstore.create_job("eval", assistant_id=a.id, scheduled_at="2026-01-02 00:00:00")
    assert later.status == "scheduled"
    with pytest.raises(InvalidValue, match="unknown job kind"):
        cstore.create_job("cook")
    updated = cstore.update_job(job.id, status="running", progress={"step": 3}, result={"loss": 0.5})
    assert (updated.status, updated.progress, updated.result) == ("running", {"step": 3}, {"loss": 0.5})
    with pytest.raises(InvalidValue):
        cstore.update_job(job.id, status="exploded")
    assert [j.id for j in cstore.list_jobs()] == [later.id, job.id]
    assert [j.id for j in cstore.list_jobs(status="running")] == [job.id]
    assert [j.id for j in cstore.list_jobs(assistant_id=a.id, status=["running", "scheduled"], limit=1)] == [later.id]
    with pytest.raises(NotFound):
        cstore.get_job(999)


def test_model_versions_activate_and_archive(store, assistant):
    v1 = store.add_model_version(assistant.id, adapter_path="/a/1", base_model="b", dataset_hash="h1",
                                 hyperparameters={"lr": 1e-4}, metrics={"acc": 0.5})
    assert (v1.status, v1.hyperparameters, v1.metrics) == ("candidate", {"lr": 1e-4}, {"acc": 0.5})
    v2 = store.add_model_version(assistant.id, adapter_path="/a/2", base_model="b")
    assert store.activate_version(v1.id, by=1).status == "active"
    assert store.get_assistant(assistant.id).active_version_id == v1.id
    store.activate_version(v2.id)
    assert [v.status for v in store.list_model_versions(assistant.id)] == ["archived", "active"]
    assert store.get_assistant(assistant.id).active_version_id == v2.id
    assert store.set_version_status(v1.id, "active").status == "active"  # rollback
    assert store.get_model_version(v2.id).status == "archived"
    store.set_version_status(v1.id, "archived")
    assert store.get_assistant(assistant.id).active_version_id is None
    with pytest.raises(InvalidValue):
        store.set_version_status(v1.id, "golden")
    with pytest.raises(NotFound):
        store.get_model_version(999)
    actions = [e.action for e in store.audit_entries(assistant_id=assistant.id)]
    assert "version.activate" in actions and "version.archived" in actions


def test_retrain_policies(cstore, clock):
    a = cstore.create_assistant("acme")
    policy = cstore.set_retrain_policy(a.id, cron="0 3 * * *", min_new=5)
    assert (policy.cron, policy.min_new, policy.enabled, policy.last_run_at) == ("0 3 * * *", 5, 1, None)
    assert cstore.list_retrain_policies() == [policy]
    cstore.mark_policy_run(a.id)
    assert cstore.get_retrain_policy(a.id).last_run_at == "2026-01-01 12:00:00"
    cstore.set_retrain_policy(a.id, cron="0 4 * * *", enabled=False)
    assert cstore.list_retrain_policies() == [] and cstore.get_retrain_policy(a.id).cron == "0 4 * * *"
    assert cstore.get_retrain_policy(999) is None


# ------------------------------------------------------------ api keys, chat, state, audit

def test_api_keys_are_stored_hashed(store, assistant):
    record, key = store.create_api_key(assistant.id, name="site", created_by=1)
    assert key.startswith("tb-") and record.prefix == key[:10]
    row = store.db["api_keys"].get(record.id)
    assert key not in str(row) and row["key_hash"] == hash_api_key(key)
    assert store.lookup_api_key(key).id == record.id
    assert store.lookup_api_key(key + "x") is None
    assert store.list_api_keys(assistant.id) == [record]
    store.revoke_api_key(record.id, by=1)
    assert store.lookup_api_key(key) is None and store.list_api_keys(assistant.id)[0].revoked_at
    with pytest.raises(NotFound):
        store.revoke_api_key(999)
    assert key not in str([e.details for e in store.audit_entries()])


def test_conversations_messages_feedback(store, assistant):
    conv = store.start_conversation(assistant.id, 1, mode="base")
    q = store.add_message(conv, "user", "Hi?")
    a = store.add_message(conv, "assistant", "Hello.", model_version_id=None, mode="base", latency_ms=12.5)
    ex = store.add_example(assistant.id, "Hi?", "Hello there.", source="feedback")
    store.set_feedback(a, "down", correction="Hello there.", correction_example_id=ex.id)
    msg = store.get_message(a)
    assert (msg["feedback"], msg["correction"], msg["correction_example_id"], msg["latency_ms"]) == (
        "down", "Hello there.", ex.id, 12.5)
    assert store.get_message(q)["text"] == "Hi?"
    with pytest.raises(NotFound):
        store.get_message(999)


def test_question_before_an_answer(store, assistant):
    conv = store.start_conversation(assistant.id, 1)
    q1 = store.add_message(conv, "user", "First?")
    a1 = store.add_message(conv, "assistant", "One.")
    other = store.start_conversation(assistant.id, 2)
    store.add_message(other, "user", "Another chat's question")  # between, but in another conversation
    store.add_message(conv, "user", "Second?")
    a2 = store.add_message(conv, "assistant", "Two.")
    assert store.question_before(a1) == "First?"
    assert store.question_before(a2) == "Second?"
    assert store.question_before(q1) is None  # nothing was asked before the first message
    lone = store.add_message(store.start_conversation(assistant.id, 3), "assistant", "Unprompted.")
    assert store.question_before(lone) is None
    assert store.question_before(999) is None


def test_feedback_counts_per_assistant(store, assistant):
    assert store.feedback_counts(assistant.id) == {}
    other = store.create_assistant("other")
    for aid, feedback in ((assistant.id, "up"), (assistant.id, "down"), (assistant.id, "up"),
                          (assistant.id, None), (other.id, "down")):
        conv = store.start_conversation(aid, 1)
        store.add_message(conv, "user", "Q?")
        answer = store.add_message(conv, "assistant", "A.")
        if feedback:
            store.set_feedback(answer, feedback)
    assert store.feedback_counts(assistant.id) == {"down": 1, "up": 2}
    assert store.feedback_counts(other.id) == {"down": 1}


def test_bot_state(store):
    assert store.get_state("missing") is None
    store.set_state("conv", {"state": 2, "ru": "привет"})
    store.set_state("conv", {"state": 3})
    assert store.get_state("conv") == {"state": 3}


def test_audit_log(cstore, clock):
    a = cstore.create_assistant("acme", owner_id=1)
    clock.advance(minutes=1)
    cstore.audit("custom.thing", user_id=1, assistant_id=a.id, details={"n": 1})
    cstore.audit("global.thing")
    entries = cstore.audit_entries(assistant_id=a.id)
    assert [(e.action, e.details) for e in entries] == [("custom.thing", {"n": 1}), ("assistant.create", {"name": "acme"})]
    assert entries[0].at == "2026-01-01 12:01:00"
    assert [e.action for e in cstore.audit_entries(limit=1)] == ["global.thing"]


def test_time_helpers(cstore):
    assert cstore.now() == "2026-01-01 12:00:00"
    eastern = dt.datetime(2026, 1, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert fmt_time(eastern) == "2026-01-01 12:00:00"
    assert parse_time("2026-01-01 12:00:00").tzinfo == dt.timezone.utc
