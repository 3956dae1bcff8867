"""Filters before review: exact and near duplicates (character n-gram Jaccard), empty, over-long, wrong language."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from storage.text import normalize_question

DEFAULT_THRESHOLD = 0.8
NGRAM = 3


def detect_language(text: str) -> str | None:
    """'ru' when most letters are Cyrillic, 'en' when most are Latin, None without letters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    cyrillic = sum("\u0400" <= c <= "\u04ff" for c in letters)
    return "ru" if cyrillic / len(letters) >= 0.5 else "en"


def shingles(text: str, *, n: int = NGRAM) -> frozenset[str]:
    """Character n-grams of the normalized text (padded, so short texts still get some)."""
    norm = f" {normalize_question(text)} "
    if len(norm) <= n:
        return frozenset({norm})
    return frozenset(norm[i:i + n] for i in range(len(norm) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def similarity(a: str, b: str) -> float:
    """Character-trigram Jaccard similarity of two questions after normalization."""
    return jaccard(shingles(a), shingles(b))


def is_near_duplicate(a: str, b: str, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """True when the normalized texts are equal or their trigram Jaccard reaches `threshold`."""
    na, nb = normalize_question(a), normalize_question(b)
    return na == nb or similarity(a, b) >= threshold


class NearDuplicateIndex:
    """Questions seen so far, with an inverted n-gram index so a lookup compares only likely neighbours."""

    def __init__(self, texts: Iterable[tuple[int | None, str]] = (), *, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        self._norms: dict[str, int | None] = {}
        self._sets: list[tuple[int | None, frozenset[str]]] = []
        self._postings: dict[str, list[int]] = defaultdict(list)
        for ref, text in texts:
            self.add(text, ref=ref)

    def __len__(self) -> int:
        return len(self._sets)

    def add(self, text: str, *, ref: int | None = None) -> None:
        """Remember a question (ref: e.g. the example id it belongs to)."""
        norm = normalize_question(text)
        self._norms.setdefault(norm, ref)
        grams = shingles(text)
        pos = len(self._sets)
        self._sets.append((ref, grams))
        for g in grams:
            self._postings[g].append(pos)

    def find(self, text: str) -> tuple[int | None, float] | None:
        """(ref, similarity) of a stored question this one duplicates, or None."""
        norm = normalize_question(text)
        if norm in self._norms:
            return self._norms[norm], 1.0
        if self.threshold > 1.0:
            return None
        grams = shingles(text)
        shared: dict[int, int] = defaultdict(int)
        for g in grams:
            for pos in self._postings.get(g, ()):
                shared[pos] += 1
        best: tuple[int | None, float] | None = None
        for pos, common in shared.items():
            ref, other = self._sets[pos]
            score = common / (len(grams) + len(other) - common)
            if score >= self.threshold and (best is None or score > best[1]):
                best = (ref, score)
        return best


@dataclass(frozen=True)
class Rejection:
    text: str
    reason: str  # empty | too_long | language | duplicate


def check_candidate(question: str, answer: str, *, index: NearDuplicateIndex, max_chars: int = 4000,
                    language: str | None = None) -> Rejection | None:
    """Why a generated pair must not be queued for review, or None when it may be."""
    if not question.strip() or not answer.strip() or not normalize_question(question):
        return Rejection(question, "empty")
    if len(question) > max_chars or len(answer) > max_chars:
        return Rejection(question, "too_long")
    if language is not None:
        found = detect_language(question)
        if found is not None and found != language:
            return Rejection(question, "language")
    hit = index.find(question)
    if hit is not None:
        return Rejection(question, "duplicate")
    return None


def filter_candidates(pairs: Iterable[tuple[str, str]], *, index: NearDuplicateIndex, max_chars: int = 4000,
                      language: str | None = None) -> tuple[list[tuple[str, str]], list[Rejection]]:
    """Keep the pairs that pass every check; each kept question joins `index` (so later ones are checked against it)."""
    kept: list[tuple[str, str]] = []
    rejected: list[Rejection] = []
    for question, answer in pairs:
        question, answer = question.strip(), answer.strip()
        why = check_candidate(question, answer, index=index, max_chars=max_chars, language=language)
        if why is None:
            kept.append((question, answer))
            index.add(question)
        else:
            rejected.append(why)
    return kept, rejected


def index_for_assistant(store, assistant_id: int, *, threshold: float = DEFAULT_THRESHOLD) -> NearDuplicateIndex:
    """An index over every live example of the assistant, rejected ones included (so they are not proposed again)."""
    return NearDuplicateIndex(((ex.id, ex.question) for ex in store.list_examples(assistant_id)),
                              threshold=threshold)
