"""The customer channels through `tunebot run` polling the Bot API emulator, with a model server on loopback:
a Russian customer asks through the link and gets the expert's answer back from /review (another customer gets
nothing); a business account connects the bot, which answers what it is sure of, stays silent otherwise, learns
from the person's own reply, and respects the connection's rights and its end."""

from __future__ import annotations

import time

import pytest
from customer_helpers import business_connection, business_message

from bot_process import BotProcess
from storage import Store, open_db

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OWNER, EXPERT, OLGA, PETR, SHOP_OWNER, BUYER, BUYER2 = 9001, 9002, 9101, 9102, 9201, 9301, 9302
KNOWN_RU = "Сколько идёт доставка?"
UNKNOWN_RU = "Можно ли оплатить золотом?"
ABSTAIN_RU = "Я передал ваш вопрос команде: их ответ придёт в этот чат."


def tg_user(user_id: int, name: str, language: str = "ru") -> dict:
    return {"id": user_id, "is_bot": False, "first_name": name, "language_code": language}


def seed(store: Store) -> dict:
    """A Russian clinic published by link, and a shop published for its business account."""
    clinic = store.create_assistant("clinic", owner_id=OWNER)
    store.add_member(clinic.id, EXPERT, "expert")
    store.add_example(clinic.id, KNOWN_RU, "Два дня по Москве.", status="approved")
    shop = store.create_assistant("shop", owner_id=SHOP_OWNER)
    store.add_example(shop.id, "Do you ship to Canada?", "Yes, in about a week.", status="approved")
    store.publish(shop.id)
    store.set_channel(shop.id, "business", True)
    return {"clinic": clinic.id, "shop": shop.id, "token": store.publish(clinic.id).token}


@pytest.fixture(scope="module")
def world(emulator, tmp_path_factory, nearest_llm):
    """`tunebot run` on a seeded database; yields (the seeded ids, a store on the same database)."""
    data_dir = tmp_path_factory.mktemp("channels")
    store = Store(open_db(data_dir / "tunebot.db"))
    seeded = seed(store)
    proc = BotProcess(emulator, data_dir, TUNEBOT_INFERENCE_BACKEND="openai",
                      TUNEBOT_INFERENCE_BASE_URL=nearest_llm.base_url, TUNEBOT_BASE_MODEL="fake-model",
                      TUNEBOT_EMBEDDING_MODEL="", TUNEBOT_UNANSWERED_NOTIFY_MINUTES="0").start()
    yield seeded, store, proc
    proc.stop()
    print(proc.log()[-3000:])


def wait_for(condition, *, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return found


def test_a_russian_customer_gets_the_answer_and_later_the_experts(emulator, world):
    seeded, db, _ = world
    olga, petr = emulator.user(OLGA, "Ольга", language="ru"), emulator.user(PETR, "Пётр", language="ru")
    expert = emulator.user(EXPERT, "Eric")
    assert "Я ассистент clinic" in olga.ask(f"/start {seeded['token']}").text
    assert "Я ассистент clinic" in petr.ask(f"/start {seeded['token']}").text
    mark = olga.send(KNOWN_RU)
    answer = olga.wait(mark, until=lambda ms: ms[-1].buttons)[-1]
    assert answer.text == "Два дня по Москве." and answer.button_texts == ["👍", "👎"]
    assert olga.ask(UNKNOWN_RU, contains="передал").text == ABSTAIN_RU

    [item] = wait_for(lambda: [u for u in db.list_unanswered(seeded["clinic"]) if u.question == UNKNOWN_RU])
    card = expert.ask("/review", contains=UNKNOWN_RU)
    expert.press(card, "Answer", contains="Send")
    olga_mark, petr_mark = emulator.last_message_id(), emulator.last_message_id()
    expert.ask("Нет, только картой или наличными.", contains="Saved as example")
    back = olga.wait(olga_mark, until=lambda ms: any("Ответ команды" in m.text for m in ms))
    assert [m.text for m in back if "Ответ команды" in m.text] == [
        f"💬 Ответ команды на ваш вопрос «{UNKNOWN_RU}»:\n\nНет, только картой или наличными."]
    assert petr.is_silent_after(petr_mark, wait_s=1)
    assert db.get_unanswered(item.id).delivered_at is not None


def test_a_business_account_connects_and_the_bot_answers_when_sure(emulator, world):
    seeded, db, _ = world
    owner = tg_user(SHOP_OWNER, "Sam", "en")
    shop_owner = emulator.user(SHOP_OWNER, "Sam")
    business_connection(emulator, "bc-shop", owner)
    assert "Connected to your business account for shop" in shop_owner.wait(0)[-1].text
    buyer = emulator.user(BUYER, "Bea")
    mark = business_message(emulator, "bc-shop", tg_user(BUYER, "Bea", "en"), tg_user(BUYER, "Bea", "en"),
                            "Do you ship to Canada?")
    [answer] = buyer.wait(mark)
    assert answer.text == "Yes, in about a week." and answer.raw["message"]["business_connection_id"] == "bc-shop"

    mark = business_message(emulator, "bc-shop", tg_user(BUYER, "Bea", "en"), tg_user(BUYER, "Bea", "en"),
                            "Zqxj vprk wmbt?")
    wait_for(lambda: [u for u in db.list_unanswered(seeded["shop"]) if u.question == "Zqxj vprk wmbt?"])
    assert [m for m in buyer.messages() if m.message_id > mark] == []  # silent: the person answers

    business_message(emulator, "bc-shop", tg_user(BUYER, "Bea", "en"), owner, "That's our loyalty code, thanks!")
    example = wait_for(lambda: [e for e in db.list_examples(seeded["shop"], status="pending")])[0]
    assert (example.question, example.answer, example.author_id) == (
        "Zqxj vprk wmbt?", "That's our loyalty code, thanks!", SHOP_OWNER)
    assert [m for m in buyer.messages() if m.message_id > mark] == []  # the bot never answers the owner


def test_the_connections_rights_and_disconnects_are_respected(emulator, world):
    _, _, bot = world
    owner = tg_user(SHOP_OWNER, "Sam", "en")
    shop_owner = emulator.user(SHOP_OWNER, "Sam")
    mark = emulator.last_message_id()
    business_connection(emulator, "bc-shop", owner, can_reply=False)
    assert "without the right to reply" in shop_owner.wait(mark)[-1].text
    buyer2 = emulator.user(BUYER2, "Bo")
    mark = business_message(emulator, "bc-shop", tg_user(BUYER2, "Bo", "en"), tg_user(BUYER2, "Bo", "en"),
                            "Do you ship to Canada?")
    assert buyer2.is_silent_after(mark, wait_s=2)
    mark = emulator.last_message_id()
    business_connection(emulator, "bc-shop", owner, enabled=False)
    assert "Disconnected" in shop_owner.wait(mark)[-1].text
    mark = business_message(emulator, "bc-shop", tg_user(BUYER2, "Bo", "en"), tg_user(BUYER2, "Bo", "en"),
                            "Do you ship to Canada?")
    assert buyer2.is_silent_after(mark, wait_s=2)
    assert "Traceback" not in bot.log()
