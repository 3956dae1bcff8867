"""Buttons and commands that take untrusted input, through the real Application and the Bot API emulator:
crafted callback data, member management, invites, API keys and private-only commands, repeated taps."""

from __future__ import annotations

import time

import pytest
from inprocess import InProcessBot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OWNER, EXPERT, TESTER, TESTER2, RU_OWNER, GLOBEX_OWNER, NEWCOMER = 6001, 6002, 6003, 6004, 6005, 6009, 6010
GROUP = -6100
INVALID = {"en": "This button is no longer valid", "ru": "Эта кнопка больше не действует"}


@pytest.fixture(scope="module")
def bot(emulator, tmp_path_factory):
    b = InProcessBot(emulator, tmp_path_factory.mktemp("buttons"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def seeded(bot) -> dict:
    s = bot.store
    acme = s.create_assistant("acme", owner_id=OWNER)
    ru = s.create_assistant("acme-ru", owner_id=RU_OWNER)
    globex = s.create_assistant("globex", owner_id=GLOBEX_OWNER)
    s.add_member(acme.id, EXPERT, "expert")
    s.add_member(acme.id, TESTER, "tester")
    s.add_member(acme.id, TESTER2, "tester")
    s.add_example(acme.id, "How long does delivery take?", "Two days.")
    s.add_example(acme.id, "Do you ship abroad?", "Yes, to 40 countries.")
    pending = s.add_example(acme.id, "How long is delivery?", "Two days.", source="synthetic", status="pending")
    s.add_example(ru.id, "Сколько идёт доставка?", "Два дня.")
    conv = s.start_conversation(acme.id, TESTER)
    s.add_message(conv, "user", "Where is my parcel?")
    tester_answer = s.add_message(conv, "assistant", "On its way.")
    g_conv = s.start_conversation(globex.id, GLOBEX_OWNER)
    s.add_message(g_conv, "user", "Globex secret question?")
    g_answer = s.add_message(g_conv, "assistant", "Globex secret answer.")
    _, g_key = s.create_api_key(globex.id, name="globex-key")
    for uid, aid in ((OWNER, acme.id), (EXPERT, acme.id), (TESTER, acme.id), (TESTER2, acme.id),
                     (RU_OWNER, ru.id), (GLOBEX_OWNER, globex.id)):
        bot.user_data(uid)["assistant_id"] = aid
    bot.user_data(RU_OWNER)["lang"] = "ru"
    return {"acme": acme.id, "ru": ru.id, "globex": globex.id, "pending": pending.id, "tester_answer": tester_answer,
            "globex_answer": g_answer, "globex_key": s.lookup_api_key(g_key).id}


def texts(messages) -> str:
    return "\n".join(m.text for m in messages)


@pytest.mark.parametrize("data", [
    "ex:e", "ex:p:abc", "ex:z:1:0", "rv:a:abc", "rv:z:{pending}", "rv:all:x", "rvgo:abc", "gen:m:999999999",
    "gen:m:4", "gen:x:3", "gen:d:abc", "gen:m", "tr:xyz", "tr", "jb:c", "jb:x:1", "tv:z:1", "tv:a", "xp:csv", "xp",
    "use:abc", "use:99999999999999999999999", "lang:de", "mb:t:1", "mb:{acme}:q:{owner}", "add:zzz", "zz:1",
    "on:zzz", "fb:x:1", "src:abc", "un:q:1", "ak:x", "",
])
def test_malformed_buttons_say_no_longer_valid_and_do_nothing(bot, seeded, data):
    data = data.format(pending=seeded["pending"], acme=seeded["acme"], owner=OWNER)
    jobs, runs = len(bot.store.list_jobs()), len(bot.store.list_generation_runs(seeded["acme"]))
    started = time.monotonic()
    replies = bot.press(OWNER, data)
    assert time.monotonic() - started < 10
    assert INVALID["en"] in texts(replies), (data, texts(replies))
    assert bot.errors == [], bot.errors
    assert len(bot.store.list_jobs()) == jobs and len(bot.store.list_generation_runs(seeded["acme"])) == runs
    assert bot.store.get_example(seeded["pending"]).status == "pending"
    assert bot.store.role_of(seeded["acme"], OWNER) == "owner"


def test_the_reply_is_in_the_users_language(bot, seeded):
    for data in ("ex:e", "rv:a:abc", "nope:1", "gen:m:999999999"):
        assert INVALID["ru"] in texts(bot.press(RU_OWNER, data)), data
    assert bot.errors == []


def test_buttons_never_reach_another_assistants_objects(bot, seeded):
    s = bot.store
    globex = seeded["globex"]
    g_ex = s.add_example(globex, "Globex secret pricing?", "Globex secret price.")
    g_pending = s.add_example(globex, "Globex secret refunds?", "x", source="synthetic", status="pending")
    g_run = s.create_generation_run(globex, method="mutation", model="rules")
    g_doc = s.add_document(globex, "globex-secret.txt", "Globex secret document.")
    g_job = s.create_job("train", assistant_id=globex, params={})
    g_version = s.add_model_version(globex, adapter_path="/nowhere", base_model="m")
    g_item = s.add_unanswered(globex, "Globex secret unanswered?")
    before = s.db.execute("select count(*) from examples where assistant_id = ?", [globex]).fetchone()[0]
    crafted = [f"ex:e:{g_ex.id}:0", f"ex:d:{g_ex.id}:0", f"rv:a:{g_pending.id}", f"rv:r:{g_pending.id}",
               f"rv:e:{g_pending.id}", f"rv:all:{g_run.id}", f"rvgo:{g_run.id}", f"gen:d:{g_doc.id}",
               f"jb:c:{g_job.id}", f"tv:a:{g_version.id}", f"tv:d:{g_version.id}", f"tv:t:{g_version.id}",
               f"fb:u:{seeded['globex_answer']}", f"fb:d:{seeded['globex_answer']}", f"src:{seeded['globex_answer']}",
               f"un:d:{g_item.id}", f"un:a:{g_item.id}", f"mb:{globex}:o:{OWNER}", f"mb:{globex}:x:{GLOBEX_OWNER}",
               f"ak:{globex}:{seeded['globex_key']}", f"use:{globex}"]
    for data in crafted:
        replies = bot.press(OWNER, data)
        assert "secret" not in texts(replies).lower(), (data, texts(replies))
        assert replies, data
    assert bot.errors == []
    assert s.get_example(g_ex.id).status == "approved" and s.get_example(g_pending.id).status == "pending"
    assert s.db.execute("select count(*) from examples where assistant_id = ?", [globex]).fetchone()[0] == before
    assert s.get_job(g_job.id).status == "queued" and s.get_model_version(g_version.id).status == "candidate"
    assert s.get_message(seeded["globex_answer"])["feedback"] is None
    assert s.get_unanswered(g_item.id).status == "open"
    assert s.role_of(globex, OWNER) is None and s.role_of(globex, GLOBEX_OWNER) == "owner"
    assert [k.revoked_at for k in s.list_api_keys(globex)] == [None]
    assert bot.user_data(OWNER)["assistant_id"] == seeded["acme"] and "chat" not in bot.user_data(OWNER)


def test_testers_rate_only_their_own_answers(bot, seeded):
    answer = seeded["tester_answer"]
    assert INVALID["en"] in texts(bot.press(TESTER2, f"fb:u:{answer}"))
    assert INVALID["en"] in texts(bot.press(TESTER2, f"fb:d:{answer}"))
    assert bot.store.get_message(answer)["feedback"] is None
    assert "awaiting" not in bot.user_data(TESTER2)
    assert "Thanks" in texts(bot.press(TESTER, f"fb:u:{answer}"))
    assert bot.store.get_message(answer)["feedback"] == "up"
    assert bot.errors == []


def test_member_buttons_name_the_assistant_and_keep_an_owner(bot, seeded):
    acme, s = seeded["acme"], bot.store
    listing = bot.ask(OWNER, "/members")[-1]
    data = [b["callback_data"] for row in listing.buttons for b in row]
    assert f"mb:{acme}:e:{TESTER}" in data and f"mb:{acme}:x:{TESTER}" in data
    assert all(d.startswith(f"mb:{acme}:") for d in data) and not any(d.endswith(f":{OWNER}") for d in data)
    # the sole owner cannot demote or remove themselves: the assistant would have no owner
    for action in ("t", "e", "x"):
        reply = texts(bot.press(OWNER, f"mb:{acme}:{action}:{OWNER}"))
        assert "owner" in reply and "first" in reply, reply
        assert s.role_of(acme, OWNER) == "owner"
    # only current members can be changed
    assert INVALID["en"] in texts(bot.press(OWNER, f"mb:{acme}:o:999"))
    assert s.role_of(acme, 999) is None
    # a button of another assistant (the owner switched with /use meanwhile) does nothing here
    assert INVALID["en"] in texts(bot.press(OWNER, f"mb:{seeded['ru']}:e:{RU_OWNER}"))
    assert s.role_of(seeded["ru"], RU_OWNER) == "owner"
    assert "is now expert" in texts(bot.press(OWNER, f"mb:{acme}:e:{TESTER}"))
    assert s.role_of(acme, TESTER) == "expert"
    assert "is now tester" in texts(bot.press(OWNER, f"mb:{acme}:t:{TESTER}"))
    assert "Последнего владельца" in texts(bot.press(RU_OWNER, f"mb:{seeded['ru']}:t:{RU_OWNER}"))
    assert bot.errors == []


@pytest.mark.parametrize("hours", ["1e9", "nan", "inf", "-3", "0.5", "721"])
def test_invite_hours_outside_one_hour_to_thirty_days_are_explained(bot, seeded, hours):
    before = bot.store.db.execute("select count(*) from invites").fetchone()[0]
    assert "1 to 720 hours" in texts(bot.ask(OWNER, f"/invite expert 1 {hours}"))
    assert "от 1 до 720 часов" in texts(bot.ask(RU_OWNER, f"/invite expert 1 {hours}"))
    assert bot.store.db.execute("select count(*) from invites").fetchone()[0] == before
    assert bot.errors == []


@pytest.mark.parametrize("uses", ["0", "100000", "99999999999999999999999"])
def test_invite_uses_are_bounded(bot, seeded, uses):
    assert "1 to 1000 uses" in texts(bot.ask(OWNER, f"/invite expert {uses}"))
    assert bot.errors == []


def test_invite_limits_that_are_allowed(bot, seeded):
    assert "t.me/TunebotTestBot?start=" in texts(bot.ask(OWNER, "/invite tester 1000 720"))
    assert "t.me/TunebotTestBot?start=" in texts(bot.ask(OWNER, "/invite tester 1 1"))


def test_a_member_redeeming_an_invite_does_not_use_it_up(bot, seeded):
    s = bot.store
    invite = s.create_invite(seeded["acme"], "tester", uses=1, created_by=OWNER)
    assert "already" in texts(bot.ask(EXPERT, f"/start {invite.token}"))
    assert s.role_of(seeded["acme"], EXPERT) == "expert"
    assert s.db["invites"].get(invite.token)["uses_left"] == 1
    assert "You joined acme as tester" in texts(bot.ask(NEWCOMER, f"/start {invite.token}"))
    assert s.db["invites"].get(invite.token)["uses_left"] == 0
    assert "used up" in texts(bot.ask(NEWCOMER + 1, f"/start {invite.token}"))
    assert s.role_of(seeded["acme"], NEWCOMER + 1) is None


@pytest.mark.parametrize("command", ["/apikey", "/apikey widget", "/export", "/apikeys"])
def test_keys_and_exports_only_in_a_private_chat(bot, seeded, command):
    keys = len(bot.store.list_api_keys(seeded["acme"]))
    replies = bot.ask(OWNER, command, chat_id=GROUP)
    assert "private chat" in texts(replies) and "tb-" not in texts(replies)
    assert "личном чате" in texts(bot.ask(RU_OWNER, command, chat_id=GROUP))
    assert len(bot.store.list_api_keys(seeded["acme"])) == keys
    assert bot.errors == []


def test_export_button_only_in_a_private_chat(bot, seeded):
    replies = bot.press(OWNER, "xp:jsonl", chat_id=GROUP)
    assert "private chat" in texts(replies) and not any(m.document for m in replies)


def test_owner_revokes_an_api_key_from_telegram(bot, seeded):
    s, acme = bot.store, seeded["acme"]
    created = texts(bot.ask(OWNER, "/apikey widget"))
    key = next(w for w in created.split() if w.startswith("tb-") and len(w) > 20)
    record = s.lookup_api_key(key)
    assert record is not None
    listing = bot.ask(OWNER, "/apikeys")[-1]
    assert record.prefix in listing.text and "widget" in listing.text
    button = next(b for row in listing.buttons for b in row if b["callback_data"] == f"ak:{acme}:{record.id}")
    assert record.prefix in button["text"]
    assert "needs the owner role" in texts(bot.ask(EXPERT, "/apikeys"))
    assert "needs the owner role" in texts(bot.press(EXPERT, button["callback_data"]))
    assert s.lookup_api_key(key) is not None
    assert "revoked" in texts(bot.press(OWNER, button["callback_data"]))
    assert s.lookup_api_key(key) is None
    assert "already revoked" in texts(bot.press(OWNER, button["callback_data"]))
    after = bot.ask(OWNER, "/apikeys")[-1]
    assert f"ak:{acme}:{record.id}" not in str(after.buttons)
    assert bot.errors == []


def test_tonight_tapped_twice_schedules_one_run(bot, seeded):
    s, acme = bot.store, seeded["acme"]

    def scheduled():
        return [j for j in s.list_jobs(assistant_id=acme, status="scheduled") if j.kind == "train"]

    bot.press(EXPERT, "tr:night")
    [job] = scheduled()
    again = texts(bot.press(OWNER, "tr:night"))
    assert f"#{job.id}" in again and "already scheduled" in again
    assert scheduled() == [job]
    when = (job.scheduled_at or "")[11:16]
    bot.press(EXPERT, "tr:pick")
    assert f"#{job.id}" in texts(bot.ask(EXPERT, when))
    assert scheduled() == [job]
    assert bot.errors == []


def test_a_picked_time_is_read_on_the_servers_clock_as_the_cli_reads_it(emulator, tmp_path):
    """"23:30" in Telegram and `tunebot train --at 23:30` schedule the same moment (the timezone setting)."""
    import datetime as dt

    from bot.cli.jobs import parse_at

    bot = InProcessBot(emulator, tmp_path / "tz", timezone="Europe/Moscow")
    try:
        acme = bot.store.create_assistant("acme", owner_id=OWNER)
        for i in range(2):
            bot.store.add_example(acme.id, f"Question {i}?", f"Answer {i}.", status="approved")
        bot.user_data(OWNER)["assistant_id"] = acme.id
        assert "Europe/Moscow" in texts(bot.press(OWNER, "tr:pick"))
        bot.ask(OWNER, "23:30")
        [job] = bot.store.list_jobs(assistant_id=acme.id, status="scheduled")
        expected = parse_at("23:30", timezone="Europe/Moscow").astimezone(dt.timezone.utc)
        assert job.scheduled_at == expected.strftime("%Y-%m-%d %H:%M:%S")
        assert job.scheduled_at.endswith("20:30:00")  # 23:30 in Moscow is 20:30 UTC
        assert bot.errors == []
    finally:
        bot.close()
