"""/create offers the base models the admin configured (TUNEBOT_BASE_MODELS) and refuses anything else: a typed
folder, .gguf path or hub id used to be accepted (a download, or a probe of the file system through error texts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inprocess import InProcessBot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

USERS = {"en": 8001, "ru": 8002}
OTHER = "HuggingFaceTB/SmolLM2-360M-Instruct"
REFUSED = {"en": "not one of the base models offered here", "ru": "Такой базовой модели здесь нет"}
DEFAULT = {"en": "(the default)", "ru": "(по умолчанию)"}
CREATED = {"en": "created", "ru": "создан"}


@pytest.fixture(scope="module")
def bot(emulator, tmp_path_factory, tiny_model_dir):
    b = InProcessBot(emulator, tmp_path_factory.mktemp("create-models"), base_model=tiny_model_dir,
                     base_models=(OTHER,))
    yield b
    b.close()


def _model_question(bot, user: int, name: str, language: str):
    for text in ("/create", name, "Parcel help", "Answer briefly."):
        replies = bot.ask(user, text, language=language)
    return replies[-1]


@pytest.mark.parametrize("language", ["en", "ru"])
def test_create_offers_the_admins_models_and_refuses_anything_else(bot, tiny_model_dir, tmp_path, language):
    user, name = USERS[language], f"acme-{language}"
    question = _model_question(bot, user, name, language)
    assert question.button_texts == [f"{Path(tiny_model_dir).name} {DEFAULT[language]}", OTHER]
    assert str(Path(tiny_model_dir).parent) not in question.text + str(question.buttons)  # names, not paths
    # (Text starting with "/" is a command to Telegram: it never reaches this step.)
    for typed in (f" {tmp_path}", f" {tiny_model_dir}/..", "gpt2", "../../models/x.gguf", "~/models", OTHER + "x"):
        refused = bot.ask(user, typed, language=language)[-1]
        assert REFUSED[language] in refused.text and refused.button_texts == question.button_texts, typed
    for crafted in ("cr:2", "cr:999", "cr:-1", "cr:x"):
        assert REFUSED[language] in bot.press(user, crafted, language=language)[-1].text
    assert bot.store.find_assistant(name) is None
    done = bot.press(user, "cr:1", language=language)[0]  # then the first-run checklist
    assert CREATED[language] in done.text and OTHER in done.text
    assert bot.store.find_assistant(name).base_model == OTHER
    assert not bot.errors


def test_an_offered_model_may_be_typed_by_name(bot, tiny_model_dir):
    _model_question(bot, USERS["en"], "initech", "en")
    done = bot.ask(USERS["en"], Path(tiny_model_dir).name, language="en")[0]  # its name, as the button shows it
    assert "created" in done.text and str(Path(tiny_model_dir).parent) not in done.text
    assert bot.store.find_assistant("initech").base_model == tiny_model_dir
