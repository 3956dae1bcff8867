"""Questions the assistant could not answer reach the experts, through the emulator against `tunebot run`:
batched notices, /review cards answered into examples, 📚 sources, crafted buttons refused, and chat answers
that name their sources or pass an unsure question on."""

from __future__ import annotations

import pytest
from emulator import BotMessage

from bot_process import BotProcess
from storage import Store, open_db

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OWNER, EXPERT, RU_EXPERT, TESTER, GLOBEX_OWNER = 4001, 4002, 4003, 4004, 4009


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bot-data")


@pytest.fixture(scope="module")
def seeded(data_dir) -> dict:
    """Two assistants with open unanswered questions and recorded answers, written before the bot starts."""
    store = Store(open_db(data_dir / "tunebot.db"))
    acme = store.create_assistant("acme", owner_id=OWNER)
    globex = store.create_assistant("globex", owner_id=GLOBEX_OWNER)
    store.add_member(acme.id, EXPERT, "expert")
    store.add_member(acme.id, RU_EXPERT, "expert")
    store.add_member(acme.id, TESTER, "tester")
    store.set_user_language(RU_EXPERT, "ru")  # as /lang ru leaves it
    delivery = store.add_example(acme.id, "How long does delivery take?", "Two days.")
    gone = store.add_example(acme.id, "Do you deliver on Sundays?", "No.")
    store.delete_example(gone.id)
    conv = store.start_conversation(acme.id, TESTER)
    store.add_message(conv, "user", "How long does delivery take??")
    answer = store.add_message(conv, "assistant", "Two days.", mode="grounded", sources=[delivery.id, gone.id],
                               confidence=0.9)
    other_conv = store.start_conversation(globex.id, GLOBEX_OWNER)
    secret = store.add_message(other_conv, "assistant", "Globex secret answer")
    out = {"acme": acme.id, "globex": globex.id, "delivery": delivery.id, "gone": gone.id, "answer": answer,
           "secret": secret,
           "mars": store.add_unanswered(acme.id, "Do you ship to Mars?", user_id=TESTER).id,
           "gold": store.add_unanswered(acme.id, "Can I pay in gold?", user_id=TESTER).id,
           "globex_item": store.add_unanswered(globex.id, "Globex internal question?").id}
    store.db.conn.close()
    return out


@pytest.fixture(scope="module")
def bot(emulator, data_dir, seeded, tiny_model_dir, model_cache):
    proc = BotProcess(emulator, data_dir, TUNEBOT_UNANSWERED_NOTIFY_MINUTES="0.02",  # every 1.2 s
                      TUNEBOT_BASE_MODEL=tiny_model_dir, TUNEBOT_MAX_NEW_TOKENS="8", TUNEBOT_TORCH_THREADS="1",
                      TUNEBOT_TEST_CACHE=str(model_cache))
    proc.start()
    yield proc
    proc.stop()
    print(proc.log()[-3000:])


@pytest.fixture(scope="module")
def db(bot, data_dir):
    return Store(open_db(data_dir / "tunebot.db"))


def notices(user) -> list[BotMessage]:
    return [m for m in user.messages() if m.text.startswith("❓ ") and "/review" in m.text]


def tap_data(user, data: str, *, contains: str) -> BotMessage:
    """Tap a button with crafted callback data (on the user's last bot message, if any)."""
    anchor = (user.messages() or [None])[-1]
    crafted = BotMessage(message_id=anchor.message_id if anchor else 1, chat_id=user.id,
                         text=anchor.text if anchor else "", buttons=[[{"text": "crafted", "callback_data": data}]],
                         document=None, photo=None, edits=anchor.edits if anchor else 0, raw={})
    return user.press(crafted, "crafted", contains=contains)


def test_new_questions_reach_owners_and_experts_once_in_their_language(emulator, bot, db, seeded):
    owner, expert = emulator.user(OWNER, "Olga"), emulator.user(EXPERT, "Eric")
    ru, tester = emulator.user(RU_EXPERT, "Ivan", language="ru"), emulator.user(TESTER, "Tess")
    other = emulator.user(GLOBEX_OWNER, "Gus")
    for user, start in ((owner, "❓ 2 new questions acme could not answer:"),
                        (expert, "❓ 2 new questions acme could not answer:"),
                        (ru, "❓ 2 новых вопроса, на которые ассистент acme не смог ответить:"),
                        (other, "❓ 1 new question globex could not answer:")):
        [notice] = user.wait(0, timeout=60, until=lambda ms, s=start: any(m.text.startswith(s) for m in ms))
        assert notice.text.startswith(start), notice.text
    [owner_notice] = notices(owner)
    assert "• Do you ship to Mars?\n• Can I pay in gold?" in owner_notice.text
    assert "Globex" not in owner_notice.text and "Mars" not in notices(other)[0].text
    assert "Ответьте в /review" in notices(ru)[0].text
    assert notices(tester) == [] and db.unnotified_unanswered() == []

    mark = emulator.last_message_id()
    seeded["parcel"] = db.add_unanswered(seeded["acme"], "Where is my parcel?", user_id=TESTER).id
    latest = expert.wait(mark, timeout=60, until=lambda ms: any("1 new question acme" in m.text for m in ms))[-1]
    assert "• Where is my parcel?" in latest.text and "Mars" not in latest.text
    assert owner.is_silent_after(emulator.last_message_id(), wait_s=4)  # over three intervals: told once
    assert len(notices(owner)) == 2


def test_russian_expert_gets_the_card_in_russian(emulator, bot, seeded):
    ru = emulator.user(RU_EXPERT, "Ivan", language="ru")
    card = ru.ask("/review", contains="Клиент спросил")
    assert "«Do you ship to Mars?»" in card.text and "ждут ответа: 3" in card.text and "вопрос задан 20" in card.text
    assert card.button_texts == ["✍️ Ответить", "🗑 Отклонить", "⏭ Пропустить"]
    assert "больше не действует" in tap_data(ru, "un:a:oops", contains="кнопка").text
    card = ru.press(card, "Пропустить", contains="Can I pay in gold?")
    assert f"un:a:{seeded['gold']}" in str(card.buttons)


def test_expert_answers_and_dismisses_from_review(emulator, bot, db, seeded):
    expert = emulator.user(EXPERT, "Eric")
    card = expert.ask("/review", contains="could not answer confidently")
    assert "«Do you ship to Mars?»" in card.text and "(3 waiting)" in card.text and "(asked 20" in card.text
    assert card.button_texts == ["✍️ Answer", "🗑 Dismiss", "⏭ Skip"]
    assert "Send the answer to «Do you ship to Mars?»" in expert.press(card, "Answer", contains="Send").text

    mark = expert.send("Not yet: we deliver on Earth only.")
    saved, card = expert.wait(mark, count=2, until=lambda ms: "gold" in ms[-1].text)[-2:]
    item = db.get_unanswered(seeded["mars"])
    assert (item.status, item.answered_by) == ("answered", EXPERT)
    ex = db.get_example(item.example_id)
    assert (ex.question, ex.answer, ex.status, ex.source, ex.author_id) == (
        "Do you ship to Mars?", "Not yet: we deliver on Earth only.", "approved", "expert", EXPERT)
    assert saved.text == (f"✅ Saved as example #{ex.id}:\nQ: Do you ship to Mars?\n"
                          "A: Not yet: we deliver on Earth only.")

    card = expert.press(card, "Dismiss", contains="Where is my parcel?")
    assert db.get_unanswered(seeded["gold"]).status == "dismissed"
    done = expert.press(card, "Skip", contains="Nothing left to review")
    assert "Nothing left" in done.text and db.get_unanswered(seeded["parcel"]).status == "open"


def test_a_closed_question_says_so(emulator, bot, db, seeded):
    ru = emulator.user(RU_EXPERT, "Ivan", language="ru")
    gold_card = [m for m in ru.messages() if "Can I pay in gold?" in m.text][-1]
    assert "уже ответили" in ru.press(gold_card, "Ответить", contains="уже ответили").text
    assert db.get_unanswered(seeded["gold"]).status == "dismissed"
    assert db.count_examples(seeded["acme"]) == 2  # delivery and Mars; the deleted one is not counted


def test_crafted_buttons_are_refused(emulator, bot, db, seeded):
    expert, tester = emulator.user(EXPERT, "Eric"), emulator.user(TESTER, "Tess")
    for data in (f"un:a:{seeded['globex_item']}", f"un:d:{seeded['globex_item']}", "un:a:424242", "un:x:1",
                 f"un:a:{seeded['parcel']}:7", "un:a:", "un:a:١", f"fb:u:{seeded['secret']}",
                 f"fb:d:{seeded['secret']}", "fb:u:abc", f"src:{seeded['secret']}", "src:-1"):
        reply = tap_data(expert, data, contains="no longer valid")
        assert reply.text == "⚠️ This button is no longer valid.", (data, reply.text)
    assert db.get_unanswered(seeded["globex_item"]).status == "open"
    assert db.get_message(seeded["secret"])["feedback"] is None
    assert "needs the expert role" in tap_data(tester, f"un:a:{seeded['parcel']}", contains="role").text
    assert not any("Reference" in m.text for m in expert.messages() + tester.messages())


def test_sources_list_the_examples_with_their_edit_buttons(emulator, bot, db, seeded):
    expert = emulator.user(EXPERT, "Eric")
    listing = tap_data(expert, f"src:{seeded['answer']}", contains="drew on")
    assert listing.text == (f"📚 The answer drew on these examples:\n#{seeded['delivery']} — How long does delivery "
                            f"take?\n#{seeded['gone']} — (deleted)")
    assert listing.button_texts == [f"✏️ #{seeded['delivery']}"]
    assert "Send the new answer" in expert.press(listing, "✏️", contains="Send the new answer").text
    expert.ask("Two to three working days.", contains="updated")
    assert db.get_example(seeded["delivery"]).answer == "Two to three working days."

    assert "Thanks" in tap_data(expert, f"fb:u:{seeded['answer']}", contains="Thanks").text
    assert db.get_message(seeded["answer"])["feedback"] == "up"
    tester = emulator.user(TESTER, "Tess")
    assert "needs the expert role" in tap_data(tester, f"src:{seeded['answer']}", contains="role").text


def test_chat_names_sources_to_experts_and_passes_unsure_questions_on(emulator, bot, db, seeded):
    expert, tester = emulator.user(EXPERT, "Eric"), emulator.user(TESTER, "Tess")
    ru = emulator.user(RU_EXPERT, "Ivan", language="ru")
    assert "Every message is a question" in expert.ask("/chat").text
    mark = expert.send("How long does delivery take?")
    answer = expert.wait(mark, timeout=120, until=lambda ms: ms and ms[-1].buttons)[-1]
    assert answer.button_texts == ["👍", "👎", "✏️", "📚"]
    listing = expert.press(answer, "📚", contains="drew on")
    assert f"#{seeded['delivery']} — How long does delivery take?" in listing.text
    assert "Left the chat" in expert.ask("/stop").text

    unsure = {tester: ("Zqxj vprk wmbt?", "I'm not sure about this one, so I've passed your question to our "
                                          "experts — they'll add the answer."),
              ru: ("Фывапр олджэ?", "Я не уверен в ответе, поэтому передал ваш вопрос нашим экспертам — "
                                    "они добавят ответ.")}
    start = emulator.last_message_id()
    for user, (question, text) in unsure.items():
        user.ask("/chat")
        mark = user.send(question)
        # (an expert may get the batched "new unanswered question" notification right after it)
        said = next(m for m in user.wait(mark, timeout=120, until=lambda ms, t=text: any(m.text == t for m in ms))
                    if m.text == text)
        assert not {"👍", "👎", "✏️"} & set(said.button_texts)
        if user is tester:
            assert said.buttons == []
        user.ask("/stop")
    items = {u.question: u for u in db.list_unanswered(seeded["acme"])}
    assert {"Zqxj vprk wmbt?", "Фывапр олджэ?"} <= set(items)
    message = db.get_message(items["Zqxj vprk wmbt?"].message_id)
    assert message["abstained"] == 1 and items["Zqxj vprk wmbt?"].user_id == TESTER

    def told(ms) -> str:  # one notice for both, or one each: that depends on when the job ran
        return "".join(m.text for m in ms if m.text.startswith("❓ ") and "/review" in m.text)

    told_text = told(expert.wait(start, timeout=60, until=lambda ms: "Фывапр" in told(ms) and "Zqxj" in told(ms)))
    assert told_text.count("• Zqxj vprk wmbt?") == 1 and told_text.count("• Фывапр олджэ?") == 1
