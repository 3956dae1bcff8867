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
