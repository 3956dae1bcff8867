"""Normalization used for duplicate detection."""

import hashlib
import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_question(text: str) -> str:
    """Lowercase, unify Unicode forms and ё/е, drop punctuation, collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("ё", "е")
    text = _PUNCT.sub(" ", text.replace("_", " "))
    return _SPACE.sub(" ", text).strip()


def question_hash(text: str) -> str:
    """A short stable hash of the normalized question."""
    return hashlib.sha1(normalize_question(text).encode("utf-8")).hexdigest()[:16]
