"""Typed access to the database: the only place that writes SQL for the other layers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import secrets
import sqlite3
from typing import Any, Callable, Iterable, Sequence

import sqlite_utils

from storage.db import transaction
from storage.errors import DuplicateExample, InvalidValue, LastOwner, NotFound, NotOpen, StorageError
from storage.records import (
    JOB_KINDS, JOB_STATES, ROLES, SOURCES, SPLITS, STATUSES, UNANSWERED_STATES, VERSION_STATES,
    ApiKey, Assistant, AuditEntry, Document, Example, ExampleRevision, GenerationRun, Invite,
    Job, Member, ModelVersion, NewExample, RetrainPolicy, Unanswered, User, from_row,
)
from storage.text import question_hash

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
INVITE_TTL_HOURS = (1, 720)  # an invite link is valid for one hour to 30 days
INVITE_MAX_USES = 1000
API_KEY_TOUCH_S = 60  # last_used_at is rewritten at most this often (not one write per request)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fmt_time(when: dt.datetime) -> str:
    """Times are stored as UTC 'YYYY-MM-DD HH:MM:SS' so that they sort as strings."""
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc)
    return when.strftime(TIME_FORMAT)


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.timezone.utc)


def _check(value: str, allowed: Iterable[str], what: str) -> str:
    if value not in allowed:
        raise InvalidValue(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")
    return value


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Store:
    """Methods over one `sqlite_utils.Database`; `clock` is injectable for tests."""

    def __init__(self, db: sqlite_utils.Database, *, clock: Callable[[], dt.datetime] = utcnow):
        self.db = db
        self.clock = clock

    def now(self) -> str:
        return fmt_time(self.clock())

    # ---------------------------------------------------------------- users
    def upsert_user(self, user_id: int, *, name: str | None = None, language: str | None = None) -> User:
        with transaction(self.db):
            row = next(iter(self.db["users"].rows_where("id = ?", [user_id])), None)
            if row is None:
                self.db["users"].insert({"id": user_id, "name": name, "language": language,
                                         "created_at": self.now()})
            else:
                updates = {k: v for k, v in {"name": name, "language": language}.items() if v is not None}
                if updates:
                    self.db["users"].update(user_id, updates)
        return self.get_user(user_id)

    def get_user(self, user_id: int) -> User | None:
        row = next(iter(self.db["users"].rows_where("id = ?", [user_id])), None)
        return from_row(User, row) if row else None

    def set_user_language(self, user_id: int, language: str) -> None:
        self.upsert_user(user_id, language=language)

    # ----------------------------------------------------------- assistants
    def create_assistant(self, name: str, *, description: str = "", system_prompt: str = "",
                         base_model: str = "", owner_id: int | None = None) -> Assistant:
        name = name.strip()
        if not name:
            raise InvalidValue("assistant name must not be empty")
        if len(name) > 64:
            raise InvalidValue("assistant name must be at most 64 characters")
        with transaction(self.db):
            if self.find_assistant(name) is not None:
                raise InvalidValue(f"an assistant named {name!r} already exists")
            aid = self.db["assistants"].insert({
                "name": name, "description": description, "system_prompt": system_prompt,
                "base_model": base_model, "created_by": owner_id, "created_at": self.now(),
            }).last_pk
            if owner_id is not None:
                self.upsert_user(owner_id)
                self.db["members"].insert({"assistant_id": aid, "user_id": owner_id, "role": "owner",
                                           "added_at": self.now()})
            self.audit("assistant.create", user_id=owner_id, assistant_id=aid, details={"name": name})
        return self.get_assistant(aid)

    def get_assistant(self, assistant_id: int) -> Assistant:
        row = next(iter(self.db["assistants"].rows_where("id = ? and deleted_at is null", [assistant_id])), None)
        if row is None:
            raise NotFound(f"assistant #{assistant_id} not found")
        return from_row(Assistant, row)

    def find_assistant(self, name: str) -> Assistant | None:
        row = next(iter(self.db["assistants"].rows_where("name = ? and deleted_at is null", [name.strip()])), None)
        return from_row(Assistant, row) if row else None

    def assistant_by_name(self, name: str) -> Assistant:
        found = self.find_assistant(name)
        if found is None:
            raise NotFound(f"no assistant named {name!r}; see `tunebot assistants list`")
        return found

    def list_assistants(self, *, user_id: int | None = None) -> list[Assistant]:
        if user_id is None:
            rows = self.db["assistants"].rows_where("deleted_at is null", order_by="id")
        else:
            rows = self.db.query(
                "select a.* from assistants a join members m on m.assistant_id = a.id "
                "where m.user_id = ? and a.deleted_at is null order by a.id", [user_id])
        return [from_row(Assistant, r) for r in rows]

    def update_assistant(self, assistant_id: int, **fields: Any) -> Assistant:
        allowed = {"description", "system_prompt", "base_model", "active_version_id", "name"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidValue(f"cannot update {', '.join(sorted(unknown))}")
        with transaction(self.db):
            self.get_assistant(assistant_id)
            if "name" in fields:
                fields["name"] = str(fields["name"]).strip()
                other = self.find_assistant(fields["name"])
                if not fields["name"] or (other is not None and other.id != assistant_id):
                    raise InvalidValue(f"an assistant named {fields['name']!r} already exists" if other
                                       else "assistant name must not be empty")
            self.db["assistants"].update(assistant_id, fields)
        return self.get_assistant(assistant_id)

    # -------------------------------------------------------------- members
    def add_member(self, assistant_id: int, user_id: int, role: str) -> Member:
        _check(role, ROLES, "role")
        with transaction(self.db):
            self.get_assistant(assistant_id)
            self.upsert_user(user_id)
            self.db["members"].upsert({"assistant_id": assistant_id, "user_id": user_id, "role": role,
                                       "added_at": self.now()}, pk=("assistant_id", "user_id"))
            self.audit("member.set", assistant_id=assistant_id, details={"user_id": user_id, "role": role})
        return self.get_member(assistant_id, user_id)

    def get_member(self, assistant_id: int, user_id: int) -> Member | None:
        row = next(iter(self.db["members"].rows_where("assistant_id = ? and user_id = ?",
                                                      [assistant_id, user_id])), None)
        return from_row(Member, row) if row else None

    def role_of(self, assistant_id: int, user_id: int) -> str | None:
        member = self.get_member(assistant_id, user_id)
        return member.role if member else None

    def list_members(self, assistant_id: int) -> list[Member]:
        return [from_row(Member, r) for r in
                self.db["members"].rows_where("assistant_id = ?", [assistant_id], order_by="added_at")]

    # The condition that keeps an owner is part of the write itself, so two owners removing or demoting
    # each other at the same moment cannot leave the assistant with none.
    _KEEPS_AN_OWNER = ("(role != 'owner' or (select count(*) from members o "
                       "where o.assistant_id = members.assistant_id and o.role = 'owner') > 1)")

    def set_member_role(self, assistant_id: int, user_id: int, role: str, *, by: int | None = None) -> Member:
        """Change the role of a current member; the last owner cannot be demoted."""
        _check(role, ROLES, "role")
        with transaction(self.db):
            if self.get_member(assistant_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member")
            changed = self.db.execute(
                f"update members set role = ? where assistant_id = ? and user_id = ? "
                f"and (? = 'owner' or {self._KEEPS_AN_OWNER})", [role, assistant_id, user_id, role]).rowcount
            if not changed:
                raise LastOwner()
            self.audit("member.set", user_id=by, assistant_id=assistant_id, details={"user_id": user_id, "role": role})
        return self.get_member(assistant_id, user_id)

    def remove_member(self, assistant_id: int, user_id: int, *, by: int | None = None) -> None:
        with transaction(self.db):
            if self.get_member(assistant_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member")
            removed = self.db.execute(f"delete from members where assistant_id = ? and user_id = ? "
                                      f"and {self._KEEPS_AN_OWNER}", [assistant_id, user_id]).rowcount
            if not removed:
                raise LastOwner()
            self.audit("member.remove", user_id=by, assistant_id=assistant_id, details={"user_id": user_id})

    # -------------------------------------------------------------- invites
    def create_invite(self, assistant_id: int, role: str, *, uses: int = 1, ttl_hours: float = 72,
                      created_by: int | None = None) -> Invite:
        _check(role, ROLES, "role")
        if not 1 <= uses <= INVITE_MAX_USES:
            raise InvalidValue(f"an invite has 1 to {INVITE_MAX_USES} uses")
        least, most = INVITE_TTL_HOURS
        if not (math.isfinite(ttl_hours) and least <= ttl_hours <= most):
            raise InvalidValue(f"an invite is valid for {least} to {most} hours (30 days)")
        token = secrets.token_urlsafe(12)
        expires = fmt_time(self.clock() + dt.timedelta(hours=ttl_hours))
        with transaction(self.db):
            self.db["invites"].insert({"token": token, "assistant_id": assistant_id, "role": role,
                                       "expires_at": expires, "uses_left": uses, "created_by": created_by,
                                       "created_at": self.now()})
            self.audit("invite.create", user_id=created_by, assistant_id=assistant_id,
                       details={"role": role, "uses": uses})
        return from_row(Invite, self.db["invites"].get(token))

    def redeem_invite(self, token: str, user_id: int) -> Member:
        """Use one invite: the user becomes a member with its role.

        A member who already has that role or a higher one keeps it, and the invite keeps its use. The use
        is taken by one conditional UPDATE, so two people cannot both take the last one.
        """
        now = self.now()
        with transaction(self.db):
            row = next(iter(self.db["invites"].rows_where("token = ?", [token])), None)
            if row is None:
                raise NotFound("this invite link is not valid")
            assistant_id, role = row["assistant_id"], row["role"]
            current = self.get_member(assistant_id, user_id)
            if current is not None and ROLES.index(current.role) <= ROLES.index(role):
                return current
            taken = self.db.execute(
                "update invites set uses_left = uses_left - 1 where token = ? and uses_left > 0 "
                "and (expires_at is null or expires_at >= ?) returning uses_left", [token, now]).fetchone()
            if taken is None:
                left = self.db.execute("select uses_left from invites where token = ?", [token]).fetchone()[0]
                raise InvalidValue("this invite link has been used up; ask for a new one" if left <= 0
                                   else "this invite link has expired; ask for a new one")
            self.db.execute("insert or ignore into users (id, created_at) values (?, ?)", [user_id, now])
            self.db.execute("insert into members (assistant_id, user_id, role, added_at) values (?, ?, ?, ?) "
                            "on conflict (assistant_id, user_id) do update set role = excluded.role",
                            [assistant_id, user_id, role, now])
            self.audit("invite.redeem", user_id=user_id, assistant_id=assistant_id, details={"role": role})
        return self.get_member(assistant_id, user_id)

    # ------------------------------------------------------------- examples
    def find_duplicate(self, assistant_id: int, question: str, *, exclude_id: int | None = None) -> Example | None:
        """The live example of this assistant whose normalized question equals this one."""
        row = self._duplicate_of(assistant_id, question_hash(question), exclude_id=exclude_id)
        return self.get_example(row[0]) if row else None

    def _duplicate_of(self, assistant_id: int, qh: str, *, exclude_id: int | None = None) -> tuple[int, str] | None:
        return self.db.execute(
            "select id, question from examples where assistant_id = ? and question_hash = ? and deleted_at is null "
            "and status != 'rejected' and id != ? limit 1", [assistant_id, qh, exclude_id or -1]).fetchone()

    def add_example(self, assistant_id: int, question: str, answer: str, *, source: str = "expert",
                    status: str = "approved", split: str = "train", parent_id: int | None = None,
                    method: str | None = None, author_id: int | None = None,
                    generation_run_id: int | None = None, document_id: int | None = None,
                    chunk_ref: str | None = None, judge_score: float | None = None,
                    must_contain: list[str] | None = None, allow_duplicate: bool = False) -> Example:
        """Insert one example; raises DuplicateExample when its normalized question exists."""
        _check(source, SOURCES, "source")
        _check(status, STATUSES, "status")
        _check(split, SPLITS, "split")
        question, answer = question.strip(), answer.strip()
        if not question or not answer:
            raise InvalidValue("question and answer must both be non-empty")
        with transaction(self.db):
            if not allow_duplicate:
                dup = self.find_duplicate(assistant_id, question)
                if dup is not None:
                    raise DuplicateExample(dup.id, dup.question)
            eid = self._insert_example({
                "assistant_id": assistant_id, "question": question, "answer": answer, "source": source,
                "status": status, "split": split, "parent_id": parent_id, "method": method,
                "author_id": author_id, "generation_run_id": generation_run_id, "document_id": document_id,
                "chunk_ref": chunk_ref, "judge_score": judge_score, "must_contain": must_contain,
            }, self.now())
        return self.get_example(eid)

    def add_examples(self, assistant_id: int, items: Iterable[NewExample], *, source: str = "import",
                     status: str = "pending", author_id: int | None = None) -> list[int | StorageError]:
        """Insert many examples in one transaction; per item, its new id or why it was skipped.

        An item is skipped with DuplicateExample (a live example, or an earlier item, has its question) or
        InvalidValue (empty text, unknown split, a row the database refuses); the others are kept. Each
        item's row and its history row go in together or not at all.
        """
        _check(source, SOURCES, "source")
        _check(status, STATUSES, "status")
        now = self.now()
        outcomes: list[int | StorageError] = []
        with transaction(self.db):
            for item in items:
                outcomes.append(self._add_one(assistant_id, item, source=source, status=status,
                                              author_id=author_id, now=now))
        return outcomes

    def _add_one(self, assistant_id: int, item: NewExample, *, source: str, status: str, author_id: int | None,
                 now: str) -> int | StorageError:
        question, answer = item.question.strip(), item.answer.strip()
        if not question or not answer:
            return InvalidValue("question and answer must both be non-empty")
        if item.split not in SPLITS:
            return InvalidValue(f"unknown split {item.split!r}; expected one of: {', '.join(SPLITS)}")
        dup = self._duplicate_of(assistant_id, question_hash(question))
        if dup is not None:
            return DuplicateExample(dup[0], dup[1])
        conn = self.db.conn
        conn.execute("SAVEPOINT add_example")
        try:
            eid = self._insert_example({
                "assistant_id": assistant_id, "question": question, "answer": answer, "source": source,
                "status": status, "split": item.split, "author_id": author_id,
                "must_contain": list(item.must_contain) if item.must_contain else None}, now)
        except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
            if not conn.in_transaction:  # the database rolled back the whole batch: nothing to skip past
                raise
            conn.execute("ROLLBACK TO add_example")
            conn.execute("RELEASE add_example")
            return InvalidValue(f"the database refused it ({exc})")
        conn.execute("RELEASE add_example")
        return eid

    def _insert_example(self, values: dict[str, Any], now: str) -> int:
        """One examples row and its "create" history row, in the caller's transaction."""
        question, must_contain = values["question"], values.get("must_contain")
        row = {**values, "must_contain": json.dumps(must_contain, ensure_ascii=False) if must_contain else None,
               "question_hash": question_hash(question), "created_at": now, "updated_at": now}
        columns = ", ".join(f"[{name}]" for name in row)
        cur = self.db.execute(f"insert into examples ({columns}) values ({', '.join('?' * len(row))})",
                              list(row.values()))
        self.db.execute("insert into example_history (example_id, action, question, answer, status, changed_by, "
                        "changed_at) values (?, 'create', ?, ?, ?, ?, ?)",
                        [cur.lastrowid, question, values["answer"], values["status"], values.get("author_id"), now])
        return cur.lastrowid

    def _history(self, example_id: int, action: str, question: str, answer: str, status: str,
                 by: int | None) -> None:
        self.db["example_history"].insert({"example_id": example_id, "action": action, "question": question,
                                           "answer": answer, "status": status, "changed_by": by,
                                           "changed_at": self.now()})

    def get_example(self, example_id: int, *, include_deleted: bool = False) -> Example:
        where = "id = ?" + ("" if include_deleted else " and deleted_at is null")
        row = next(iter(self.db["examples"].rows_where(where, [example_id])), None)
        if row is None:
            raise NotFound(f"example #{example_id} not found")
        return from_row(Example, row)

    def edit_example(self, example_id: int, *, question: str | None = None, answer: str | None = None,
                     split: str | None = None, by: int | None = None) -> Example:
        """Change the text; the previous text stays in `example_history`."""
        with transaction(self.db):
            return self._edit_example(example_id, question=question, answer=answer, split=split, by=by)

    def _edit_example(self, example_id: int, *, question: str | None, answer: str | None, split: str | None,
                      by: int | None) -> Example:
        ex = self.get_example(example_id)
        updates: dict[str, Any] = {}
        if question is not None and question.strip() and question.strip() != ex.question:
            dup = self.find_duplicate(ex.assistant_id, question, exclude_id=example_id)
            if dup is not None:
                raise DuplicateExample(dup.id, dup.question)
            updates["question"] = question.strip()
            updates["question_hash"] = question_hash(question)
        if answer is not None and answer.strip() and answer.strip() != ex.answer:
            updates["answer"] = answer.strip()
        if split is not None and split != ex.split:
            updates["split"] = _check(split, SPLITS, "split")
        if not updates:
            return ex
        updates["updated_at"] = self.now()
        self.db["examples"].update(example_id, updates)
        new = self.get_example(example_id)
        self._history(example_id, "edit", new.question, new.answer, new.status, by)
        return new

    def delete_example(self, example_id: int, *, by: int | None = None) -> None:
        """Soft delete: the row stays, marked deleted, and the history records who did it."""
        with transaction(self.db):
            ex = self.get_example(example_id)
            self.db["examples"].update(example_id, {"deleted_at": self.now(), "updated_at": self.now()})
            self._history(example_id, "delete", ex.question, ex.answer, ex.status, by)

    def restore_example(self, example_id: int, *, by: int | None = None) -> Example:
        with transaction(self.db):
            ex = self.get_example(example_id, include_deleted=True)
            dup = self.find_duplicate(ex.assistant_id, ex.question, exclude_id=example_id)
            if dup is not None and ex.status != "rejected":
                raise DuplicateExample(dup.id, dup.question)
            self.db["examples"].update(example_id, {"deleted_at": None, "updated_at": self.now()})
            self._history(example_id, "restore", ex.question, ex.answer, ex.status, by)
        return self.get_example(example_id)

    def example_history(self, example_id: int) -> list[ExampleRevision]:
        return [from_row(ExampleRevision, r) for r in
                self.db["example_history"].rows_where("example_id = ?", [example_id], order_by="id")]

    def set_status(self, example_id: int, status: str, *, by: int | None = None) -> Example:
        _check(status, STATUSES, "status")
        with transaction(self.db):
            ex = self.get_example(example_id)
            self.db["examples"].update(example_id, {"status": status, "reviewer_id": by, "updated_at": self.now()})
            self._history(example_id, status if status != "pending" else "reset", ex.question, ex.answer, status, by)
        return self.get_example(example_id)

    def approve(self, example_id: int, *, by: int | None = None) -> Example:
        return self.set_status(example_id, "approved", by=by)

    def reject(self, example_id: int, *, by: int | None = None) -> Example:
        return self.set_status(example_id, "rejected", by=by)

    def list_examples(self, assistant_id: int, *, status: str | None = None, split: str | None = None,
                      source: str | None = None, generation_run_id: int | None = None,
                      parent_id: int | None = None, roots_only: bool = False,
                      limit: int | None = None, offset: int = 0) -> list[Example]:
        where = ["assistant_id = ?", "deleted_at is null"]
        args: list[Any] = [assistant_id]
        for col, val in (("status", status), ("split", split), ("source", source),
                         ("generation_run_id", generation_run_id), ("parent_id", parent_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if roots_only:
            where.append("parent_id is null")
        rows = self.db["examples"].rows_where(" and ".join(where), args, order_by="id",
                                              limit=limit, offset=offset or None)
        return [from_row(Example, r) for r in rows]

    def examples_signature(self, assistant_id: int) -> str:
        """Changes whenever any of the assistant's examples is added, edited, reviewed or deleted (for caches)."""
        row = self.db.execute(
            "select count(*), max(id), max(coalesce(updated_at, created_at)), sum(deleted_at is null), "
            "sum(status = 'approved'), sum(split = 'train'), sum(id * 7 + length(question) * 13 + length(answer)) "
            "from examples where assistant_id = ?", [assistant_id]).fetchone()
        return "|".join(str(v) for v in row)

    def count_examples(self, assistant_id: int, **filters: Any) -> int:
        return len(self.list_examples(assistant_id, **filters))

    def example_counts(self, assistant_id: int) -> dict[str, dict[str, int]]:
        """Counts of live examples by source, status and split."""
        out: dict[str, dict[str, int]] = {}
        for col in ("source", "status", "split"):
            rows = self.db.query(
                f"select {col} as k, count(*) as n from examples where assistant_id = ? and deleted_at is null "
                f"group by {col} order by {col}", [assistant_id])
            out[col] = {r["k"]: r["n"] for r in rows}
        return out

    # ------------------------------------------------------------ documents
    def add_document(self, assistant_id: int, filename: str, text: str, *, uploaded_by: int | None = None) -> Document:
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        did = self.db["documents"].insert({"assistant_id": assistant_id, "filename": filename, "sha256": sha,
                                           "text": text, "uploaded_by": uploaded_by,
                                           "created_at": self.now()}).last_pk
        return from_row(Document, self.db["documents"].get(did))

    def get_document(self, document_id: int) -> Document:
        try:
            return from_row(Document, self.db["documents"].get(document_id))
        except sqlite_utils.db.NotFoundError:
            raise NotFound(f"document #{document_id} not found") from None

    def list_documents(self, assistant_id: int, *, limit: int | None = None) -> list[Document]:
        """The assistant's documents, newest first."""
        return [from_row(Document, r) for r in self.db["documents"].rows_where(
            "assistant_id = ?", [assistant_id], order_by="id desc", limit=limit)]

    # ------------------------------------------------------ generation runs
    def create_generation_run(self, assistant_id: int, *, method: str, model: str, requested: int = 0,
                              params: dict | None = None) -> GenerationRun:
        rid = self.db["generation_runs"].insert({
            "assistant_id": assistant_id, "method": method, "model": model, "status": "running",
            "requested": requested, "params": json.dumps(params or {}), "created_at": self.now(),
        }).last_pk
        return self.get_generation_run(rid)

    def get_generation_run(self, run_id: int) -> GenerationRun:
        try:
            return from_row(GenerationRun, self.db["generation_runs"].get(run_id))
        except sqlite_utils.db.NotFoundError:
            raise NotFound(f"generation run #{run_id} not found") from None

    def add_generation_usage(self, run_id: int, *, requests: int = 0, prompt_tokens: int = 0,
                             completion_tokens: int = 0, cost_usd: float = 0.0, generated: int = 0,
                             kept: int = 0) -> None:
        """Add to a run's counters atomically (several coroutines may report at once)."""
        self.db.execute(
            "update generation_runs set requests = requests + ?, prompt_tokens = prompt_tokens + ?, "
            "completion_tokens = completion_tokens + ?, cost_usd = cost_usd + ?, generated = generated + ?, "
            "kept = kept + ? where id = ?",
            [requests, prompt_tokens, completion_tokens, cost_usd, generated, kept, run_id])

    def finish_generation_run(self, run_id: int, *, status: str = "succeeded", error: str | None = None) -> GenerationRun:
        self.db["generation_runs"].update(run_id, {"status": status, "error": error, "finished_at": self.now()})
        return self.get_generation_run(run_id)

    def reopen_generation_run(self, run_id: int) -> GenerationRun:
        """Mark a stopped or failed run as running again (resuming it)."""
        self.get_generation_run(run_id)
        self.db["generation_runs"].update(run_id, {"status": "running", "error": None, "finished_at": None})
        return self.get_generation_run(run_id)

    def list_generation_runs(self, assistant_id: int) -> list[GenerationRun]:
        return [from_row(GenerationRun, r) for r in
                self.db["generation_runs"].rows_where("assistant_id = ?", [assistant_id], order_by="id")]

    # ----------------------------------------------------------------- jobs
    def create_job(self, kind: str, *, assistant_id: int | None = None, params: dict | None = None,
                   priority: int = 0, gpus: int = 0, scheduled_at: str | None = None,
                   max_attempts: int = 3, created_by: int | None = None) -> Job:
        _check(kind, JOB_KINDS, "job kind")
        with transaction(self.db):
            jid = self.db["jobs"].insert({
                "kind": kind, "assistant_id": assistant_id, "status": "scheduled" if scheduled_at else "queued",
                "priority": priority, "gpus": gpus, "params": json.dumps(params or {}, ensure_ascii=False),
                "scheduled_at": scheduled_at, "max_attempts": max_attempts, "created_by": created_by,
                "created_at": self.now(),
            }).last_pk
            self.audit("job.create", user_id=created_by, assistant_id=assistant_id,
                       details={"job_id": jid, "kind": kind})
        return self.get_job(jid)

    def get_job(self, job_id: int) -> Job:
        try:
            return from_row(Job, self.db["jobs"].get(job_id))
        except sqlite_utils.db.NotFoundError:
            raise NotFound(f"job #{job_id} not found") from None

    def list_jobs(self, *, assistant_id: int | None = None, status: str | Iterable[str] | None = None,
                  limit: int | None = None) -> list[Job]:
        where, args = [], []
        if assistant_id is not None:
            where.append("assistant_id = ?")
            args.append(assistant_id)
        if status is not None:
            states = [status] if isinstance(status, str) else list(status)
            where.append(f"status in ({', '.join('?' * len(states))})")
            args.extend(states)
        rows = self.db["jobs"].rows_where(" and ".join(where) or None, args, order_by="id desc", limit=limit)
        return [from_row(Job, r) for r in rows]

    def update_job(self, job_id: int, **fields: Any) -> Job:
        if "status" in fields:
            _check(fields["status"], JOB_STATES, "job status")
        for key in ("params", "progress", "result"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], ensure_ascii=False)
        self.db["jobs"].update(job_id, fields)
        return self.get_job(job_id)

    def transition_job(self, job_id: int, *, from_states: Iterable[str], **fields: Any) -> bool:
        """Update a job only while its status is one of `from_states`; False when it was not."""
        if "status" in fields:
            _check(fields["status"], JOB_STATES, "job status")
        for key in ("params", "progress", "result"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], ensure_ascii=False)
        states = list(from_states)
        sets = ", ".join(f"[{k}] = ?" for k in fields)
        cur = self.db.execute(
            f"update jobs set {sets} where id = ? and status in ({', '.join('?' * len(states))})",
            [*fields.values(), job_id, *states])
        return cur.rowcount == 1

    def claim_job(self, *, worker_id: str, free: int, gpu_mode: bool,
                  exclude_kinds: Iterable[str] = ()) -> Job | None:
        """Atomically take the best queued job that fits `free` slots (GPUs in gpu_mode), or None."""
        excluded = list(exclude_kinds)
        need = "max(coalesce(gpus, 0), 1)" if gpu_mode else "1"
        kinds = f"and kind not in ({', '.join('?' * len(excluded))})" if excluded else ""
        now = self.now()
        with transaction(self.db):  # an UPDATE … RETURNING is not committed by sqlite-utils on its own
            row = self.db.execute(
                "update jobs set status = 'running', worker_id = ?, attempts = attempts + 1, started_at = ?, "
                "heartbeat_at = ?, error = null, pid = null where id = (select id from jobs where status = 'queued' "
                f"and {need} <= ? {kinds} order by priority desc, id limit 1) and status = 'queued' returning id",
                [worker_id, now, now, free, *excluded]).fetchone()
        return self.get_job(row[0]) if row else None

    def release_due_jobs(self) -> list[int]:
        """Scheduled jobs whose time has come become queued; returns their ids."""
        with transaction(self.db):
            rows = self.db.execute("update jobs set status = 'queued' where status = 'scheduled' "
                                   "and scheduled_at <= ? returning id", [self.now()]).fetchall()
        return sorted(r[0] for r in rows)

    def worker_heartbeat(self, worker_id: str, *, host: str, pid: int, slots: str) -> None:
        """Record that a worker is alive now (its row is created on the first beat)."""
        now = self.now()
        self.db.execute("insert into workers (id, host, pid, slots, started_at, heartbeat_at) values (?, ?, ?, ?, ?, ?) "
                        "on conflict(id) do update set heartbeat_at = excluded.heartbeat_at",
                        [worker_id, host, pid, slots, now, now])

    def remove_worker(self, worker_id: str) -> None:
        self.db.execute("delete from workers where id = ?", [worker_id])

    def live_workers(self, *, since: str) -> list[dict]:
        """Workers whose last heartbeat is at or after `since`."""
        return list(self.db.query("select * from workers where heartbeat_at >= ? order by id", [since]))

    def count_approved_since(self, assistant_id: int, since: str | None) -> int:
        """Live approved examples added or approved after `since` (all of them when None)."""
        return self.db.execute(
            "select count(*) from examples where assistant_id = ? and status = 'approved' and deleted_at is null "
            "and (? is null or updated_at > ?)", [assistant_id, since, since]).fetchone()[0]

    # ------------------------------------------------------- model versions
    def add_model_version(self, assistant_id: int, *, adapter_path: str, base_model: str,
                          job_id: int | None = None, dataset_hash: str | None = None,
                          hyperparameters: dict | None = None, metrics: dict | None = None) -> ModelVersion:
        with transaction(self.db):
            vid = self.db["model_versions"].insert({
                "assistant_id": assistant_id, "job_id": job_id, "adapter_path": adapter_path,
                "base_model": base_model, "dataset_hash": dataset_hash,
                "hyperparameters": json.dumps(hyperparameters or {}), "metrics": json.dumps(metrics or {}),
                "status": "candidate", "created_at": self.now(),
            }).last_pk
            self.audit("version.create", assistant_id=assistant_id, details={"version_id": vid, "job_id": job_id})
        return self.get_model_version(vid)

    def get_model_version(self, version_id: int) -> ModelVersion:
        try:
            return from_row(ModelVersion, self.db["model_versions"].get(version_id))
        except sqlite_utils.db.NotFoundError:
            raise NotFound(f"model version #{version_id} not found") from None

    def list_model_versions(self, assistant_id: int) -> list[ModelVersion]:
        return [from_row(ModelVersion, r) for r in
                self.db["model_versions"].rows_where("assistant_id = ?", [assistant_id], order_by="id")]

    def recent_model_versions(self, *, limit: int = 50) -> list[ModelVersion]:
        """The newest model versions of every assistant, newest first (trained on this installation)."""
        return [from_row(ModelVersion, r) for r in
                self.db["model_versions"].rows_where(order_by="id desc", limit=limit)]

    def activate_version(self, version_id: int, *, by: int | None = None) -> ModelVersion:
        """Make this version the assistant's active one; the previous active one is archived."""
        with transaction(self.db):
            version = self.get_model_version(version_id)
            self.db.execute("update model_versions set status = 'archived' where assistant_id = ? and status = 'active'",
                            [version.assistant_id])
            self.db["model_versions"].update(version_id, {"status": "active", "promoted_at": self.now()})
            self.db["assistants"].update(version.assistant_id, {"active_version_id": version_id})
            self.audit("version.activate", user_id=by, assistant_id=version.assistant_id,
                       details={"version_id": version_id})
        return self.get_model_version(version_id)

    def set_version_status(self, version_id: int, status: str, *, by: int | None = None) -> ModelVersion:
        _check(status, VERSION_STATES, "version status")
        if status == "active":
            return self.activate_version(version_id, by=by)
        with transaction(self.db):
            version = self.get_model_version(version_id)
            self.db["model_versions"].update(version_id, {"status": status})
            if version.status == "active":
                self.db["assistants"].update(version.assistant_id, {"active_version_id": None})
            self.audit(f"version.{status}", user_id=by, assistant_id=version.assistant_id,
                       details={"version_id": version_id})
        return self.get_model_version(version_id)

    # ------------------------------------------------------ retrain policies
    def set_retrain_policy(self, assistant_id: int, *, cron: str, min_new: int = 1, enabled: bool = True) -> RetrainPolicy:
        self.get_assistant(assistant_id)
        self.db["retrain_policies"].upsert({"assistant_id": assistant_id, "cron": cron, "min_new": min_new,
                                            "enabled": int(enabled), "created_at": self.now()}, pk="assistant_id")
        return self.get_retrain_policy(assistant_id)

    def get_retrain_policy(self, assistant_id: int) -> RetrainPolicy | None:
        row = next(iter(self.db["retrain_policies"].rows_where("assistant_id = ?", [assistant_id])), None)
        return from_row(RetrainPolicy, row) if row else None

    def list_retrain_policies(self) -> list[RetrainPolicy]:
        return [from_row(RetrainPolicy, r) for r in self.db["retrain_policies"].rows_where("enabled = 1")]

    def mark_policy_run(self, assistant_id: int) -> None:
        self.db["retrain_policies"].update(assistant_id, {"last_run_at": self.now()})

    # ------------------------------------------------------------- api keys
    def create_api_key(self, assistant_id: int, *, name: str = "", created_by: int | None = None) -> tuple[ApiKey, str]:
        """Return the record and the plain key, which is shown once and stored only hashed."""
        self.get_assistant(assistant_id)
        key = "tb-" + secrets.token_urlsafe(32)
        with transaction(self.db):
            kid = self.db["api_keys"].insert({"assistant_id": assistant_id, "prefix": key[:10],
                                              "key_hash": hash_api_key(key), "name": name, "created_by": created_by,
                                              "created_at": self.now()}).last_pk
            self.audit("apikey.create", user_id=created_by, assistant_id=assistant_id,
                       details={"key_id": kid, "prefix": key[:10]})
        return from_row(ApiKey, self.db["api_keys"].get(kid)), key

    def lookup_api_key(self, key: str) -> ApiKey | None:
        row = next(iter(self.db["api_keys"].rows_where("key_hash = ? and revoked_at is null", [hash_api_key(key)])), None)
        return from_row(ApiKey, row) if row else None

    def use_api_key(self, key: str) -> ApiKey | None:
        """The live key for a request (None when unknown or revoked), its last_used_at brought up to date.

        The time is written only when the stored one is older than API_KEY_TOUCH_S, so busy clients do not
        make every request a write.
        """
        found = self.lookup_api_key(key)
        if found is None:
            return None
        now = self.clock()
        if found.last_used_at is None or parse_time(found.last_used_at) <= now - dt.timedelta(seconds=API_KEY_TOUCH_S):
            self.db.execute("update api_keys set last_used_at = ? where id = ?", [fmt_time(now), found.id])
            found = dataclasses.replace(found, last_used_at=fmt_time(now))
        return found

    def list_api_keys(self, assistant_id: int) -> list[ApiKey]:
        return [from_row(ApiKey, r) for r in self.db["api_keys"].rows_where("assistant_id = ?", [assistant_id], order_by="id")]

    def revoke_api_key(self, key_id: int, *, by: int | None = None) -> bool:
        """Revoke a key (True), or say it already was (False)."""
        with transaction(self.db):
            row = next(iter(self.db["api_keys"].rows_where("id = ?", [key_id])), None)
            if row is None:
                raise NotFound(f"API key #{key_id} not found")
            revoked = self.db.execute("update api_keys set revoked_at = ? where id = ? and revoked_at is null",
                                      [self.now(), key_id]).rowcount
            if not revoked:
                return False
            self.audit("apikey.revoke", user_id=by, assistant_id=row["assistant_id"], details={"key_id": key_id})
        return True

    # ---------------------------------------------------------- conversations
    def start_conversation(self, assistant_id: int, user_id: int | None, *, mode: str = "tuned") -> int:
        return self.db["conversations"].insert({"assistant_id": assistant_id, "user_id": user_id, "mode": mode,
                                                "created_at": self.now()}).last_pk

    def add_message(self, conversation_id: int, role: str, text: str, *, model_version_id: int | None = None,
                    mode: str | None = None, latency_ms: float | None = None, sources: Sequence[int] | None = None,
                    confidence: float | None = None, abstained: bool = False) -> int:
        """One chat message; an answer may name the example ids it drew on and how confident it was."""
        return self.db["messages"].insert({
            "conversation_id": conversation_id, "role": role, "text": text, "model_version_id": model_version_id,
            "mode": mode, "latency_ms": latency_ms,
            "sources": None if sources is None else json.dumps([int(i) for i in sources]),
            "confidence": confidence, "abstained": int(bool(abstained)), "created_at": self.now()}).last_pk

    def get_message(self, message_id: int) -> dict:
        try:
            return self.db["messages"].get(message_id)
        except sqlite_utils.db.NotFoundError:
            raise NotFound(f"message #{message_id} not found") from None

    def message_sources(self, message_id: int) -> list[int]:
        """The example ids the answer `message_id` drew on ([] when it names none)."""
        raw = self.get_message(message_id).get("sources")
        return [int(i) for i in json.loads(raw)] if raw else []

    def message_assistant(self, message_id: int) -> int | None:
        """The assistant whose conversation holds this message (None when there is no such message)."""
        row = self.db.execute("select c.assistant_id from messages m join conversations c on c.id = m.conversation_id "
                              "where m.id = ?", [message_id]).fetchone()
        return row[0] if row else None

    def message_user(self, message_id: int) -> int | None:
        """The user whose conversation holds this message (None for API traffic, or when there is no such message)."""
        row = self.db.execute("select c.user_id from messages m join conversations c on c.id = m.conversation_id "
                              "where m.id = ?", [message_id]).fetchone()
        return row[0] if row else None

    def question_before(self, message_id: int) -> str | None:
        """The text of the user message that the answer `message_id` replied to (the last one before it)."""
        row = self.db.execute(
            "select q.text from messages a join messages q on q.conversation_id = a.conversation_id "
            "where a.id = ? and q.role = 'user' and q.id < a.id order by q.id desc limit 1", [message_id]).fetchone()
        return row[0] if row else None

    def feedback_counts(self, assistant_id: int) -> dict[str, int]:
        """How many answers in this assistant's chats got each feedback ("up", "down")."""
        rows = self.db.execute(
            "select m.feedback, count(*) from messages m join conversations c on c.id = m.conversation_id "
            "where c.assistant_id = ? and m.feedback is not null group by m.feedback order by m.feedback",
            [assistant_id]).fetchall()
        return dict(rows)

    def count_version_answers(self, assistant_id: int) -> int:
        """How many answers in this assistant's chats came from one of its trained versions."""
        return self.db.execute(
            "select count(*) from messages m join conversations c on c.id = m.conversation_id "
            "where c.assistant_id = ? and m.role = 'assistant' and m.model_version_id is not null",
            [assistant_id]).fetchone()[0]

    def set_feedback(self, message_id: int, feedback: str, *, correction: str | None = None,
                     correction_example_id: int | None = None) -> None:
        self.db["messages"].update(message_id, {"feedback": feedback, "correction": correction,
                                                "correction_example_id": correction_example_id})

    # ----------------------------------------------------------- unanswered
    def add_unanswered(self, assistant_id: int, question: str, *, user_id: int | None = None,
                       conversation_id: int | None = None, message_id: int | None = None) -> Unanswered:
        """Record a question the assistant did not answer confidently; it waits, open, for an expert."""
        question = question.strip()
        if not question:
            raise InvalidValue("the question must not be empty")
        self.get_assistant(assistant_id)
        item_id = self.db["unanswered"].insert({
            "assistant_id": assistant_id, "question": question, "user_id": user_id,
            "conversation_id": conversation_id, "message_id": message_id, "status": "open",
            "created_at": self.now()}).last_pk
        return self.get_unanswered(item_id)

    def get_unanswered(self, item_id: int) -> Unanswered:
        row = next(iter(self.db["unanswered"].rows_where("id = ?", [item_id])), None)
        if row is None:
            raise NotFound(f"unanswered question #{item_id} not found")
        return from_row(Unanswered, row)

    def _unanswered_where(self, assistant_id: int, status: str | None) -> tuple[str, list]:
        if status is None:
            return "assistant_id = ?", [assistant_id]
        return "assistant_id = ? and status = ?", [assistant_id, _check(status, UNANSWERED_STATES, "status")]

    def list_unanswered(self, assistant_id: int, *, status: str | None = "open") -> list[Unanswered]:
        """This assistant's unanswered questions in `status` (every status when None), oldest first."""
        where, args = self._unanswered_where(assistant_id, status)
        return [from_row(Unanswered, r) for r in self.db["unanswered"].rows_where(where, args, order_by="id")]

    def count_unanswered(self, assistant_id: int, *, status: str | None = "open") -> int:
        where, args = self._unanswered_where(assistant_id, status)
        return self.db.execute(f"select count(*) from unanswered where {where}", args).fetchone()[0]

    def answer_unanswered(self, item_id: int, answer: str, *, by: int | None) -> Example:
        """An expert's answer: an approved example of the question, and the item answered, in one transaction.

        When a live example already has this question, that example takes the new answer (its old text stays
        in the history) and is approved, instead of a second example that would contradict it.
        """
        answer = answer.strip()
        if not answer:
            raise InvalidValue("the answer must not be empty")
        now = self.now()
        with transaction(self.db):
            item = self.get_unanswered(item_id)
            if item.status != "open":
                raise NotOpen(f"question #{item_id} was already {item.status}")
            dup = self._duplicate_of(item.assistant_id, question_hash(item.question))
            if dup is None:
                example_id = self._insert_example({
                    "assistant_id": item.assistant_id, "question": item.question, "answer": answer,
                    "source": "expert", "status": "approved", "split": "train", "author_id": by,
                    "reviewer_id": by}, now)
            else:
                example_id = dup[0]
                self.db.execute("update examples set answer = ?, status = 'approved', reviewer_id = ?, updated_at = ? "
                                "where id = ?", [answer, by, now, example_id])
                self.db.execute("insert into example_history (example_id, action, question, answer, status, "
                                "changed_by, changed_at) values (?, 'edit', ?, ?, 'approved', ?, ?)",
                                [example_id, dup[1], answer, by, now])
            self.db.execute("update unanswered set status = 'answered', example_id = ?, answered_by = ?, "
                            "answered_at = ? where id = ?", [example_id, by, now, item_id])
            self.audit("unanswered.answer", user_id=by, assistant_id=item.assistant_id,
                       details={"item_id": item_id, "example_id": example_id, "existing": dup is not None})
        return self.get_example(example_id)

    def dismiss_unanswered(self, item_id: int, *, by: int | None) -> Unanswered:
        """Close an item without an answer (spam, off-topic); who and when go to answered_by/answered_at."""
        with transaction(self.db):
            item = self.get_unanswered(item_id)
            if item.status != "open":
                raise NotOpen(f"question #{item_id} was already {item.status}")
            self.db.execute("update unanswered set status = 'dismissed', answered_by = ?, answered_at = ? where id = ?",
                            [by, self.now(), item_id])
            self.audit("unanswered.dismiss", user_id=by, assistant_id=item.assistant_id, details={"item_id": item_id})
        return self.get_unanswered(item_id)

    def unnotified_unanswered(self) -> list[Unanswered]:
        """Open items of every assistant that no expert has been told about yet, oldest first."""
        return [from_row(Unanswered, r) for r in
                self.db["unanswered"].rows_where("status = 'open' and notified_at is null", order_by="id")]

    def mark_unanswered_notified(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        if ids:
            self.db.execute(f"update unanswered set notified_at = ? where id in ({', '.join('?' * len(ids))})",
                            [self.now(), *ids])

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
