"""Answering customers: their rate limits, the answer itself (the active version, `auto` mode, recorded in the
customer's conversation so an unsure one carries the customer to the experts), and the customer link."""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable

from storage.records import Customer


@dataclass(frozen=True)
class CustomerLimits:
    """How much one customer may ask one assistant, and how long a question may be."""

    per_minute: int = 10
    per_day: int = 200
    max_chars: int = 4000


class RateLimiter:
    """Questions per customer in the last minute (in memory, so that a burst is counted before any answer is
    recorded) and in the last day (the recorded questions, plus the ones still being answered).

    Used from one event loop: `admit` checks and counts in one step, `done` when the answer is recorded.
    """

    def __init__(self, limits: CustomerLimits, *, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self._recent: dict[tuple[int, int], deque] = defaultdict(deque)
        self._pending: dict[tuple[int, int], int] = defaultdict(int)

    def admit(self, assistant_id: int, user_id: int, asked_today: int) -> str | None:
        """None when this question may be answered (and it is counted), else "minute" or "day"."""
        key = (assistant_id, user_id)
        now = self.clock()
        recent = self._recent[key]
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if asked_today + self._pending[key] >= self.limits.per_day:
            return "day"
        if len(recent) >= self.limits.per_minute:
            return "minute"
        recent.append(now)
        self._pending[key] += 1
        return None

    def done(self, assistant_id: int, user_id: int) -> None:
        key = (assistant_id, user_id)
        self._pending[key] = max(self._pending[key] - 1, 0)
        if not self._pending[key]:
            del self._pending[key]
        if not self._recent.get(key, True):
            del self._recent[key]


def asked_today(store, customer: Customer) -> int:
    """The questions this customer's user asked the assistant in the last 24 hours (recorded ones)."""
    return store.customer_questions_since(customer.assistant_id, customer.user_id,
                                          store.clock() - dt.timedelta(days=1))


def answer_customer(store, engine, customer: Customer, question: str, *, abstain_text: str, indexes=None,
                    on_piece=None):
    """The active version's answer to a customer (auto mode); unsure -> abstain_text, and the question is queued
    for the experts with the customer attached (their conversation carries them)."""
    from tuning.answering.service import answer_question

    answer = answer_question(store, engine, customer.assistant_id, question, mode="auto", user_id=customer.user_id,
                             conversation_id=customer.conversation_id, abstain_text=abstain_text, indexes=indexes,
                             on_piece=on_piece)
    store.touch_customer(customer.id)
    return answer


def customer_link(bot_username: str | None, token: str) -> str:
    """The deep link customers open: t.me/<bot>?start=<token>."""
    return f"https://t.me/{bot_username or '<your bot>'}?start={token}"
