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


def test_a_message_sent_while_the_creation_finishes_is_not_read_as_a_model_name(bot):
    """Updates run concurrently: the quick form typed as soon as the model button is tapped used to reach the
    finished dialogue's model step ("no such base model") and was lost. It is saved as an example."""
    import asyncio
    import time

    from telegram import Update

    user = 8003
    question = _model_question(bot, user, "quick-typist", "en")
    data = question.buttons[0][0]["callback_data"]
    chat = {"id": user, "type": "private", "first_name": f"U{user}"}
    sender = {"id": user, "is_bot": False, "first_name": f"U{user}", "language_code": "en"}
    tap = {"update_id": 90_001, "callback_query": {
        "id": "90001", "from": sender, "chat_instance": str(user), "data": data,
        "message": {"message_id": 10 ** 9, "date": int(time.time()), "chat": chat,
                    "from": {"id": 666, "is_bot": True, "first_name": "Bot"}, "text": "…"}}}
    quick_form = "Q: Do you ship on Sundays? A: No, Monday to Saturday."
    text = {"update_id": 90_002, "message": {"message_id": 90_002, "date": int(time.time()), "chat": chat,
                                             "from": sender, "text": quick_form}}
    mark = bot.emu.last_message_id()
    application = bot.application

    async def both():
        await asyncio.gather(*(application.process_update(Update.de_json(p, application.bot)) for p in (tap, text)))

    bot._runner.run(both())
    texts = " ".join(m.text for m in bot.replies(user, mark))
    assert "created" in texts and "not one of the base models" not in texts
    assistant = bot.store.assistant_by_name("quick-typist")
    assert [e.question for e in bot.store.list_examples(assistant.id)] == ["Do you ship on Sundays?"]
