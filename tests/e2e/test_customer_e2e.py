"""Customers through the link, against the real Application (in-process) and the Bot API emulator: an owner
publishes, a customer opens the link and asks, an unsure question reaches /review and the expert's answer comes
back to that customer only; 👍/👎; limits, privacy and crafted updates; revoking and unpublishing."""

from __future__ import annotations

import json
import re
import time

import pytest
from customer_helpers import customer_bot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

OWNER, EXPERT, ALICE, BOB, IVAN, TESTER = 8001, 8002, 8101, 8102, 8103, 8004
KNOWN = "How long does delivery take?"
UNKNOWN = "Zqxj vprk wmbt?"
ABSTAIN_EN = "I've passed your question to the team: their answer will come to this chat."
UNAVAILABLE = "This assistant isn't answering at the moment. Please try again later."
ABSTAIN_RU = "Я передал ваш вопрос команде: их ответ придёт в этот чат."


@pytest.fixture(scope="module")
def bot(emulator, tmp_path_factory, nearest_llm):
    b = customer_bot(emulator, tmp_path_factory.mktemp("customers"), nearest_llm, customer_per_minute=4,
                     customer_per_day=6, telegram_drafts=False)
    s = b.store
    acme = s.create_assistant("acme", owner_id=OWNER)
    s.add_member(acme.id, EXPERT, "expert")
    s.add_member(acme.id, TESTER, "tester")
    s.add_example(acme.id, KNOWN, "Two days.", status="approved")
    s.add_example(acme.id, "Do you deliver on Sundays?", "No, Monday to Saturday.", status="approved")
    yield b
    b.close()


def texts(messages) -> list[str]:
    return [m.text for m in messages]


def link_token(bot) -> str:
    return bot.store.get_publication(bot.store.find_assistant("acme").id).token


def test_owner_publishes_and_gets_the_link(bot):
    [status] = bot.ask(OWNER, "/publish")
    assert "not published yet" in status.text and status.button_texts == ["▶️ Publish"]
    acme = bot.store.find_assistant("acme")
    [shown] = bot.press(OWNER, f"pub:publish:{acme.id}")
    token = link_token(bot)
    assert f"https://t.me/TunebotTestBot?start={token}" in shown.text and "published" in shown.text
    assert "🔗 Link ✅" in shown.button_texts and "👥 Groups ❌" in shown.button_texts
    [refused] = bot.ask(EXPERT, "/publish")
    assert "needs the owner role" in refused.text


def test_a_customer_opens_the_link_and_gets_an_answer_without_team_details(bot):
    [welcome] = bot.ask(ALICE, f"/start {link_token(bot)}")
    assert welcome.text.startswith("👋 Hi! I'm the assistant of acme.") and "/forget" in welcome.text
    answer = bot.ask(ALICE, KNOWN)[-1]
    assert answer.button_texts == ["👍", "👎"] and answer.text == "Two days."
    assert "#" not in answer.text and "📚" not in answer.text
    customer = bot.store.link_customer(ALICE)
    message = bot.store.get_message(int(answer.buttons[0][0]["callback_data"].split(":")[2]))
    assert bot.store.message_customer(message["id"]) == customer.id and message["tg_message_id"] == answer.message_id


def test_team_commands_answer_customers_politely(bot):
    for command in ("/review", "/examples", "/publish", "/apikey", "/stats", "/chat", "/use", "/invite expert",
                    "/train", "/export", "/create", "/members", "/lang"):
        [said] = bot.ask(ALICE, command)
        assert said.text == "That command isn't available here. Just type your question.", command
    assert "Type your question" in bot.ask(ALICE, "/help")[0].text


def test_an_unknown_question_goes_to_review_and_the_answer_comes_back_to_that_customer_only(bot):
    [bob_welcome] = bot.ask(BOB, f"/start {link_token(bot)}")
    assert "acme" in bob_welcome.text
    [told] = bot.ask(ALICE, UNKNOWN)
    assert told.text == ABSTAIN_EN and told.buttons == []
    acme = bot.store.find_assistant("acme")
    [item] = [u for u in bot.store.list_unanswered(acme.id) if u.question == UNKNOWN]
    alice = bot.store.link_customer(ALICE)
    assert (item.customer_id, item.chat_id) == (alice.id, ALICE) and item.reply_to_message_id

    [card] = bot.ask(EXPERT, "/review")
    assert f"«{UNKNOWN}»" in card.text and "✏️ Reword the question first" in card.button_texts  # a customer's words
    [asked] = bot.press(EXPERT, f"un:q:{item.id}")
    assert f"The customer asked: «{UNKNOWN}»" in asked.text
    [asked] = bot.ask(EXPERT, "How fast do you answer?")
    assert "Send the answer to «How fast do you answer?»" in asked.text
    alice_mark, bob_mark = bot.emu.last_message_id(), bot.emu.last_message_id()
    bot.ask(EXPERT, "We answer within a day, every day.")
    [back] = bot.replies(ALICE, alice_mark)
    assert back.text == f"💬 The team's answer to your question «{UNKNOWN}»:\n\nWe answer within a day, every day."
    assert json.loads(back.raw["message"]["reply_parameters"])["message_id"] == item.reply_to_message_id
    assert bot.replies(BOB, bob_mark) == []
    example = bot.store.get_example(bot.store.get_unanswered(item.id).example_id)
    assert (example.question, example.answer, example.status) == (
        "How fast do you answer?", "We answer within a day, every day.", "approved")
    # delivered once: the repeating job finds nothing more to send
    assert bot.store.undelivered_team_answers() == []


def test_feedback_buttons_check_whose_answer_it_is(bot):
    alice_answer = next(m for m in reversed(bot.emu.bot_messages(ALICE)) if m.button_texts == ["👍", "👎"])
    up, down = (b["callback_data"] for b in alice_answer.buttons[0])
    mid = int(up.split(":")[2])
    for crafted in (up, down, f"cf:d:{mid + 1000}", "cf:x:1", "cf:d:abc", "cf:d:"):
        [refused] = bot.press(BOB, crafted)
        assert refused.text == "⚠️ This button is no longer valid.", crafted
    [refused] = bot.press(EXPERT, up)  # the team never sets a customer's feedback
    assert "no longer valid" in refused.text
    assert bot.store.get_message(mid)["feedback"] is None
    assert bot.press(ALICE, up)[0].text == "Thank you for the feedback!"
    assert bot.store.get_message(mid)["feedback"] == "up"
    [queued] = bot.press(ALICE, down)
    assert "passed your question to the team" in queued.text
    acme = bot.store.find_assistant("acme")
    items = [u for u in bot.store.list_unanswered(acme.id) if u.message_id == mid]
    assert len(items) == 1 and items[0].question == KNOWN and items[0].customer_id == bot.store.link_customer(ALICE).id
    bot.press(ALICE, down)  # a replayed 👎 queues nothing more
    assert len([u for u in bot.store.list_unanswered(acme.id) if u.message_id == mid]) == 1
    # a button in another chat than the customer's (a group) is refused too
    assert "no longer valid" in bot.press(ALICE, up, chat_id=-100777)[0].text


def test_a_russian_customer_is_answered_in_russian(bot):
    [welcome] = bot.ask(IVAN, f"/start {link_token(bot)}", language="ru")
    assert welcome.text.startswith("👋 Здравствуйте! Я ассистент acme.")
    [told] = bot.ask(IVAN, "Фывапр олджэ?", language="ru")
    assert told.text == ABSTAIN_RU
    assert bot.ask(IVAN, "/review", language="ru")[0].text == "Эта команда здесь недоступна. Просто напишите вопрос."


def test_non_text_huge_and_edited_messages(bot):
    base = {"date": int(time.time()), "chat": {"id": ALICE, "type": "private", "first_name": "A"},
            "from": {"id": ALICE, "is_bot": False, "first_name": "A", "language_code": "en"}}
    for i, extra in enumerate(({"sticker": {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 1,
                                            "height": 1, "is_animated": False, "is_video": False}},
                               {"photo": [{"file_id": "p", "file_unique_id": "p", "width": 1, "height": 1}]},
                               {"voice": {"file_id": "v", "file_unique_id": "v", "duration": 1}})):
        mark = bot.emu.last_message_id()
        bot.process({"update_id": 90_000 + i, "message": {"message_id": 90_000 + i, **base, **extra}})
        assert texts(bot.replies(ALICE, mark)) == ["I can only read text messages. Please type your question."]
    [too_long] = bot.ask(ALICE, "x" * 4001)
    assert too_long.text == "That message is too long for me. Please ask in at most 4000 characters."
    mark = bot.emu.last_message_id()
    bot.process({"update_id": 90_010, "edited_message": {"message_id": 90_010, **base, "edit_date": base["date"],
                                                         "text": "edited question"}})
    assert bot.replies(ALICE, mark) == [] and not bot.errors


def test_rate_limits_are_polite_and_spare_the_team(bot):
    # the fixture allows 4 a minute and 6 a day; Bob has asked nothing yet
    said = [bot.ask(BOB, f"Question {i} about Sundays?")[-1].text for i in range(5)]
    assert said[4] == "That's a lot of questions at once 🙂 Please wait a minute and ask again."
    assert all("a lot of questions" not in s for s in said[:4])
    bot.store.db.execute("update messages set created_at = datetime(created_at, '-2 minutes')")
    bot.app.store.db.conn.commit()
    limiter = bot.application.bot_data["customer_limiter"]
    limiter._recent.clear()  # a minute has passed for the in-memory window too
    said = [bot.ask(BOB, f"More {i}?")[-1].text for i in range(3)]
    assert said[2] == "That's the limit of questions for today. Please come back tomorrow."
    # the team is never limited
    for i in range(6):
        assert bot.ask(TESTER, "/help")


def test_forget_deletes_what_the_customer_sent(bot):
    acme = bot.store.find_assistant("acme")
    alice = bot.store.link_customer(ALICE)
    before = bot.store.db.execute("select count(*) from messages where conversation_id = ? and text != ''",
                                  [alice.conversation_id]).fetchone()[0]
    [done] = bot.ask(ALICE, "/forget")
    assert done.text == f"Done: I've deleted {before} of your messages and my answers to them."
    left = bot.store.db.execute("select count(*) from messages where conversation_id = ? and text != ''",
                                [alice.conversation_id]).fetchone()[0]
    assert before > 0 and left == 0
    entry = next(e for e in bot.store.audit_entries(assistant_id=acme.id) if e.action == "customer.forget")
    assert entry.details["messages"] == before and UNKNOWN not in str(entry.details)


def test_owner_stats_show_customers(bot):
    stats, chart = bot.ask(OWNER, "/stats")
    assert "Customers (30 days):" in stats.text and "Team answers sent back: 1" in stats.text
    assert chart.photo and chart.text.startswith("📈 Customers' questions per day")
    [tester_stats] = bot.ask(TESTER, "/stats")
    assert "Customers" not in tester_stats.text


def test_revoking_the_link_stops_answers_at_once(bot):
    acme = bot.store.find_assistant("acme")
    old = link_token(bot)
    replies = bot.press(OWNER, f"pub:revoke:{acme.id}")
    new = link_token(bot)
    assert new != old and any(new in m.text for m in replies) and any("old one answers nothing" in m.text
                                                                        for m in replies)
    [said] = bot.ask(BOB, KNOWN)
    assert said.text == UNAVAILABLE
    assert bot.ask(BOB, f"/start {old}")[0].text == "This link no longer works. Please ask the company for a new one."
    bot.ask(BOB, f"/start {new}")
    assert bot.ask(BOB, "Are you there?")[-1].text != UNAVAILABLE
    bot.press(OWNER, f"pub:unpublish:{acme.id}")
    [said] = bot.ask(BOB, KNOWN)
    assert "isn't answering" in said.text
    bot.press(OWNER, f"pub:publish:{acme.id}")


def test_a_team_member_opening_the_link_is_sent_to_chat(bot):
    [said] = bot.ask(TESTER, f"/start {link_token(bot)}")
    assert said.text.startswith("You're on the team of acme")
    assert bot.store.link_customer(TESTER) is None


def test_crafted_publish_buttons(bot):
    acme = bot.store.find_assistant("acme")
    for data in ("pub:revoke:999", "pub:fax:1", f"pub:link:{acme.id}:1", "pub:", f"pub:publish:{acme.id}x"):
        assert "no longer valid" in bot.press(OWNER, data)[0].text, data
    assert "needs the owner role" in bot.press(EXPERT, f"pub:unpublish:{acme.id}")[0].text
    assert bot.store.get_publication(acme.id).active
    assert "needs the owner role" not in bot.press(OWNER, f"pub:greeting:{acme.id}")[0].text
    bot.ask(OWNER, "Welcome to ACME! Ask about parcels.")
    assert bot.store.get_publication(acme.id).greeting == "Welcome to ACME! Ask about parcels."
    [greeted] = bot.ask(8200, f"/start {link_token(bot)}")
    assert greeted.text == "Welcome to ACME! Ask about parcels."
    assert re.search(r"Greeting: Welcome to ACME", bot.ask(OWNER, "/publish")[0].text)
    assert not bot.errors


def test_a_team_answer_that_could_not_be_sent_goes_out_with_the_next_one(bot):
    """Three customers ask the same unknown question (one example answers them all in the end): each gets the
    answer the expert gave to their own item, once; a passing fault is retried, a blocked bot is not."""
    acme = bot.store.find_assistant("acme")
    for uid in (8301, 8302, 8303):
        bot.ask(uid, f"/start {link_token(bot)}")
        assert bot.ask(uid, UNKNOWN)[-1].text == ABSTAIN_EN
    items = {u.user_id: u for u in bot.store.list_unanswered(acme.id) if u.user_id in (8301, 8302, 8303)}
    # 8301's chat fails twice: when its answer is saved, and again when the next answer's delivery retries it
    bot.emu.post("/failSends", {"token": bot.emu.token, "chat_id": 8301, "status": 500, "times": 2})
    bot.emu.post("/failSends", {"token": bot.emu.token, "chat_id": 8302, "status": 403, "times": 1})
    for uid in (8301, 8302):
        bot.press(EXPERT, f"un:a:{items[uid].id}")
        bot.ask(EXPERT, f"Answer for {uid}.")
    assert not any("Answer for" in m.text for m in bot.emu.bot_messages(8301) + bot.emu.bot_messages(8302))
    assert bot.store.get_unanswered(items[8301].id).delivered_at is None  # a passing fault: tried again later
    assert bot.store.get_unanswered(items[8302].id).delivered_at is not None  # blocked: never again
    bot.press(EXPERT, f"un:a:{items[8303].id}")
    bot.ask(EXPERT, "Answer for 8303.")
    for uid in (8301, 8303):
        assert [m.text.rsplit("\n", 1)[-1] for m in bot.emu.bot_messages(uid) if "team's answer" in m.text] == [
            f"Answer for {uid}."]
    assert not any("Answer for" in m.text for m in bot.emu.bot_messages(8302))
    assert bot.store.undelivered_team_answers() == [] and not bot.errors


def test_a_customer_invited_to_the_team_joins_it(bot):
    acme = bot.store.find_assistant("acme")
    bot.ask(8400, f"/start {link_token(bot)}")
    invite = bot.store.create_invite(acme.id, "tester", created_by=OWNER)
    [joined] = bot.ask(8400, f"/start {invite.token}")
    assert "tester" in joined.text and bot.store.role_of(acme.id, 8400) == "tester"
    assert "Every message is a question" in bot.ask(8400, "/chat")[0].text  # the team's side now
