"""Examples (with their history and review status), documents and generation runs."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Iterable


from storage.common import check_value, one_row
from storage.db import transaction
from storage.errors import DuplicateExample, InvalidValue, StorageError
from storage.records import (
    SOURCES, SPLITS, STATUSES, Document, Example, ExampleRevision, GenerationRun, NewExample,
    from_row,
)
from storage.text import question_hash


class ExampleStore:
    """The store part about training data (mixed into Store)."""

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
        check_value(source, SOURCES, "source")
        check_value(status, STATUSES, "status")
        check_value(split, SPLITS, "split")
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
        check_value(source, SOURCES, "source")
        check_value(status, STATUSES, "status")
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
        return from_row(Example, one_row(self.db, "examples", example_id, "example", where=where))

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
            updates["split"] = check_value(split, SPLITS, "split")
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
        check_value(status, STATUSES, "status")
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
        return from_row(Document, one_row(self.db, "documents", document_id, "document"))

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
        return from_row(GenerationRun, one_row(self.db, "generation_runs", run_id, "generation run"))

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
