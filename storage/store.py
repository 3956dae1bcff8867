"""Typed access to the database: the only place that writes SQL for the other layers. One Store class over
one connection, assembled from a part per concept (people, examples, jobs, conversations, customers)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

from storage.records import AuditEntry, from_row
from storage.common import fmt_time, utcnow
from storage.people import PeopleStore
from storage.examples import ExampleStore
from storage.jobs import JobStore
from storage.conversations import ConversationStore
from storage.customers import CustomerStore


class Store(PeopleStore, ExampleStore, JobStore, ConversationStore, CustomerStore):
    """Methods over one `sqlite_utils.Database`; `clock` is injectable for tests."""

    def __init__(self, db: sqlite_utils.Database, *, clock: Callable[[], dt.datetime] = utcnow):
        self.db = db
        self.clock = clock

    def now(self) -> str:
        return fmt_time(self.clock())

    # ------------------------------------------------------------ bot state
    def get_state(self, key: str) -> Any:
        row = next(iter(self.db["bot_state"].rows_where("key = ?", [key])), None)
        return json.loads(row["value"]) if row else None

    def set_state(self, key: str, value: Any) -> None:
        self.db["bot_state"].upsert({"key": key, "value": json.dumps(value, ensure_ascii=False, default=str),
                                     "updated_at": self.now()}, pk="key")

    # ---------------------------------------------------------------- audit
    def audit(self, action: str, *, user_id: int | None = None, assistant_id: int | None = None,
              details: dict | None = None) -> None:
        self.db["audit_log"].insert({"at": self.now(), "user_id": user_id, "assistant_id": assistant_id,
                                     "action": action, "details": json.dumps(details or {}, ensure_ascii=False)})

    def audit_entries(self, *, assistant_id: int | None = None, limit: int = 100) -> list[AuditEntry]:
        rows = self.db["audit_log"].rows_where("assistant_id = ?" if assistant_id else None,
                                               [assistant_id] if assistant_id else [], order_by="id desc", limit=limit)
        return [from_row(AuditEntry, r) for r in rows]


class ThreadStores:
    """One Store per thread on one database file: sqlite3 connections stay in the thread that opened them.
    `first`, when given, is the store the creating thread already has (and keeps using)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], dt.datetime] = utcnow, first: Store | None = None):
        self.path = str(path)
        self.clock = clock
        self._local = threading.local()
        if first is not None:
            self._local.store = first

    def __call__(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None:
            from storage.db import open_db

            store = self._local.store = Store(open_db(self.path), clock=self.clock)
        return store
