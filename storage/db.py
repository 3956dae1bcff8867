"""Opening the database and applying migrations (idempotently, in order, recorded by name)."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Callable, Iterator

import sqlite_utils


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """The block's writes commit together or not at all; nested blocks join the outer one (as a savepoint).

    sqlite-utils commits each write on its own unless a transaction is open (`with db.conn:` opens none);
    inside this block its writes join it. BEGIN IMMEDIATE takes the write lock first, so a check and the
    writes that depend on it cannot race another connection.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.conn.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


def m0001_initial(db: sqlite_utils.Database) -> None:
    """Users, assistants, members, invites, examples with history, documents, runs, jobs, versions, chat, keys, audit."""
    db["users"].create(
        {"id": int, "name": str, "language": str, "created_at": str}, pk="id", if_not_exists=True
    )
    db["assistants"].create(
        {
            "id": int, "name": str, "description": str, "system_prompt": str, "base_model": str,
            "active_version_id": int, "created_by": int, "created_at": str, "deleted_at": str,
        },
        pk="id", not_null={"name"}, defaults={"description": "", "system_prompt": "", "base_model": ""},
        if_not_exists=True,
    )
    db["assistants"].create_index(["name"], unique=True, if_not_exists=True)
    db["members"].create(
        {"assistant_id": int, "user_id": int, "role": str, "added_at": str},
        pk=("assistant_id", "user_id"), not_null={"role"},
        foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["invites"].create(
        {"token": str, "assistant_id": int, "role": str, "expires_at": str, "uses_left": int,
         "created_by": int, "created_at": str},
        pk="token", foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["documents"].create(
        {"id": int, "assistant_id": int, "filename": str, "sha256": str, "text": str,
         "uploaded_by": int, "created_at": str},
        pk="id", foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["generation_runs"].create(
        {"id": int, "assistant_id": int, "method": str, "model": str, "status": str,
         "requested": int, "generated": int, "kept": int, "requests": int,
         "prompt_tokens": int, "completion_tokens": int, "cost_usd": float, "error": str,
         "params": str, "created_at": str, "finished_at": str},
        pk="id", foreign_keys=[("assistant_id", "assistants", "id")],
        defaults={"requested": 0, "generated": 0, "kept": 0, "requests": 0, "prompt_tokens": 0,
                  "completion_tokens": 0, "cost_usd": 0.0, "params": "{}"},
        if_not_exists=True,
    )
    db["examples"].create(
        {"id": int, "assistant_id": int, "question": str, "answer": str, "source": str,
         "status": str, "split": str, "parent_id": int, "method": str, "author_id": int,
         "reviewer_id": int, "generation_run_id": int, "document_id": int, "chunk_ref": str,
         "judge_score": float, "must_contain": str, "question_hash": str, "created_at": str,
         "updated_at": str, "deleted_at": str},
        pk="id", not_null={"question", "answer", "source", "status", "split"},
        foreign_keys=[("assistant_id", "assistants", "id"), ("parent_id", "examples", "id"),
                      ("generation_run_id", "generation_runs", "id"), ("document_id", "documents", "id")],
        if_not_exists=True,
    )
    db["examples"].create_index(["assistant_id", "status", "split"], if_not_exists=True)
    db["example_history"].create(
        {"id": int, "example_id": int, "action": str, "question": str, "answer": str,
         "status": str, "changed_by": int, "changed_at": str},
        pk="id", foreign_keys=[("example_id", "examples", "id")], if_not_exists=True,
    )
    db["jobs"].create(
        {"id": int, "kind": str, "assistant_id": int, "status": str, "priority": int,
         "attempts": int, "max_attempts": int, "gpus": int, "params": str, "progress": str,
         "result": str, "error": str, "scheduled_at": str, "created_at": str, "started_at": str,
         "finished_at": str, "heartbeat_at": str, "worker_id": str, "pid": int, "devices": str,
         "created_by": int, "tg_chat_id": int, "tg_message_id": int},
        pk="id", not_null={"kind", "status"},
        defaults={"priority": 0, "attempts": 0, "max_attempts": 3, "gpus": 0, "params": "{}",
                  "progress": "{}", "result": "{}"},
        foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["jobs"].create_index(["status", "priority"], if_not_exists=True)
    db["model_versions"].create(
        {"id": int, "assistant_id": int, "job_id": int, "adapter_path": str, "base_model": str,
         "dataset_hash": str, "hyperparameters": str, "metrics": str, "status": str,
         "created_at": str, "promoted_at": str},
        pk="id", defaults={"hyperparameters": "{}", "metrics": "{}", "status": "candidate"},
        foreign_keys=[("assistant_id", "assistants", "id"), ("job_id", "jobs", "id")],
        if_not_exists=True,
    )
    db["conversations"].create(
        {"id": int, "assistant_id": int, "user_id": int, "mode": str, "created_at": str},
        pk="id", foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["messages"].create(
        {"id": int, "conversation_id": int, "role": str, "text": str, "model_version_id": int,
         "mode": str, "latency_ms": float, "feedback": str, "correction": str,
         "correction_example_id": int, "created_at": str},
        pk="id", foreign_keys=[("conversation_id", "conversations", "id")], if_not_exists=True,
    )
    db["api_keys"].create(
        {"id": int, "assistant_id": int, "prefix": str, "key_hash": str, "name": str,
         "created_by": int, "created_at": str, "revoked_at": str, "last_used_at": str},
        pk="id", foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["api_keys"].create_index(["key_hash"], unique=True, if_not_exists=True)
    db["audit_log"].create(
        {"id": int, "at": str, "user_id": int, "assistant_id": int, "action": str, "details": str},
        pk="id", defaults={"details": "{}"}, if_not_exists=True,
    )


def m0002_dedup_index_and_policies(db: sqlite_utils.Database) -> None:
    """Fast duplicate lookups and per-assistant periodic retraining policies."""
    db["examples"].create_index(["assistant_id", "question_hash"], if_not_exists=True)
    db["retrain_policies"].create(
        {"assistant_id": int, "cron": str, "min_new": int, "enabled": int, "last_run_at": str,
         "created_at": str},
        pk="assistant_id", defaults={"min_new": 1, "enabled": 1},
        foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )


def m0003_bot_state(db: sqlite_utils.Database) -> None:
    """Key-value rows for the bot's conversation persistence, so a restart resumes dialogs."""
    db["bot_state"].create({"key": str, "value": str, "updated_at": str}, pk="key", if_not_exists=True)


def m0004_workers(db: sqlite_utils.Database) -> None:
    """Live job workers (heartbeats), so the CLI and the bot can tell whether anyone will run a job."""
    db["workers"].create({"id": str, "host": str, "pid": int, "slots": str, "started_at": str,
                          "heartbeat_at": str}, pk="id", if_not_exists=True)


def m0005_grounding_and_unanswered(db: sqlite_utils.Database) -> None:
    """Which examples an answer drew on and how sure it was; the questions it could not answer, for the experts."""
    messages = db["messages"]
    have = messages.columns_dict
    if "sources" not in have:
        messages.add_column("sources", str)  # JSON list of example ids
    if "confidence" not in have:
        messages.add_column("confidence", float)
    if "abstained" not in have:
        messages.add_column("abstained", int, not_null_default=0)
    db["unanswered"].create(
        {"id": int, "assistant_id": int, "question": str, "user_id": int, "conversation_id": int,
         "message_id": int, "status": str, "example_id": int, "answered_by": int, "created_at": str,
         "answered_at": str, "notified_at": str},
        pk="id", not_null={"assistant_id", "question", "status"}, defaults={"status": "open"},
        foreign_keys=[("assistant_id", "assistants", "id"), ("conversation_id", "conversations", "id"),
                      ("message_id", "messages", "id"), ("example_id", "examples", "id")],
        if_not_exists=True,
    )
    db["unanswered"].create_index(["assistant_id", "status"], if_not_exists=True)


def m0006_customers(db: sqlite_utils.Database) -> None:
    """Published assistants, their customers, where each question came from (so the team's answer goes back)."""
    db["publications"].create(
        {"assistant_id": int, "token": str, "active": int, "link": int, "groups": int, "business": int,
         "greeting": str, "created_by": int, "created_at": str, "updated_at": str},
        pk="assistant_id", not_null={"token"},
        defaults={"active": 1, "link": 1, "groups": 0, "business": 0, "greeting": ""},
        foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["publications"].create_index(["token"], unique=True, if_not_exists=True)
    db["customers"].create(
        {"id": int, "assistant_id": int, "user_id": int, "chat_id": int, "channel": str, "language": str,
         "business_connection_id": str, "conversation_id": int, "started_at": str, "last_seen_at": str,
         "forgotten_at": str},
        pk="id", not_null={"assistant_id", "user_id", "chat_id", "channel"},
        foreign_keys=[("assistant_id", "assistants", "id"), ("conversation_id", "conversations", "id")],
        if_not_exists=True,
    )
    db["customers"].create_index(["assistant_id", "user_id", "chat_id"], unique=True, if_not_exists=True)
    db["customers"].create_index(["chat_id", "started_at"], if_not_exists=True)
    db["customer_groups"].create(
        {"chat_id": int, "assistant_id": int, "title": str, "added_by": int, "added_at": str, "removed_at": str},
        pk="chat_id", foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    db["business_connections"].create(
        {"id": str, "assistant_id": int, "user_id": int, "user_chat_id": int, "can_reply": int, "enabled": int,
         "updated_at": str},
        pk="id", foreign_keys=[("assistant_id", "assistants", "id")], if_not_exists=True,
    )
    if "customer_id" not in db["conversations"].columns_dict:
        db["conversations"].add_column("customer_id", int)
    messages = db["messages"].columns_dict
    if "tg_message_id" not in messages:
        db["messages"].add_column("tg_message_id", int)  # the Telegram message of a customer's question or answer
    if "deleted_at" not in messages:
        db["messages"].add_column("deleted_at", str)
    unanswered = db["unanswered"].columns_dict
    for name, typ in (("customer_id", int), ("chat_id", int), ("reply_to_message_id", int), ("delivered_at", str)):
        if name not in unanswered:
            db["unanswered"].add_column(name, typ)
    db["unanswered"].create_index(["status", "delivered_at"], if_not_exists=True)


def m0007_unanswered_answer(db: sqlite_utils.Database) -> None:
    """The answer given to each item as it was given: a customer receives that one, even when several items
    share one example (the same question asked twice) or the example is edited later."""
    if "answer" not in db["unanswered"].columns_dict:
        db["unanswered"].add_column("answer", str)


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", m0001_initial),
    ("0002_dedup_index_and_policies", m0002_dedup_index_and_policies),
    ("0003_bot_state", m0003_bot_state),
    ("0004_workers", m0004_workers),
    ("0005_grounding_and_unanswered", m0005_grounding_and_unanswered),
    ("0006_customers", m0006_customers),
    ("0007_unanswered_answer", m0007_unanswered_answer),
]


def migrate(db: sqlite_utils.Database, *, upto: str | None = None) -> list[str]:
    """Apply the migrations not yet recorded in `_migrations`, all in one transaction (a process killed midway
    leaves the database as it was, never between two migrations); return the names applied."""
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    pending = []
    for name, fn in MIGRATIONS:
        if name not in done:
            pending.append((name, fn))
        if name == upto:
            break
    if pending:
        with transaction(db):
            for name, fn in pending:
                fn(db)
                db["_migrations"].insert({"name": name, "applied_at": _now()})
    return [name for name, _ in pending]


def open_db(path: str | Path, *, migrate_to: str | None = None) -> sqlite_utils.Database:
    """Open (creating if needed) the database at `path` with WAL and foreign keys, migrated."""
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(path)
    db.conn.execute("PRAGMA busy_timeout = 30000")
    if str(path) != ":memory:":
        db.enable_wal()
    db.conn.execute("PRAGMA foreign_keys = ON")
    db.conn.execute("PRAGMA synchronous = NORMAL")
    migrate(db, upto=migrate_to)
    return db
