"""The text catalogue: one JSON file per language, every user-facing string of the bot."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

LANGUAGES = ("en", "ru")
_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def catalogue(lang: str) -> dict[str, str]:
    """All texts of one language, keyed by name."""
    return json.loads((_DIR / f"{lang}.json").read_text(encoding="utf-8"))


def pick_language(code: str | None, default: str = "en") -> str:
    """Our language for a Telegram language code ('ru-RU' -> 'ru'; unknown -> default)."""
    code = (code or "").lower().split("-")[0]
    return code if code in LANGUAGES else default


def t(lang: str, key: str, **params: object) -> str:
    """The text `key` in `lang` (English when missing), formatted with `params`."""
    text = catalogue(lang if lang in LANGUAGES else "en").get(key) or catalogue("en")[key]
    return text.format(**params) if params else text


def label(lang: str, group: str, value: object) -> str:
    """A value of an enum a user sees (an example's source, a job's kind, a JSON type…) in `lang`: the catalogue's
    "<group>_<value>", else the value itself."""
    if group == "method" and isinstance(value, str) and value.startswith("mutation:"):
        kinds = [label(lang, "mutation", kind) for kind in value.split(":", 1)[1].split("+") if kind]
        return t(lang, "method_mutation", kinds=" + ".join(kinds))
    key = f"{group}_{value}"
    return t(lang, key) if key in catalogue("en") else str(value)


def labelled_counts(lang: str, group: str, counts: dict) -> str:
    """"одобрен: 144, ждёт проверки: 1": counts keyed by an enum's values, each value in `lang`."""
    return ", ".join(f"{label(lang, group, key)}: {n}" for key, n in counts.items()) or "—"


def duration(seconds: float | None, lang: str) -> str:
    """"3 min 55 s" / "3 мин 55 с"; hours and minutes past an hour."""
    total = max(int(round(seconds or 0)), 0)
    hours, rest = divmod(total, 3600)
    if hours:
        return t(lang, "duration_h_min", h=hours, m=rest // 60)
    if rest >= 60:
        return t(lang, "duration_min_s", m=rest // 60, s=rest % 60)
    return t(lang, "duration_s", s=rest)
