"""The bot's text catalogues: the same keys and placeholders in every language."""

import re
import string

from bot.telegram.texts import LANGUAGES, catalogue, pick_language, t


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_every_key_exists_in_every_language():
    keys = {lang: set(catalogue(lang)) for lang in LANGUAGES}
    for lang in LANGUAGES:
        assert keys[lang] == keys["en"], f"{lang}: missing {keys['en'] - keys[lang]}, extra {keys[lang] - keys['en']}"


def test_placeholders_match_between_languages():
    for key, text in catalogue("en").items():
        for lang in LANGUAGES:
            assert _fields(catalogue(lang)[key]) == _fields(text), f"{lang}:{key}"


def test_russian_texts_are_translated():
    same = [k for k, v in catalogue("ru").items() if v == catalogue("en")[k] and re.search(r"[a-z]{4}", v)
            and not k.startswith("error_user")]
    assert len(same) < 5, same


def test_every_key_used_in_code_exists():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "bot" / "telegram"
    used = set()
    for path in root.rglob("*.py"):
        used |= set(re.findall(r"(?:tr\(update, context, |t\(lang, )\"([a-z_]+)\"", path.read_text()))
    assert used, "no text keys found in the handlers"
    assert used <= set(catalogue("en")), used - set(catalogue("en"))


def test_language_choice():
    assert pick_language("ru-RU") == "ru"
    assert pick_language("de", "en") == "en"
    assert pick_language(None, "ru") == "ru"
    assert "Ada" in t("ru", "use_switched", name="Ada")
