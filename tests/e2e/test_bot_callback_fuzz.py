"""Property-based tests of callback data: every prefix the handlers register, with random suffixes, through the
real Application (in-process) and the Bot API emulator. Never an unhandled exception, never a read or a write
of another assistant's objects."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from inprocess import InProcessBot
from telegram.ext import CallbackQueryHandler, ConversationHandler

from bot.telegram.handlers import all_handlers
from storage import StorageError
from tuning.errors import TuningError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ATTACKER, GLOBEX_OWNER, GLOBEX_TESTER = 7001, 7009, 7008
SECRET = "GLOBEX-SECRET"


def _callback_handlers(handlers):
    for handler in handlers:
        if isinstance(handler, ConversationHandler):
            yield from _callback_handlers(handler.entry_points)
            for state in handler.states.values():
                yield from _callback_handlers(state)
            yield from _callback_handlers(handler.fallbacks)
        elif isinstance(handler, CallbackQueryHandler) and handler.pattern is not None:
            yield handler


def registered_prefixes() -> list[str]:
    """'fb:', 'mb:', …: the literal start of every callback pattern in bot.telegram.handlers."""
    found = set()
    for handler in _callback_handlers(all_handlers()):
        match = re.match(r"\^([a-z]+:)", handler.pattern.pattern)
        assert match, f"callback pattern without a literal prefix: {handler.pattern.pattern}"
        found.add(match.group(1))
    return sorted(found)


PREFIXES = registered_prefixes()


def test_the_known_prefixes_are_all_found():
    assert {"fb:", "src:", "un:", "ex:", "rv:", "rvgo:", "gen:", "mb:", "tr:", "jb:", "tv:", "xp:", "use:", "lang:",
            "add:", "cr:", "on:", "ak:"} <= set(PREFIXES)


@pytest.fixture(scope="module")
def world(emulator, tmp_path_factory):
    """Acme, where the attacker is owner, and Globex, where they are only a tester, full of objects."""
    bot = InProcessBot(emulator, tmp_path_factory.mktemp("fuzz"))
    s = bot.store
    acme = s.create_assistant("acme", owner_id=ATTACKER)
    globex = s.create_assistant("globex", owner_id=GLOBEX_OWNER)
    s.add_member(globex.id, ATTACKER, "tester")
    s.add_member(globex.id, GLOBEX_TESTER, "tester")
    s.add_example(acme.id, "How long does delivery take?", "Two days.")
    s.add_example(acme.id, "Do you ship abroad?", "Yes.")
    conv = s.start_conversation(acme.id, ATTACKER)
    s.add_message(conv, "user", "Hi?")
    s.add_message(conv, "assistant", "Hello.")
    ids: dict[str, list[int]] = {}
    g = globex.id
    ex = [s.add_example(g, f"{SECRET} question {i}?", f"{SECRET} answer {i}.") for i in range(2)]
    ids["examples"] = [e.id for e in ex] + [
        s.add_example(g, f"{SECRET} pending?", "x", source="synthetic", status="pending").id]
    ids["runs"] = [s.create_generation_run(g, method="mutation", model="rules").id]
    ids["documents"] = [s.add_document(g, f"{SECRET}.txt", f"{SECRET} document.").id]
    ids["jobs"] = [s.create_job("train", assistant_id=g, params={}).id]
    ids["versions"] = [s.add_model_version(g, adapter_path="/nowhere", base_model="m").id]
    ids["unanswered"] = [s.add_unanswered(g, f"{SECRET} unanswered?").id]
    g_conv = s.start_conversation(g, GLOBEX_TESTER)
    s.add_message(g_conv, "user", f"{SECRET} asked?")
    ids["messages"] = [s.add_message(g_conv, "assistant", f"{SECRET} answered.", sources=[ex[0].id])]
    ids["keys"] = [s.lookup_api_key(s.create_api_key(g, name="k")[1]).id]
    ids["users"] = [GLOBEX_OWNER, GLOBEX_TESTER, ATTACKER]
    ids["assistants"] = [g, acme.id]
    yield {"bot": bot, "acme": acme.id, "globex": g, "ids": ids}
    bot.close()


def snapshot(store, assistant_id: int) -> dict:
    """Every row that belongs to the assistant, in every table."""
    db = store.db
    out = {}
    for table in db.table_names():
        if "assistant_id" in db[table].columns_dict:
            out[table] = db.execute(f"select * from [{table}] where assistant_id = ? order by rowid",
                                    [assistant_id]).fetchall()
    out["messages"] = db.execute("select m.* from messages m join conversations c on c.id = m.conversation_id "
                                 "where c.assistant_id = ? order by m.id", [assistant_id]).fetchall()
    out["history"] = db.execute("select h.* from example_history h join examples e on e.id = h.example_id "
                                "where e.assistant_id = ? order by h.rowid", [assistant_id]).fetchall()
    out["assistant"] = db.execute("select * from assistants where id = ?", [assistant_id]).fetchall()
    return out


def suffixes(ids: dict[str, list[int]]):
    foreign = st.sampled_from(sorted({i for v in ids.values() for i in v})).map(str)
    part = st.one_of(
        st.sampled_from(["a", "e", "r", "s", "d", "u", "t", "o", "x", "c", "p", "m", "n", "q", "all", "now", "night",
                         "pick", "save", "cancel", "jsonl", "openai", "en", "ru", "create", "join", "default"]),
        foreign, foreign,
        st.integers(min_value=-3, max_value=12).map(str),
        st.integers(min_value=-(10 ** 30), max_value=10 ** 30).map(str),
        st.sampled_from(["", "1e9", "nan", "inf", "0x10", " 1", "１", "٣", "1" * 5000, "-0"]),
        st.text(max_size=12),
    )
    return st.lists(part, max_size=4).map(":".join)


@pytest.mark.parametrize("prefix", PREFIXES + ["zz:", ""])
def test_random_callback_data_is_refused_or_handled(world, prefix):
    bot, acme, globex = world["bot"], world["acme"], world["globex"]
    store = bot.store

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(suffix=suffixes(world["ids"]))
    def check(suffix):
        bot.user_data(ATTACKER).clear()
        bot.user_data(ATTACKER)["assistant_id"] = acme
        bot.errors.clear()
        before = snapshot(store, globex)
        replies = bot.press(ATTACKER, prefix + suffix)
        unexpected = [e for e in bot.errors if not isinstance(e, (StorageError, TuningError))]
        assert not unexpected, f"{prefix + suffix!r}: {unexpected!r}"
        assert snapshot(store, globex) == before, prefix + suffix
        leaked = [m.text for m in replies if SECRET in m.text or SECRET in str(m.buttons)]
        assert not leaked, (prefix + suffix, leaked)

    check()
