"""Loopback load: 50 simulated experts add examples at once; each is stored exactly once."""

from __future__ import annotations

import statistics
import threading

import pytest

from bot_process import BotProcess
from emulator import Emulator, EmulatorUnavailable
from storage import Store, open_db

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
USERS = 50


def test_fifty_users_add_examples_concurrently(tmp_path):
    try:
        emu = Emulator()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    store = Store(open_db(tmp_path / "tunebot.db"))
    assistant = store.create_assistant("load", owner_id=1)
    for uid in range(2000, 2000 + USERS):
        store.add_member(assistant.id, uid, "expert")
    bot = BotProcess(emu, tmp_path, TUNEBOT_WORKER_SLOTS="1").start()
    try:
        users = [emu.user(uid, f"U{uid}") for uid in range(2000, 2000 + USERS)]
        marks: dict[int, int] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(USERS)

        def act(user):
            try:
                barrier.wait()
                marks[user.id] = user.send(f"Q: Question number {user.id} about parcels?\nA: Answer {user.id}.")
                user.wait(marks[user.id], timeout=120)
            except BaseException as exc:  # reported after join
                errors.append(exc)

        threads = [threading.Thread(target=act, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]

        history = emu.history()
        sent = {int(i["message"]["from"]["id"]): i["time"] for i in history
                if "message" in i and "from" in i["message"] and not i["message"]["from"].get("is_bot")}
        replied = {}
        for i in history:
            msg = i.get("message") or {}
            if "chat_id" in msg and "Saved as example" in (msg.get("text") or ""):
                replied.setdefault(int(msg["chat_id"]), i["time"])
        latencies = sorted(replied[uid] - sent[uid] for uid in sent)
        assert len(latencies) == USERS
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
        print(f"\nbot handler latency over {USERS} concurrent users: p50={p50:.0f} ms p99={p99:.0f} ms "
              f"max={latencies[-1]:.0f} ms (emulator timestamps: user update stored -> reply stored)")

        examples = store.list_examples(assistant.id)
        assert len(examples) == USERS
        assert sorted(e.author_id for e in examples) == list(range(2000, 2000 + USERS))
        assert len({e.question for e in examples}) == USERS
    finally:
        bot.stop()
        emu.close()
