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


SIMILAR_SHARE = 0.78  # merged when a question scores this share of its own self-match against the group's first


def group_similar(groups: list[dict], *, share: float = SIMILAR_SHARE, indexes=None) -> list[dict]:
    """Unanswered questions grouped by meaning with the assistant's retriever: each group ({"question", "count",
    "open"}, most asked first) joins an earlier one whose question it matches at `share` of its own self-match
    score (rewordings, typos; measured: rewordings 0.81-0.93 of the self-match, unrelated questions 0.64-0.68).
    `indexes` (the app's AssistantIndexes) lends its embedder, so the grouping matches the assistant's retrieval."""
    if len(groups) < 2:
        return [dict(g, wordings=1) for g in groups]
    from tuning.retrieval import Retriever, docs_from_pairs

    ordered = sorted(groups, key=lambda g: -g["count"])
    docs = docs_from_pairs([(g["question"], "") for g in ordered])
    retriever = Retriever(docs) if indexes is None else Retriever(docs, embedder=indexes.embedder,
                                                                  embed_weight=indexes.embed_weight)
    merged: list[dict] = []
    home: dict[str, dict] = {}  # a question -> the merged group it joined
    for group in ordered:
        hits = retriever.search(group["question"], 8, distinct_answers=False)
        own = next((h.score for h in hits if h.question == group["question"]), None)
        target = None
        if own:
            target = next((home[h.question] for h in hits if h.question != group["question"]
                           and h.question in home and h.score >= share * own), None)
        if target is None:
            target = {"question": group["question"], "count": 0, "open": 0, "wordings": 0}
            merged.append(target)
        target["count"] += group["count"]
        target["open"] += group["open"]
        target["wordings"] += 1
        home[group["question"]] = target
    return sorted(merged, key=lambda g: -g["count"])


def customer_report(store, assistant_id: int, *, days: int = 30, top: int = 10, indexes=None) -> dict:
    """What owners see about customers (storage's counts), the unanswered questions grouped by meaning."""
    stats = store.customer_stats(assistant_id, days=days, top=max(top * 5, 50))
    stats["frequent_unanswered"] = group_similar(stats["frequent_unanswered"], indexes=indexes)[:top]
    return stats


def plot_customer_stats(stats: dict, path) -> None:
    """The owner's chart: customers' questions per day, answered and "don't know" stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [row["day"][5:] for row in stats["per_day"]]
    answered = [row["answered"] for row in stats["per_day"]]
    unsure = [row["dont_know"] for row in stats["per_day"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(days, answered, label="answered", color="#4c9a5f")
    ax.bar(days, unsure, bottom=answered, label="passed to the team", color="#d98c3f")
    ax.set_ylabel("customers' questions")
    ax.set_title(f"last {stats['days']} days: {stats['questions']} questions, {stats['thumbs_up']} thumbs up, "
                 f"{stats['thumbs_down']} down")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
