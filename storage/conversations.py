"""Conversations, answers with their sources and feedback, and unanswered questions."""

from __future__ import annotations

import json
from typing import Iterable, Sequence


from storage.common import check_value, one_row
from storage.db import transaction
from storage.errors import InvalidValue, NotOpen
from storage.records import UNANSWERED_STATES, Example, Unanswered, from_row
from storage.text import question_hash


class ConversationStore:
    """The store part about answering (mixed into Store)."""

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
        return one_row(self.db, "messages", message_id, "message")

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
        # A customer's conversation: the item carries the customer and their chat, so the answer goes back there.
        customer = None if conversation_id is None else self.db.execute(
            "select cu.id, cu.chat_id from conversations c join customers cu on cu.id = c.customer_id "
            "where c.id = ? and cu.assistant_id = ?", [conversation_id, assistant_id]).fetchone()
        item_id = self.db["unanswered"].insert({
            "assistant_id": assistant_id, "question": question, "user_id": user_id,
            "conversation_id": conversation_id, "message_id": message_id, "status": "open",
            "customer_id": customer[0] if customer else None, "chat_id": customer[1] if customer else None,
            "created_at": self.now()}).last_pk
        return self.get_unanswered(item_id)

    def get_unanswered(self, item_id: int) -> Unanswered:
        return from_row(Unanswered, one_row(self.db, "unanswered", item_id, "unanswered question"))

    def _unanswered_where(self, assistant_id: int, status: str | None) -> tuple[str, list]:
        if status is None:
            return "assistant_id = ?", [assistant_id]
        return "assistant_id = ? and status = ?", [assistant_id, check_value(status, UNANSWERED_STATES, "status")]

    def list_unanswered(self, assistant_id: int, *, status: str | None = "open") -> list[Unanswered]:
        """This assistant's unanswered questions in `status` (every status when None), oldest first."""
        where, args = self._unanswered_where(assistant_id, status)
        return [from_row(Unanswered, r) for r in self.db["unanswered"].rows_where(where, args, order_by="id")]

    def count_unanswered(self, assistant_id: int, *, status: str | None = "open") -> int:
        where, args = self._unanswered_where(assistant_id, status)
        return self.db.execute(f"select count(*) from unanswered where {where}", args).fetchone()[0]

    def answer_unanswered(self, item_id: int, answer: str, *, by: int | None, question: str | None = None) -> Example:
        """An expert's answer: an approved example of the question (or of `question`, its general form as the
        expert reworded it: a customer's own words stay on the item), and the item answered, in one transaction.

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
            asked = (question or "").strip() or item.question
            dup = self._duplicate_of(item.assistant_id, question_hash(asked))
            if dup is None:
                example_id = self._insert_example({
                    "assistant_id": item.assistant_id, "question": asked, "answer": answer,
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
                            "answered_at = ?, answer = ? where id = ?", [example_id, by, now, answer, item_id])
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
