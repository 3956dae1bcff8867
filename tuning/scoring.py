"""How an answer is scored against a reference: must_contain tokens, token F1, ROUGE-L (used by evaluation,
and by grounded answering to tell a slipped copy of an example from the model's own words)."""

from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Case-folded, non-breaking spaces as spaces, whitespace collapsed."""
    text = text.replace("\u00a0", " ").replace("\u202f", " ").replace("\u2009", " ")
    return " ".join(text.split()).casefold()


def contains_all(answer: str, must_contain: Sequence[str]) -> bool:
    norm = normalize(answer)
    return all(normalize(token) in norm for token in must_contain)


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common: dict[str, int] = {}
    for w in ref:
        common[w] = common.get(w, 0) + 1
    overlap = 0
    for w in pred:
        if common.get(w, 0) > 0:
            overlap += 1
            common[w] -= 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from the longest common subsequence of words."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
