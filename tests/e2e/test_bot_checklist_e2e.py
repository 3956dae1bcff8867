"""The first-run checklist after /create, through the real Application and the Bot API emulator: one message that
edits itself as the owner adds examples, reviews variations, trains and tries the model, with the next step's
button on it; in the owner's language; a checklist that cannot be edited any more is left alone quietly."""

from __future__ import annotations

import pytest
from inprocess import InProcessBot
from telegram.ext import CallbackContext
from texts_check import latin_noise

from bot.telegram.progress import poll_jobs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EN_OWNER, RU_OWNER, GONE_OWNER = 9101, 9102, 9103


@pytest.fixture(scope="module")
def bot(emulator, tmp_path_factory, tiny_model_dir):
    b = InProcessBot(emulator, tmp_path_factory.mktemp("checklist"), base_model=tiny_model_dir)
    yield b
    b.close()


def create(bot: InProcessBot, user: int, name: str, language: str):
    """/create to the end; the checklist is the last message, after "created"."""
    for text in ("/create", name, "Parcel help", "Answer briefly."):
        bot.ask(user, text, language=language)
    replies = bot.press(user, "cr:0", language=language)
    assert len(replies) == 2, [m.text for m in replies]
    return bot.store.assistant_by_name(name), replies[-1]


def now(bot: InProcessBot, message):
    """The message as it reads now, after the bot's edits."""
    return next(m for m in bot.emu.bot_messages(message.chat_id) if m.message_id == message.message_id)


def test_checklist_follows_the_owner_through_the_first_run(bot):
    store = bot.store
    assistant, checklist = create(bot, EN_OWNER, "acme", "en")
    assert "☐ Examples added: 0" in checklist.text and "☐ Training" in checklist.text
    assert checklist.button_texts == ["➕ Add an example"]

    bot.ask(EN_OWNER, "Q: How long does delivery take? A: Two to three days.")
    first = now(bot, checklist)
    assert first.edits == 1 and "☐ Examples added: 1" in first.text
    bot.ask(EN_OWNER, "Q: Do you deliver on Sundays? A: No, Monday to Saturday.")
    two = now(bot, checklist)
    assert "✅ Examples added: 2" in two.text and two.button_texts == ["✨ Make variations", "🚀 Train"]
    bot.ask(EN_OWNER, "/help")
    assert now(bot, checklist).edits == two.edits  # nothing changed: no edit

    # Variations, as a generation run leaves them: pending, to review.
    parent = store.list_examples(assistant.id)[0]
    variation = store.add_example(assistant.id, "How long does delivery tkae?", parent.answer, source="synthetic",
                                  status="pending", parent_id=parent.id, method="mutation:typo")
    bot.ask(EN_OWNER, "/stats")
    waiting = now(bot, checklist)
    assert "⏳ Variations reviewed: 1 waiting" in waiting.text and waiting.button_texts == ["📝 Review"]
    card = bot.press(EN_OWNER, "fr:rv")[-1]
    assert "tkae" in card.text
    bot.press(EN_OWNER, f"rv:a:{variation.id}")
    reviewed = now(bot, checklist)
    assert "✅ Variations reviewed" in reviewed.text and reviewed.button_texts == ["🚀 Train"]

    summary = bot.press(EN_OWNER, "fr:tr")[-1]
    assert "Training acme" in summary.text
    bot.press(EN_OWNER, "tr:now")
    job = store.list_jobs(assistant_id=assistant.id)[0]
    training = now(bot, checklist)
    assert f"⏳ Training (job #{job.id})" in training.text and training.button_texts == []

    # What the worker does when the run ends (no worker runs in this test); the progress poller notices.
    version = store.add_model_version(assistant.id, adapter_path="/nonexistent", base_model=assistant.base_model)
    store.update_job(job.id, status="succeeded")
    bot._runner.run(poll_jobs(CallbackContext(bot.application)))
    trained = now(bot, checklist)
    assert f"✅ Training: version #{version.id}" in trained.text and trained.button_texts == ["💬 Try it"]
    assert f"#{version.id}" in bot.press(EN_OWNER, f"tv:t:{version.id}")[-1].text  # chatting with the new version
    assert bot.user_data(EN_OWNER)["chat"]["version_id"] == version.id

    # An answer of the trained version, as chat records it.
    conversation = store.start_conversation(assistant.id, EN_OWNER)
    store.add_message(conversation, "assistant", "Two to three days.", model_version_id=version.id)
    bot.ask(EN_OWNER, "/stop")
    done = now(bot, checklist)
    assert "✅ Try it" in done.text and "🎉" in done.text and done.button_texts == []
    assert store.get_state(f"tg:checklist:{assistant.id}")["done"] is True
    assert bot.errors == [], bot.errors


def test_checklist_in_russian(bot):
    _, checklist = create(bot, RU_OWNER, "severo", "ru")
    assert "☐ Примеры добавлены: 0" in checklist.text and checklist.button_texts == ["➕ Добавить пример"]
    bot.ask(RU_OWNER, "В: Сколько стоит доставка? О: 300 рублей.", language="ru")
    bot.ask(RU_OWNER, "В: Когда открыт склад? О: С 8 до 20.", language="ru")
    edited = now(bot, checklist)
    assert "✅ Примеры добавлены: 2" in edited.text and edited.button_texts == ["✨ Сделать варианты", "🚀 Обучить"]
    assert latin_noise(edited.text + " ".join(edited.button_texts), ["severo"]) == []
    asked = bot.press(RU_OWNER, "fr:add", language="ru")[-1]  # ➕ starts /add's dialogue
    assert "вопрос" in asked.text.lower()
    bot.ask(RU_OWNER, "/cancel", language="ru")
    assert bot.errors == [], bot.errors


def test_a_checklist_that_cannot_be_edited_is_left_alone(bot):
    assistant, checklist = create(bot, GONE_OWNER, "initech", "en")
    key = f"tg:checklist:{assistant.id}"
    bot.store.set_state(key, {**bot.store.get_state(key), "message_id": 10 ** 8})  # deleted in the chat
    replies = bot.ask(GONE_OWNER, "Q: Where is the depot? A: In Podolsk.")
    assert len(replies) == 1 and "Saved" in replies[0].text
    assert bot.store.get_state(key)["done"] is True and bot.errors == []
    bot.ask(GONE_OWNER, "Q: When does it open? A: At eight.")
    assert now(bot, checklist).edits == 0 and bot.errors == []
