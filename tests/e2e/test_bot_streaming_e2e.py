"""Answers stream as message drafts in private chats (sendMessageDraft), then arrive as one message with their
buttons; in groups, or where the Bot API server refuses drafts, a placeholder message is edited instead. Through
the Bot API emulator, with the bot's real telegram.Bot."""

from __future__ import annotations

import pytest
from inprocess import InProcessBot
from telegram import Chat

from bot.telegram.common import MAX_MESSAGE, keyboard
from bot.telegram.streaming import DRAFT_EVERY_S, DRAFTS_REFUSED, EDIT_EVERY_S, AnswerStream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

USER, GROUP = 8101, -8200
BUTTONS = keyboard([[("👍", "fb:u:1"), ("👎", "fb:d:1")]])


class Clock:
    """Seconds that pass only when the test says so: throttling is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def bot(emulator, tmp_path):
    b = InProcessBot(emulator, tmp_path)
    emulator.refuse_drafts(False)
    yield b
    emulator.refuse_drafts(False)
    b.close()


def chat_of(bot: InProcessBot, chat_id: int, kind: str) -> Chat:
    chat = Chat(id=chat_id, type=kind)
    chat.set_bot(bot.application.bot)
    return chat


def run(bot: InProcessBot, coro):
    return bot._runner.run(coro)


def test_a_private_chat_streams_drafts_then_sends_one_message(bot):
    clock, mark = Clock(), bot.emu.last_message_id()
    before = len(bot.emu.drafts(USER))
    stream = AnswerStream(bot.application.bot, chat_of(bot, USER, "private"), {}, drafts=True, draft_id=777,
                          placeholder="…", clock=clock)
    run(bot, stream.start())
    assert stream.mode == "draft" and bot.replies(USER, mark) == []  # nothing in the chat yet
    clock.now += DRAFT_EVERY_S
    run(bot, stream.grow("Two to"))
    clock.now += DRAFT_EVERY_S / 4
    run(bot, stream.grow("Two to three"))  # too soon after the last one: not sent
    clock.now += DRAFT_EVERY_S
    run(bot, stream.grow("Two to three working"))
    run(bot, stream.finish("Two to three working days.", BUTTONS))

    drafts = bot.emu.drafts(USER)[before:]
    assert [d["text"] for d in drafts] == ["…", "Two to …", "Two to three working …"]
    assert {d["draft_id"] for d in drafts} == {777}  # one animated draft
    [message] = bot.replies(USER, mark)
    assert message.text == "Two to three working days." and message.button_texts == ["👍", "👎"]
    assert message.edits == 0


def test_a_refused_draft_falls_back_to_edits_for_good(bot):
    bot.emu.refuse_drafts(True)
    clock, mark, bot_data = Clock(), bot.emu.last_message_id(), {}
    stream = AnswerStream(bot.application.bot, chat_of(bot, USER, "private"), bot_data, drafts=True, draft_id=5,
                          placeholder="…", clock=clock)
    run(bot, stream.start())
    assert stream.mode == "edit" and bot_data[DRAFTS_REFUSED] is True
    clock.now += EDIT_EVERY_S
    run(bot, stream.grow("Monday to"))
    run(bot, stream.finish("Monday to Saturday.", BUTTONS))
    [message] = bot.replies(USER, mark)  # the placeholder, edited twice
    assert message.text == "Monday to Saturday." and message.button_texts == ["👍", "👎"] and message.edits == 2
    # The next answer does not try drafts again (the server would refuse them).
    bot.emu.refuse_drafts(False)
    again = AnswerStream(bot.application.bot, chat_of(bot, USER, "private"), bot_data, drafts=True, draft_id=6,
                         placeholder="…", clock=clock)
    assert again.mode == "edit"


def test_groups_and_the_setting_off_edit_a_message(bot):
    for chat_id, kind, drafts in ((GROUP, "group", True), (USER, "private", False)):
        clock, mark = Clock(), bot.emu.last_message_id()
        before = len(bot.emu.drafts())
        stream = AnswerStream(bot.application.bot, chat_of(bot, chat_id, kind), {}, drafts=drafts, draft_id=9,
                              placeholder="…", clock=clock)
        run(bot, stream.start())
        clock.now += EDIT_EVERY_S / 2
        run(bot, stream.grow("Too soon"))  # edits are throttled harder than drafts
        run(bot, stream.finish("The answer.", BUTTONS))
        [message] = bot.replies(chat_id, mark)
        assert (message.text, message.edits, stream.mode) == ("The answer.", 1, "edit")
        assert len(bot.emu.drafts()) == before


def test_a_long_answer_is_split_and_the_buttons_go_under_its_last_part(bot):
    mark = bot.emu.last_message_id()
    stream = AnswerStream(bot.application.bot, chat_of(bot, USER, "private"), {}, drafts=True, draft_id=11,
                          placeholder="…", clock=Clock())
    run(bot, stream.start())
    run(bot, stream.grow("word " * 1000))  # past the limit: not drafted (Telegram would refuse it)
    text = ("word " * 1000).strip()
    run(bot, stream.finish(text, BUTTONS))
    parts = bot.replies(USER, mark)
    assert len(parts) == 2 and all(len(p.text) <= MAX_MESSAGE for p in parts)
    assert " ".join(p.text for p in parts) == text
    assert parts[0].buttons == [] and parts[1].button_texts == ["👍", "👎"]


def test_chat_answers_stream_as_drafts_in_the_real_handler(emulator, tmp_path, tiny_model_dir):
    bot = InProcessBot(emulator, tmp_path, base_model=tiny_model_dir, max_new_tokens=8)
    try:
        bot.store.create_assistant("acme", owner_id=USER)
        bot.ask(USER, "/chat")
        bot.app.engine_for(tiny_model_dir).load()  # loaded: the placeholder is "…", not "loading the model"
        before = len(emulator.drafts(USER))
        replies = bot.ask(USER, "What are your opening hours?")
        drafts = emulator.drafts(USER)[before:]
        assert drafts and drafts[0]["text"] == "…"  # the "typing" draft, then the text as it grew
        assert len(replies) == 1 and replies[0].edits == 0  # one message, sent once with its buttons
        assert replies[0].button_texts == ["👍", "👎", "✏️"] and not bot.errors
    finally:
        bot.close()
