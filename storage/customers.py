"""Customers: published assistants (a revocable link token, channels, greeting), the people who ask them in
Telegram, their groups and business connections, and getting the team's answers back to them."""

from __future__ import annotations

import datetime as dt
import secrets

from storage.common import check_value, fmt_time, one_row
from storage.db import transaction
from storage.errors import InvalidValue, NotFound
from storage.records import CHANNELS, Customer, Example, Publication, Unanswered, from_row
from storage.text import question_hash

TOKEN_PREFIX = "c_"  # a customer link's start payload; invites have none (Telegram allows A-Z a-z 0-9 _ -, 64)
MAX_GREETING = 1000


def _token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(12)


class CustomerStore:
    """The store part about customers (mixed into Store)."""

    # --------------------------------------------------------- publications
    def get_publication(self, assistant_id: int) -> Publication | None:
        row = next(iter(self.db["publications"].rows_where("assistant_id = ?", [assistant_id])), None)
        return from_row(Publication, row) if row else None

    def publication_by_token(self, token: str) -> Publication | None:
        """The publication whose link carries this token (None for an unknown, regenerated or deleted one)."""
        row = next(self.db.query("select p.* from publications p join assistants a on a.id = p.assistant_id "
                                 "where p.token = ? and a.deleted_at is null", [token]), None)
        return from_row(Publication, row) if row else None

    def publish(self, assistant_id: int, *, by: int | None = None) -> Publication:
        """Offer the assistant to customers (a new link the first time; the same link again after unpublishing)."""
        with transaction(self.db):
            self.get_assistant(assistant_id)
            if self.get_publication(assistant_id) is None:
                now = self.now()
                self.db["publications"].insert({"assistant_id": assistant_id, "token": _token(), "active": 1,
                                                "created_by": by, "created_at": now, "updated_at": now})
            else:
                self._update_publication(assistant_id, {"active": 1})
            self.audit("publication.publish", user_id=by, assistant_id=assistant_id)
        return self.get_publication(assistant_id)

    def unpublish(self, assistant_id: int, *, by: int | None = None) -> Publication:
        """Stop answering customers on every channel at once (the settings are kept for publishing again)."""
        with transaction(self.db):
            self._require_publication(assistant_id)
            self._update_publication(assistant_id, {"active": 0})
            self.audit("publication.unpublish", user_id=by, assistant_id=assistant_id)
        return self.get_publication(assistant_id)

    def regenerate_token(self, assistant_id: int, *, by: int | None = None) -> Publication:
        """A new link; the old one answers nothing from now on (customers who opened it must open the new one)."""
        with transaction(self.db):
            self._require_publication(assistant_id)
            self._update_publication(assistant_id, {"token": _token()})
            self.db.execute("update customers set started_at = null where assistant_id = ? and channel = 'link'",
                            [assistant_id])
            self.audit("publication.revoke", user_id=by, assistant_id=assistant_id)
        return self.get_publication(assistant_id)

    def set_channel(self, assistant_id: int, channel: str, on: bool, *, by: int | None = None) -> Publication:
        check_value(channel, CHANNELS, "channel")
        with transaction(self.db):
            self._require_publication(assistant_id)
            self._update_publication(assistant_id, {channel: int(bool(on))})
            self.audit("publication.channel", user_id=by, assistant_id=assistant_id,
                       details={"channel": channel, "on": bool(on)})
        return self.get_publication(assistant_id)

    def set_greeting(self, assistant_id: int, greeting: str, *, by: int | None = None) -> Publication:
        greeting = greeting.strip()
        if len(greeting) > MAX_GREETING:
            raise InvalidValue(f"the greeting must be at most {MAX_GREETING} characters")
        with transaction(self.db):
            self._require_publication(assistant_id)
            self._update_publication(assistant_id, {"greeting": greeting})
            self.audit("publication.greeting", user_id=by, assistant_id=assistant_id)
        return self.get_publication(assistant_id)

    def _require_publication(self, assistant_id: int) -> Publication:
        self.get_assistant(assistant_id)
        found = self.get_publication(assistant_id)
        if found is None:
            raise NotFound("this assistant is not published yet; publish it first")
        return found

    def _update_publication(self, assistant_id: int, fields: dict) -> None:
        self.db["publications"].update(assistant_id, {**fields, "updated_at": self.now()})

    # ------------------------------------------------------------ customers
    def open_customer(self, assistant_id: int, user_id: int, chat_id: int, *, channel: str = "link",
                      language: str | None = None, business_connection_id: str | None = None) -> Customer:
        """The customer of this assistant in this chat (created the first time), made current in the chat."""
        check_value(channel, CHANNELS, "channel")
        now = self.now()
        with transaction(self.db):
            self.get_assistant(assistant_id)
            found = self.find_customer(assistant_id, user_id, chat_id)
            if found is None:
                conversation_id = self.start_conversation(assistant_id, user_id, mode="auto")
                customer_id = self.db["customers"].insert({
                    "assistant_id": assistant_id, "user_id": user_id, "chat_id": chat_id, "channel": channel,
                    "language": language, "business_connection_id": business_connection_id,
                    "conversation_id": conversation_id, "started_at": now, "last_seen_at": now}).last_pk
                self.db["conversations"].update(conversation_id, {"customer_id": customer_id})
            else:
                customer_id = found.id
                updates = {"started_at": now, "last_seen_at": now, "forgotten_at": None}
                if language:
                    updates["language"] = language
                if business_connection_id:
                    updates["business_connection_id"] = business_connection_id
                self.db["customers"].update(customer_id, updates)
        return self.get_customer(customer_id)

    def get_customer(self, customer_id: int) -> Customer:
        return from_row(Customer, one_row(self.db, "customers", customer_id, "customer"))

    def find_customer(self, assistant_id: int, user_id: int, chat_id: int) -> Customer | None:
        row = next(iter(self.db["customers"].rows_where("assistant_id = ? and user_id = ? and chat_id = ?",
                                                        [assistant_id, user_id, chat_id])), None)
        return from_row(Customer, row) if row else None

    def link_customer(self, user_id: int) -> Customer | None:
        """The customer session this user last opened by a link in their private chat, while that assistant is
        published with its link on (None otherwise: unpublished, link off, regenerated token, deleted)."""
        row = self.db.execute(
            "select cu.* from customers cu join publications p on p.assistant_id = cu.assistant_id "
            "join assistants a on a.id = cu.assistant_id "
            "where cu.user_id = ? and cu.chat_id = ? and cu.channel = 'link' and cu.started_at is not null "
            "and p.active = 1 and p.link = 1 and a.deleted_at is null order by cu.started_at desc, cu.id desc limit 1",
            [user_id, user_id]).fetchone()
        if row is None:
            return None
        return self.get_customer(row[0])

    def is_customer_anywhere(self, user_id: int) -> bool:
        """Whether this user ever opened a customer link (a stranger to the team otherwise)."""
        return self.db.execute("select 1 from customers where user_id = ? and channel = 'link' limit 1",
                               [user_id]).fetchone() is not None

    def touch_customer(self, customer_id: int, *, language: str | None = None) -> None:
        updates = {"last_seen_at": self.now()}
        if language:
            updates["language"] = language
        self.db["customers"].update(customer_id, updates)

    def customer_questions_since(self, assistant_id: int, user_id: int, since: dt.datetime) -> int:
        """How many questions this user asked the assistant as a customer since `since` (for rate limits)."""
        return self.db.execute(
            "select count(*) from messages m join conversations c on c.id = m.conversation_id "
            "join customers cu on cu.id = c.customer_id where cu.assistant_id = ? and cu.user_id = ? "
            "and m.role = 'user' and m.created_at >= ?", [assistant_id, user_id, fmt_time(since)]).fetchone()[0]

    def message_customer(self, message_id: int) -> int | None:
        """The customer whose conversation holds this message (None for the team's chats or no such message)."""
        row = self.db.execute("select c.customer_id from messages m join conversations c on c.id = m.conversation_id "
                              "where m.id = ?", [message_id]).fetchone()
        return row[0] if row else None

    def set_telegram_message(self, message_id: int, tg_message_id: int) -> None:
        self.db["messages"].update(message_id, {"tg_message_id": tg_message_id})

    def answer_by_telegram_id(self, chat_id: int, tg_message_id: int) -> int | None:
        """The stored answer a customer got as Telegram message `tg_message_id` in chat `chat_id` (None if none)."""
        row = self.db.execute(
            "select m.id from messages m join conversations c on c.id = m.conversation_id "
            "join customers cu on cu.id = c.customer_id where cu.chat_id = ? and m.tg_message_id = ? "
            "and m.role = 'assistant' order by m.id desc limit 1", [chat_id, tg_message_id]).fetchone()
        return row[0] if row else None

    def set_unanswered_reply_to(self, item_id: int, tg_message_id: int) -> None:
        self.db["unanswered"].update(item_id, {"reply_to_message_id": tg_message_id})

    def queue_customer_question(self, message_id: int) -> Unanswered | None:
        """After a 👎 on a customer's answer: its question joins the experts' queue like an unsure one (once)."""
        customer_id = self.message_customer(message_id)
        if customer_id is None:
            raise NotFound(f"message #{message_id} is not a customer's answer")
        msg = self.get_message(message_id)
        if self.db.execute("select 1 from unanswered where message_id = ?", [message_id]).fetchone():
            return None
        question = self.question_before(message_id)
        if not question:
            return None
        customer = self.get_customer(customer_id)
        return self.add_unanswered(customer.assistant_id, question, user_id=customer.user_id,
                                   conversation_id=msg["conversation_id"], message_id=message_id)

    def forget_customer(self, user_id: int) -> dict[str, int]:
        """/forget: what this user sent any assistant as a customer, and the answers to it, are blanked and marked
        deleted, their open questions dismissed; each assistant's audit log keeps only the counts."""
        now = self.now()
        total = {"messages": 0, "questions": 0}
        with transaction(self.db):
            rows = self.db.execute("select assistant_id, group_concat(id) from customers where user_id = ? "
                                   "group by assistant_id order by assistant_id", [user_id]).fetchall()
            for assistant_id, joined in rows:
                ids = [int(i) for i in joined.split(",")]
                marks = ", ".join("?" * len(ids))
                messages = self.db.execute(
                    f"update messages set text = '', correction = null, deleted_at = ? where deleted_at is null "
                    f"and conversation_id in (select id from conversations where customer_id in ({marks}))",
                    [now, *ids]).rowcount
                questions = self.db.execute(
                    f"update unanswered set question = '—', answer = null, "
                    f"status = case status when 'open' then 'dismissed' "
                    f"else status end, answered_at = coalesce(answered_at, ?), "
                    f"delivered_at = coalesce(delivered_at, ?) where customer_id in ({marks}) and question != '—'",
                    [now, now, *ids]).rowcount
                self.db.execute(f"update customers set forgotten_at = ? where id in ({marks})", [now, *ids])
                counts = {"messages": messages, "questions": questions}
                self.audit("customer.forget", assistant_id=assistant_id, details=counts)
                total = {k: total[k] + counts[k] for k in total}
        return total

    # ------------------------------------------------------ answers going back
    def undelivered_team_answers(self) -> list[tuple[Unanswered, str, Customer]]:
        """Customers' questions the team answered that have not reached them yet: (item, answer, customer)."""
        rows = self.db.execute(
            "select u.id, coalesce(u.answer, e.answer) from unanswered u join examples e on e.id = u.example_id "
            "join customers cu on cu.id = u.customer_id where u.status = 'answered' and u.delivered_at is null "
            "and cu.forgotten_at is null order by u.id").fetchall()
        out = []
        for item_id, answer in rows:
            item = self.get_unanswered(item_id)
            out.append((item, answer, self.get_customer(item.customer_id)))
        return out

    def claim_delivery(self, item_id: int) -> bool:
        """Take the right to send this answer (one sender only, however many try at once)."""
        return bool(self.db.execute("update unanswered set delivered_at = ? where id = ? and delivered_at is null",
                                    [self.now(), item_id]).rowcount)

    def release_delivery(self, item_id: int) -> None:
        """Sending failed for a passing reason: the next delivery run tries again."""
        self.db.execute("update unanswered set delivered_at = null where id = ?", [item_id])

    def human_answered(self, customer_id: int, answer: str, *, by: int | None) -> Example | None:
        """A person answered a business customer themselves: the customer's latest open question and that reply
        become a pending example for the experts, and the item is closed as answered (and already delivered)."""
        answer = answer.strip()
        if not answer:
            return None
        now = self.now()
        with transaction(self.db):
            row = self.db.execute("select id from unanswered where customer_id = ? and status = 'open' "
                                  "order by id desc limit 1", [customer_id]).fetchone()
            if row is None:
                return None
            item = self.get_unanswered(row[0])
            example_id = self._insert_example({
                "assistant_id": item.assistant_id, "question": item.question, "answer": answer, "source": "expert",
                "status": "pending", "split": "train", "author_id": by}, now)
            self.db.execute("update unanswered set status = 'answered', example_id = ?, answered_by = ?, "
                            "answered_at = ?, delivered_at = ?, answer = ? where id = ?",
                            [example_id, by, now, now, answer, item.id])
            self.audit("unanswered.human_reply", user_id=by, assistant_id=item.assistant_id,
                       details={"item_id": item.id, "example_id": example_id})
        return self.get_example(example_id)

    # ------------------------------------------------------ groups, business
    def link_group(self, chat_id: int, assistant_id: int, *, by: int | None = None, title: str = "") -> None:
        with transaction(self.db):
            self.get_assistant(assistant_id)
            self.db["customer_groups"].upsert({"chat_id": chat_id, "assistant_id": assistant_id, "title": title,
                                               "added_by": by, "added_at": self.now(), "removed_at": None},
                                              pk="chat_id")
            self.audit("group.link", user_id=by, assistant_id=assistant_id, details={"chat_id": chat_id})

    def unlink_group(self, chat_id: int) -> None:
        self.db.execute("update customer_groups set removed_at = ? where chat_id = ?", [self.now(), chat_id])

    def group_assistant(self, chat_id: int) -> int | None:
        """The assistant that answers in this group (None when none is linked, or it was removed)."""
        row = self.db.execute("select assistant_id from customer_groups where chat_id = ? and removed_at is null",
                              [chat_id]).fetchone()
        return row[0] if row else None

    def save_business_connection(self, connection_id: str, *, assistant_id: int | None, user_id: int,
                                 user_chat_id: int, can_reply: bool, enabled: bool) -> None:
        self.db["business_connections"].upsert({
            "id": connection_id, "assistant_id": assistant_id, "user_id": user_id, "user_chat_id": user_chat_id,
            "can_reply": int(bool(can_reply)), "enabled": int(bool(enabled)), "updated_at": self.now()}, pk="id")

    def business_connection(self, connection_id: str) -> dict | None:
        return next(iter(self.db["business_connections"].rows_where("id = ?", [connection_id])), None)

    # ---------------------------------------------------------------- stats
    def customer_stats(self, assistant_id: int, *, days: int = 30, top: int = 10) -> dict:
        """What owners see: customers' questions per day, the share answered and "don't know", 👍/👎, how long
        the team took to answer, and the questions most often left unanswered (same normalized text)."""
        since = fmt_time(self.clock() - dt.timedelta(days=days))
        base = ("from messages m join conversations c on c.id = m.conversation_id "
                "where c.assistant_id = ? and c.customer_id is not null and m.created_at >= ?")
        per_day = {}
        for day, questions in self.db.execute(f"select substr(m.created_at, 1, 10) d, count(*) {base} "
                                              f"and m.role = 'user' group by d order by d", [assistant_id, since]):
            per_day[day] = {"day": day, "questions": questions, "answered": 0, "dont_know": 0}
        for day, abstained, n in self.db.execute(
                f"select substr(m.created_at, 1, 10) d, m.abstained, count(*) {base} and m.role = 'assistant' "
                f"group by d, m.abstained", [assistant_id, since]):
            row = per_day.setdefault(day, {"day": day, "questions": 0, "answered": 0, "dont_know": 0})
            row["dont_know" if abstained else "answered"] += n
        answers = sum(r["answered"] + r["dont_know"] for r in per_day.values())
        answered = sum(r["answered"] for r in per_day.values())
        feedback = dict(self.db.execute(f"select m.feedback, count(*) {base} and m.feedback is not null "
                                        f"group by m.feedback", [assistant_id, since]).fetchall())
        waits = sorted(
            (dt.datetime.fromisoformat(a) - dt.datetime.fromisoformat(c)).total_seconds() / 60
            for c, a in self.db.execute("select created_at, answered_at from unanswered where assistant_id = ? "
                                        "and customer_id is not null and status = 'answered' and created_at >= ?",
                                        [assistant_id, since]))
        frequent: dict[str, dict] = {}
        for question, status in self.db.execute(
                "select question, status from unanswered where assistant_id = ? and customer_id is not null "
                "and question != '—' and created_at >= ? order by id", [assistant_id, since]):
            group = frequent.setdefault(question_hash(question), {"question": question, "count": 0, "open": 0})
            group["count"] += 1
            group["open"] += status == "open"
        return {
            "days": days,
            "per_day": sorted(per_day.values(), key=lambda r: r["day"]),
            "questions": sum(r["questions"] for r in per_day.values()),
            "answered": answered,
            "dont_know": answers - answered,
            "share_answered": round(answered / answers, 3) if answers else None,
            "share_dont_know": round((answers - answered) / answers, 3) if answers else None,
            "thumbs_up": feedback.get("up", 0),
            "thumbs_down": feedback.get("down", 0),
            "team_answers": len(waits),
            "team_answer_minutes_median": round(waits[len(waits) // 2], 1) if waits else None,
            "team_answer_minutes_max": round(waits[-1], 1) if waits else None,
            "open_customer_questions": self.db.execute(
                "select count(*) from unanswered where assistant_id = ? and customer_id is not null "
                "and status = 'open'", [assistant_id]).fetchone()[0],
            "frequent_unanswered": sorted(frequent.values(), key=lambda g: -g["count"])[:top],
        }
