"""Customers in a group, against the real Application (in-process) and the Bot API emulator: an owner links the
group with /publish, the bot answers mentions and replies to it and ignores the rest, an expert's reply to its
answer is a pending correction, an unsure question's answer comes back as a reply in the group."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from customer_helpers import customer_bot
from inprocess import BOT_USER

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

OWNER, EXPERT, CAROL, DAVE = 8301, 8302, 8401, 8402
GROUP, OTHER_GROUP = -1008301, -1008302
KNOWN = "How long does delivery take?"
UNKNOWN = "Zqxj vprk wmbt?"
_ids = itertools.count(50_000)


@pytest.fixture(scope="module")
def bot(emulator, tmp_path_factory, nearest_llm):
    b = customer_bot(emulator, tmp_path_factory.mktemp("groups"), nearest_llm)
    s = b.store
    acme = s.create_assistant("acme", owner_id=OWNER)
    s.add_member(acme.id, EXPERT, "expert")
    s.add_example(acme.id, KNOWN, "Two days.", status="approved")
    yield b
    b.close()


def say(bot, user_id: int, text: str, *, chat_id: int = GROUP, mention: bool = False, reply_to: int | None = None,
        edited: bool = False, is_bot: bool = False) -> list:
    """A group message (mentioning the bot, or replying to its message); the bot's new messages in the group."""
    mark = bot.emu.last_message_id()
    n = next(_ids)
    if mention:
        text = f"@{BOT_USER['username']} {text}"
    message = {"message_id": n, "date": int(time.time()), "chat": {"id": chat_id, "type": "supergroup",
                                                                   "title": "ACME customers"},
               "from": {"id": user_id, "is_bot": is_bot, "first_name": f"U{user_id}", "language_code": "en"},
               "text": text}
    if mention:
        message["entities"] = [{"type": "mention", "offset": 0, "length": len(BOT_USER["username"]) + 1}]
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    if reply_to is not None:
        message["reply_to_message"] = {"message_id": reply_to, "date": int(time.time()), "from": BOT_USER,
                                       "chat": message["chat"], "text": "…"}
    if edited:
        message["edit_date"] = int(time.time())
    bot.process({"update_id": n, "edited_message" if edited else "message": message})
    return bot.replies(chat_id, mark)


def replied_to(message) -> int | None:
    """The message id a bot message replies to (reply_parameters arrive JSON-encoded in a form field)."""
    params = message.raw["message"].get("reply_parameters")
    if isinstance(params, str):
        params = json.loads(params)
    found = (params or {}).get("message_id") or message.raw["message"].get("reply_to_message_id")
    return None if found is None else int(found)


def test_an_owner_links_a_group_once_groups_are_on(bot):
    acme = bot.store.find_assistant("acme")
    bot.ask(OWNER, "/publish")
    bot.press(OWNER, f"pub:publish:{acme.id}")
    [refused] = say(bot, OWNER, "/publish")
    assert "turn on the groups channel" in refused.text and bot.store.group_assistant(GROUP) is None
    bot.press(OWNER, f"pub:groups:{acme.id}")
    [linked] = say(bot, OWNER, "/publish")
    assert "I'll answer for acme in this group" in linked.text and bot.store.group_assistant(GROUP) == acme.id
    assert "needs the owner role" in say(bot, EXPERT, "/publish", chat_id=OTHER_GROUP)[0].text
    assert bot.store.group_assistant(OTHER_GROUP) is None


def test_only_mentions_and_replies_are_answered(bot):
    assert say(bot, CAROL, "Hi all, anyone know the delivery time?") == []
    assert say(bot, CAROL, f"@{BOT_USER['username']}X {KNOWN}") == []  # another bot's name
    [emoji_first] = say(bot, DAVE, f"👋🏽👋🏽 @{BOT_USER['username'].lower()} {KNOWN}")
    assert emoji_first.text == "Two days."
    [answer] = say(bot, CAROL, KNOWN, mention=True)
    assert answer.button_texts == ["👍", "👎"]
    assert replied_to(answer) is not None
    [again] = say(bot, DAVE, "Do you deliver on Sundays?", reply_to=answer.message_id)
    assert again.text
    assert say(bot, CAROL, "thanks!", edited=True) == []
    assert say(bot, 5555, KNOWN, mention=True, is_bot=True) == []  # other bots are never answered
    elsewhere = say(bot, CAROL, KNOWN, chat_id=OTHER_GROUP, mention=True)  # not linked there: the usual hint only
    assert not any(m.buttons or "Two days" in m.text for m in elsewhere)
    customers = {c["user_id"]: c for c in bot.store.db.query("select * from customers")}
    assert customers[CAROL]["chat_id"] == GROUP and customers[CAROL]["channel"] == "groups"


def test_an_unsure_question_is_answered_by_the_team_in_the_group(bot):
    [told] = say(bot, DAVE, UNKNOWN, mention=True)
    assert "passed your question to the team" in told.text
    acme = bot.store.find_assistant("acme")
    [item] = [u for u in bot.store.list_unanswered(acme.id) if u.question == UNKNOWN]
    assert item.chat_id == GROUP and item.reply_to_message_id
    bot.ask(EXPERT, "/review")
    bot.press(EXPERT, f"un:a:{item.id}")
    mark = bot.emu.last_message_id()
    bot.ask(EXPERT, "Please write to support@acme.test.")
    [back] = bot.replies(GROUP, mark)
    assert back.text.endswith("Please write to support@acme.test.") and UNKNOWN in back.text
    assert replied_to(back) == item.reply_to_message_id
    assert bot.replies(DAVE, mark) == [] and bot.replies(CAROL, mark) == []


def test_an_experts_reply_to_the_bot_is_a_pending_correction(bot):
    answer = next(m for m in reversed(bot.emu.bot_messages(GROUP)) if m.button_texts == ["👍", "👎"])
    [saved] = say(bot, EXPERT, "Two to three working days.", reply_to=answer.message_id)
    assert "pending correction" in saved.text
    acme = bot.store.find_assistant("acme")
    pending = [e for e in bot.store.list_examples(acme.id, status="pending") if e.source == "feedback"]
    assert [(e.answer, e.author_id) for e in pending] == [("Two to three working days.", EXPERT)]
    # a customer's reply to the bot is a question, never a correction
    say(bot, CAROL, "And to Canada?", reply_to=answer.message_id)
    assert len([e for e in bot.store.list_examples(acme.id, status="pending") if e.source == "feedback"]) == 1


def test_group_feedback_only_from_the_customer_who_asked(bot):
    answer = next(m for m in reversed(bot.emu.bot_messages(GROUP))
                  if m.button_texts == ["👍", "👎"] and "Two" not in m.text)
    mid = int(answer.buttons[0][0]["callback_data"].split(":")[2])
    asker = bot.store.get_customer(bot.store.message_customer(mid)).user_id
    other = DAVE if asker == CAROL else CAROL
    assert "no longer valid" in bot.press(other, f"cf:u:{mid}", chat_id=GROUP)[0].text
    assert "Thank you" in bot.press(asker, f"cf:u:{mid}", chat_id=GROUP)[0].text
    assert not bot.errors


def added(bot, user_id: int, chat_id: int) -> list:
    """`user_id` adds the bot to a group; the bot's new messages there."""
    mark = bot.emu.last_message_id()
    n = next(_ids)
    bot.process({"update_id": n, "message": {
        "message_id": n, "date": int(time.time()), "chat": {"id": chat_id, "type": "group", "title": "New group"},
        "from": {"id": user_id, "is_bot": False, "first_name": "U"}, "new_chat_members": [BOT_USER]}})
    return bot.replies(chat_id, mark)


def test_added_by_an_owner_the_bot_answers_there_and_removed_it_stops(bot):
    acme = bot.store.find_assistant("acme")
    assert added(bot, CAROL, -100_9001) == [] and bot.store.group_assistant(-100_9001) is None  # not the team
    assert added(bot, EXPERT, -100_9002) == [] and bot.store.group_assistant(-100_9002) is None  # not an owner
    [linked] = added(bot, OWNER, -100_9003)
    assert "I'll answer for acme in this group" in linked.text and bot.store.group_assistant(-100_9003) == acme.id
    assert say(bot, CAROL, KNOWN, chat_id=-100_9003, mention=True)[0].text == "Two days."
    n = next(_ids)
    bot.process({"update_id": n, "my_chat_member": {
        "chat": {"id": -100_9003, "type": "group", "title": "New group"}, "date": int(time.time()),
        "from": {"id": OWNER, "is_bot": False, "first_name": "O"},
        "old_chat_member": {"status": "member", "user": BOT_USER},
        "new_chat_member": {"status": "left", "user": BOT_USER}}})
    assert bot.store.group_assistant(-100_9003) is None
    assert not any(m.buttons for m in say(bot, CAROL, KNOWN, chat_id=-100_9003, mention=True))
    assert not bot.errors


def test_turning_groups_off_silences_the_group(bot):
    acme = bot.store.find_assistant("acme")
    bot.press(OWNER, f"pub:groups:{acme.id}")
    assert say(bot, CAROL, KNOWN, mention=True) == []
    bot.press(OWNER, f"pub:groups:{acme.id}")
    assert say(bot, CAROL, KNOWN, mention=True)
