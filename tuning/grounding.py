"""Grounded answers: retrieved examples in the prompt (at training and at answer time alike), and the
confidence below which the assistant says it does not know.

Training rows follow RAFT: each question is shown with k retrieved examples, the gold one (its own fact)
at a random position among distractors, and in a share of rows only distractors, so the model learns to
pick and copy the right fact and still learns the facts themselves.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tuning.retrieval import Doc, Hit, Retriever

GROUNDING_FILE = "grounding.json"  # written beside a trained adapter: recipe, k, calibrated threshold
DEFAULT_K = 3
GOLD_SHARE = 0.8  # rows whose context holds the gold example; the rest see distractors only
ABSTAIN_QUANTILE = 0.03  # the threshold keeps this share of validation (in-scope) questions below it
DEFAULT_THRESHOLD = 0.12  # with no calibration (no validation split): measured on ACME's out-of-scope file


def render_question(question: str, hits: Sequence[Hit | Doc]) -> str:
    """The user turn of a grounded prompt: the reference examples, then the question."""
    if not hits:
        return question
    refs = "\n".join(f"[{i}] Q: {h.question}\nA: {h.answer}" for i, h in enumerate(hits, 1))
    return f"Reference examples:\n{refs}\n\nQuestion: {question}"


def training_context(question: str, group: str, retriever: Retriever, rng: random.Random, *,
                     k: int = DEFAULT_K, gold_share: float = GOLD_SHARE) -> list[Hit]:
    """k examples for a training row: the nearest ones of other facts, and the nearest other wording of its own
    fact (the one retrieval would find for a reworded question) at a random position, or, in 1 - gold_share of
    rows, distractors only."""
    distractors = retriever.search(question, k, exclude=lambda d: d.group == group)
    context = list(distractors)
    if rng.random() < gold_share:
        gold = (retriever.search(question, 1, exclude=lambda d: d.group != group or d.question == question)
                or retriever.search(question, 1, exclude=lambda d: d.group != group))
        context = context[:k - 1]
        if gold:
            context.insert(rng.randrange(len(context) + 1), gold[0])
    else:
        rng.shuffle(context)
    return context


def training_index(items) -> Retriever:
    """The retriever over a run's training items (every wording of every fact), as answering will use it."""
    return Retriever(Doc(key=str(i.example_id) if i.example_id is not None else f"t{n}", question=i.question,
                         answer=i.answer, group=i.group) for n, i in enumerate(items))


def grounded_items(train, val, retriever: Retriever, *, k: int = DEFAULT_K, seed: int = 0,
                   gold_share: float = GOLD_SHARE, closed_book: bool = True):
    """(train, val) TrainItems whose questions carry their retrieved context; plus, with closed_book, every
    fact once more without context (so the same adapter also answers closed book)."""
    from dataclasses import replace

    rng = random.Random(seed)

    def grounded(item, share: float):
        hits = training_context(item.question, item.group, retriever, rng, k=k, gold_share=share)
        return replace(item, question=render_question(item.question, hits))

    out_train = [grounded(i, gold_share) for i in train]
    if closed_book:
        out_train += [i for i in train if not i.variation]
    out_val = [grounded(i, 1.0) for i in val]  # validation asks what answering does: the gold is findable
    return out_train, out_val


@dataclass(frozen=True)
class Grounding:
    """How a trained adapter answers: its recipe, how many examples it was shown, the abstain threshold."""

    recipe: str = "closed"  # "grounded" (trained with retrieved examples) or "closed" (closed book)
    k: int = DEFAULT_K
    threshold: float = DEFAULT_THRESHOLD
    calibrated_on: int = 0  # validation questions the threshold was set on (0: the default)

    def save(self, folder) -> None:
        Path(folder, GROUNDING_FILE).write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, folder) -> "Grounding":
        path = Path(folder, GROUNDING_FILE) if folder else None
        if path is None or not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def confidence(hits: Sequence[Hit], mean_logprob: float | None = None) -> float:
    """0..1: how similar the question is to the best example, discounted when the model itself was unsure."""
    if not hits:
        return 0.0
    score = hits[0].score
    if mean_logprob is not None:
        score *= math.exp(max(mean_logprob, -5.0)) ** 0.25  # a mild discount: p=0.5 per token -> x0.84
    return round(float(score), 4)


def calibrate_threshold(scores: Sequence[float], *, quantile: float = ABSTAIN_QUANTILE) -> float:
    """The confidence below which only `quantile` of in-scope (validation) questions fall."""
    if not scores:
        return DEFAULT_THRESHOLD
    ordered = sorted(scores)
    index = max(0, min(len(ordered) - 1, int(math.floor(quantile * len(ordered)))))
    return round(ordered[index] * 0.98, 4)
