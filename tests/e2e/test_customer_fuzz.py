"""Property-based tests of the customer side, through the real Application (in-process) and the Bot API emulator:
crafted callback data, any text or command, huge messages and updates from chats the bot does not know never
raise, never change another assistant's rows and never show another customer's words."""

from __future__ import annotations

import itertools
import time

import pytest
from customer_helpers import customer_bot
from hypothesis import HealthCheck, given, settings, strategies as st
from test_bot_callback_fuzz import PREFIXES, snapshot

from storage import StorageError
from tuning.errors import TuningError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ATTACKER, VICTIM, GLOBEX_OWNER = 7501, 7502, 7509
SECRET = "GLOBEX-CUSTOMER-SECRET"
_ids = itertools.count(70_000)


@pytest.fixture(scope="module")
def world(emulator, tmp_path_factory, nearest_llm):
    """Acme, whose customer the attacker is, and Globex, whose customer (the victim) has asked and been answered."""
    bot = customer_bot(emulator, tmp_path_factory.mktemp("customer-fuzz"), nearest_llm, customer_per_minute=10_000,
                       customer_per_day=100_000)
    s = bot.store
    acme = s.create_assistant("acme", owner_id=7001)
    globex = s.create_assistant("globex", owner_id=GLOBEX_OWNER)
    s.add_example(acme.id, "How long does delivery take?", "Two days.", status="approved")
    s.add_example(globex.id, f"{SECRET} question?", f"{SECRET} answer.", status="approved")
    acme_token, globex_token = s.publish(acme.id).token, s.publish(globex.id).token
    s.set_channel(globex.id, "groups", True)
    s.link_group(-100_7509, globex.id, by=GLOBEX_OWNER)
    victim = s.open_customer(globex.id, VICTIM, VICTIM)
    s.add_message(victim.conversation_id, "user", f"{SECRET} asked by the victim?")
    answer = s.add_message(victim.conversation_id, "assistant", f"{SECRET} told to the victim.")
    item = s.add_unanswered(globex.id, f"{SECRET} unanswered?", conversation_id=victim.conversation_id,
                            message_id=answer)
    s.answer_unanswered(item.id, f"{SECRET} team answer.", by=GLOBEX_OWNER)
    s.claim_delivery(item.id)
    bot.ask(ATTACKER, f"/start {acme_token}")
    ids = [answer, item.id, victim.id, victim.conversation_id, globex.id, acme.id, 10 ** 9]
    yield {"bot": bot, "acme": acme.id, "globex": globex.id, "ids": ids, "tokens": [acme_token, globex_token]}
    bot.close()


def _check(bot, store, globex: int, chat_id: int, act) -> None:
    bot.errors.clear()
    before = snapshot(store, globex)
    mark = bot.emu.last_message_id()
    act()
    unexpected = [e for e in bot.errors if not isinstance(e, (StorageError, TuningError))]
    assert not unexpected, unexpected
    assert snapshot(store, globex) == before
    replies = bot.replies(chat_id, mark)
    leaked = [m.text for m in replies if SECRET in m.text or SECRET in str(m.buttons)]
    assert not leaked, leaked


@pytest.mark.parametrize("prefix", sorted(set(PREFIXES) | {"cf:", "pub:"}))
def test_a_customers_crafted_buttons_are_refused(world, prefix):
    bot, store = world["bot"], world["bot"].store
    part = st.one_of(st.sampled_from(["u", "d", "x", "publish", "revoke", "groups", "", "-1", "1" * 40, "٣"]),
                     st.sampled_from(world["ids"]).map(str), st.text(max_size=8))

    @settings(max_examples=10, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(suffix=st.lists(part, max_size=3).map(":".join))
    def check(suffix):
        _check(bot, store, world["globex"], ATTACKER, lambda: bot.press(ATTACKER, prefix + suffix))
        assert store.link_customer(ATTACKER).assistant_id == world["acme"]  # still acme's customer, nothing more

    check()


def test_any_text_or_command_from_a_customer(world):
    bot, store = world["bot"], world["bot"].store
    commands = st.sampled_from(["/review", "/start", "/start c_", "/forget@TunebotTestBot", "/use globex", "/x",
                                "/publish", "/stats", "/chat", "/start " + world["tokens"][1][:-1]])
    texts = st.one_of(st.text(min_size=1, max_size=200), commands,
                      st.builds(lambda c, t: f"{c} {t}", commands, st.text(max_size=30)),
                      st.sampled_from(["x" * 4001, "я" * 5000, " ", "\u200b", SECRET[:6] + "?"]))

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(text=texts)
    def check(text):
        _check(bot, store, world["globex"], ATTACKER, lambda: bot.send(ATTACKER, text))

    check()


def test_updates_from_chats_the_bot_does_not_know(world):
    bot, store = world["bot"], world["bot"].store
    # (Globex's own group is not here: whoever mentions the bot there is Globex's customer, rightly.)
    chats = st.sampled_from([("group", -42), ("supergroup", -100_42), ("channel", -100_1), ("private", 7777),
                             ("supergroup", VICTIM), ("group", ATTACKER)])

    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(chat=chats, text=st.one_of(st.text(min_size=1, max_size=100), st.just("@TunebotTestBot " + "y" * 4100)),
           user=st.sampled_from([ATTACKER, 7777, 7778]), reply=st.booleans())
    def check(chat, text, user, reply):
        kind, chat_id = chat
        n = next(_ids)
        message = {"message_id": n, "date": int(time.time()), "text": text,
                   "chat": {"id": chat_id, "type": kind, "title": "t"} if kind != "private" else
                   {"id": chat_id, "type": "private", "first_name": "x"},
                   "from": {"id": user, "is_bot": False, "first_name": "x"}}
        if reply:
            message["reply_to_message"] = {"message_id": 1, "date": int(time.time()), "chat": message["chat"],
                                           "from": {"id": 666, "is_bot": True, "first_name": "Bot"}, "text": "…"}
        _check(bot, store, world["globex"], chat_id, lambda: bot.process({"update_id": n, "message": message}))

    check()
