"""Local mutations of a question, no model needed: typos, wrong layout, no punctuation, slang, fillers, translit."""

from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from storage.text import normalize_question
from tuning.data.dedup import detect_language

DATA = Path(__file__).resolve().parent  # slang_<lang>.json lie beside this module
KINDS = ("typo", "layout", "nopunct", "abbrev", "filler", "translit")

# Plans tried in turn (rotated per text so a batch mixes methods); "nopunct" alone normalizes to the
# source question, so it only appears with another change.
PLANS = {
    "en": [("typo",), ("abbrev",), ("layout",), ("filler", "nopunct"), ("typo", "nopunct"), ("abbrev", "typo"),
           ("filler",), ("typo", "typo"), ("abbrev", "nopunct"), ("filler", "typo")],
    "ru": [("typo",), ("translit",), ("abbrev",), ("layout",), ("filler", "nopunct"), ("typo", "nopunct"),
           ("translit", "nopunct"), ("abbrev", "typo"), ("filler",), ("typo", "typo"), ("abbrev", "nopunct"),
           ("translit", "typo")],
}

_QWERTY = ("`qwertyuiop[]", "asdfghjkl;'", "zxcvbnm,.")
_JCUKEN = ("ёйцукенгшщзхъ", "фывапролджэ", "ячсмитьбю")
_TO_QWERTY = {r: l for rr, lr in zip(_JCUKEN, _QWERTY) for r, l in zip(rr, lr)}
_TO_JCUKEN = {v: k for k, v in _TO_QWERTY.items()}
_TRANSLIT = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z", "и": "i",
    "й": "i", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t",
    "у": "u", "ф": "f", "х": "h", "ц": "c", "ч": "ch", "ш": "sh", "щ": "sch", "ъ": "", "ы": "y", "ь": "",
    "э": "e", "ю": "yu", "я": "ya",
}
_WORD = re.compile(r"\w+(?:[-'’]\w+)*", re.UNICODE)
_PUNCT = re.compile(r"[^\w\s'’-]", re.UNICODE)


@dataclass(frozen=True)
class Mutation:
    text: str
    method: str  # "mutation:typo", "mutation:typo+nopunct", …


def _neighbours(rows: tuple[str, ...]) -> dict[str, str]:
    """Keys next to each letter on a staggered keyboard (same row, and the rows above and below)."""
    out: dict[str, str] = {}
    for r, row in enumerate(rows):
        for i, ch in enumerate(row):
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            if r > 0:
                near += [rows[r - 1][j] for j in (i, i + 1) if 0 <= j < len(rows[r - 1])]
            if r + 1 < len(rows):
                near += [rows[r + 1][j] for j in (i - 1, i) if 0 <= j < len(rows[r + 1])]
            out[ch] = "".join(c for c in near if c.isalpha())
    return out


_ADJACENT = {**_neighbours(_QWERTY), **_neighbours(_JCUKEN)}


@lru_cache(maxsize=None)
def slang(language: str) -> dict:
    """The editable abbreviation/filler lists for a language (tuning/data/slang_<lang>.json)."""
    return json.loads((DATA / f"slang_{language}.json").read_text(encoding="utf-8"))


def _match_case(src: str, new: str) -> str:
    if src.isupper() and len(src) > 1:
        return new.upper()
    if src[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def typo(text: str, rng: random.Random) -> str | None:
    """One keyboard slip in a word of 3+ letters: adjacent key, dropped, doubled or swapped letters."""
    words = [m for m in _WORD.finditer(text) if len(m.group()) >= 3 and m.group().isalpha()]
    if not words:
        return None
    m = rng.choice(words)
    word, start = m.group(), m.start()
    kind = rng.choice(("adjacent", "dropped", "doubled", "swapped"))
    i = rng.randrange(1, len(word)) if kind in ("dropped", "swapped") else rng.randrange(len(word))
    if kind == "adjacent":
        near = _ADJACENT.get(word[i].lower(), "")
        if not near:
            kind = "doubled"
        else:
            new = word[:i] + _match_case(word[i], rng.choice(near)) + word[i + 1:]
    if kind == "dropped":
        new = word[:i] + word[i + 1:]
    elif kind == "doubled":
        new = word[:i] + word[i] + word[i:]
    elif kind == "swapped":
        a, b = word[i - 1], word[i]
        new = word[:i - 1] + _match_case(a, b.lower()) + _match_case(b, a.lower()) + word[i + 1:]
    return text[:start] + new + text[start + len(word):]


def layout(text: str, rng: random.Random) -> str | None:
    """The text as typed with the other keyboard layout on (ЙЦУКЕН↔QWERTY)."""
    language = detect_language(text)
    table = _TO_QWERTY if language == "ru" else _TO_JCUKEN
    out = "".join(_match_case(c, table[c.lower()]) if c.lower() in table else c for c in text)
    return out if out != text else None


def nopunct(text: str, rng: random.Random) -> str | None:
    """Lowercase, without punctuation, as typed in a hurry."""
    out = re.sub(r"\s+", " ", _PUNCT.sub("", text.lower())).strip()
    return out if out != text else None


def abbrev(text: str, rng: random.Random) -> str | None:
    """Common chat abbreviations and slang from the editable list (one or more phrases replaced)."""
    table = slang(detect_language(text) or "en")["abbreviations"]
    hits = []
    for phrase in sorted(table, key=len, reverse=True):
        for m in re.finditer(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE):
            if not any(m.start() < e and s < m.end() for s, e, _ in hits):
                hits.append((m.start(), m.end(), phrase))
    if not hits:
        return None
    chosen = [h for h in hits if rng.random() < 0.6] or [rng.choice(hits)]
    out = text
    for s, e, phrase in sorted(chosen, reverse=True):
        out = out[:s] + _match_case(out[s:e], rng.choice(table[phrase])) + out[e:]
    return out if out != text else None


def filler(text: str, rng: random.Random) -> str | None:
    """Filler and politeness words dropped (or, when there are none, a casual opener added)."""
    lists = slang(detect_language(text) or "en")
    pattern = "|".join(re.escape(w) for w in sorted(lists["fillers"], key=len, reverse=True))
    dropped = re.sub(rf"(?<!\w)(?:{pattern})(?!\w)[,!]?\s*", "", text, flags=re.IGNORECASE).strip()
    dropped = re.sub(r"\s+([,.?!])", r"\1", re.sub(r"\s{2,}", " ", dropped)).lstrip(",. ")
    dropped = re.sub(r",+(?=[?.!]|$)", "", dropped)
    if dropped and dropped != text and normalize_question(dropped):
        return dropped[:1].upper() + dropped[1:] if text[:1].isupper() else dropped
    opener = rng.choice(lists["openers"])
    return f"{opener} {text[:1].lower()}{text[1:]}"


def translit(text: str, rng: random.Random) -> str | None:
    """Russian written in Latin letters (privet, kak dela)."""
    if detect_language(text) != "ru":
        return None
    out = "".join(_match_case(c, _TRANSLIT[c.lower()]) if c.lower() in _TRANSLIT else c for c in text)
    return out if out != text else None


MUTATORS = {"typo": typo, "layout": layout, "nopunct": nopunct, "abbrev": abbrev, "filler": filler,
            "translit": translit}


def apply_plan(text: str, plan: tuple[str, ...], rng: random.Random) -> str | None:
    """Apply the kinds in order; None when one of them does not apply to this text."""
    out = text
    for kind in plan:
        out = MUTATORS[kind](out, rng)
        if out is None:
            return None
    return out


def method_name(plan: tuple[str, ...]) -> str:
    return "mutation:" + "+".join(dict.fromkeys(plan))


def mutate(text: str, *, n: int, seed: int = 0, language: str | None = None) -> list[Mutation]:
    """Up to n distinct mutations of `text`, deterministic for (text, seed); none normalizes to another or the source."""
    text = text.strip()
    language = language or detect_language(text) or "en"
    plans = PLANS.get(language, PLANS["en"])
    rng = random.Random(zlib.crc32(f"{seed}\x00{text}".encode("utf-8")))
    start = rng.randrange(len(plans))
    seen = {normalize_question(text)}
    out: list[Mutation] = []
    for attempt in range(max(n, 1) * 12):
        if len(out) >= n:
            break
        plan = plans[(start + attempt) % len(plans)]
        candidate = apply_plan(text, plan, rng)
        if candidate is None or candidate == text:
            continue
        norm = normalize_question(candidate)
        if not norm or norm in seen:
            continue
        seen.add(norm)
        out.append(Mutation(candidate, method_name(plan)))
    return out


def mutate_assistant(store, assistant_id: int, *, per_example: int, seed: int = 0,
                     author_id: int | None = None, on_progress=None):
    """Queue up to `per_example` pending local mutations of every approved root example; returns the GenerationRun."""
    from storage.errors import DuplicateExample
    from tuning.data.dedup import NearDuplicateIndex

    roots = store.list_examples(assistant_id, status="approved", roots_only=True)
    run = store.create_generation_run(assistant_id, method="mutate", model="local-mutations",
                                      requested=len(roots) * per_example,
                                      params={"per_example": per_example, "seed": seed})
    # Exact duplicates (after normalization) only: a typo is meant to stay close to its source.
    index = NearDuplicateIndex(((ex.id, ex.question) for ex in store.list_examples(assistant_id)), threshold=1.01)
    kept_total = 0
    for done, parent in enumerate(roots, 1):
        kept = generated = 0
        for m in mutate(parent.question, n=per_example * 2, seed=seed):
            if kept >= per_example:
                break
            generated += 1
            if index.find(m.text) is not None:
                continue
            try:
                ex = store.add_example(assistant_id, m.text, parent.answer, source="synthetic", status="pending",
                                       split=parent.split, parent_id=parent.id, method=m.method,
                                       author_id=author_id, generation_run_id=run.id)
            except DuplicateExample:
                continue
            index.add(m.text, ref=ex.id)
            kept += 1
        store.add_generation_usage(run.id, generated=generated, kept=kept)
        kept_total += kept
        if on_progress is not None:
            on_progress({"done": done, "total": len(roots), "kept": kept_total})
    return store.finish_generation_run(run.id, status="succeeded")
