"""A small run of bench/customer_load.py: customers asking at once through the link against `tunebot run` and a
model server on loopback. No reply lost or duplicated, no error, every "passed to the team" queued for the experts
with its customer. (Times are the benchmark's to report, not this test's to judge.)"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
from emulator import Emulator, EmulatorUnavailable

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("customer_load", ROOT / "bench" / "customer_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_customers_asking_at_once_each_get_one_reply(tmp_path):
    try:
        Emulator().close()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    bench = load_bench()
    result = bench.run(customers=6, questions=7, model="fake", timeout_s=120, max_new_tokens=16, workdir=tmp_path)
    assert result["questions"] == 42 and result["replies"] == 42
    assert (result["lost"], result["duplicated"], result["error_replies"], result["tracebacks_in_log"]) == (0, 0, 0, 0)
    assert result["passed_to_team"] >= 6  # each customer asked at least one question that means nothing
    assert result["queued_for_experts"] == result["passed_to_team"]
    assert result["answered"] + result["passed_to_team"] == 42
    assert result["first_reply_ms"]["p50"] is not None and result["final_reply_ms"]["p95"] is not None


def test_the_question_plan_mixes_known_unknown_and_nonsense():
    plan = load_bench().question_plan(3, 10)
    assert len(plan) == 3 and all(len(qs) == len(set(qs)) == 10 for qs in plan.values())
    assert len({tuple(qs) for qs in plan.values()}) == 3


def test_customers_waiting_on_a_slow_model_never_hold_up_the_team(tmp_path):
    """Ten customers' answers wait on a model that answers nothing yet: each already sees "…", and an expert's
    /help is answered meanwhile (PTB handles 8 updates at once: answers made inside the handlers held them all)."""
    import threading

    from bot_process import BotProcess
    from fake_openai import FakeOpenAI, nearest_answer

    from storage import Store, open_db

    try:
        emu = Emulator()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    gate = threading.Event()
    store = Store(open_db(tmp_path / "tunebot.db"))
    acme = store.create_assistant("acme", owner_id=1)
    store.add_member(acme.id, 2, "expert")
    store.add_example(acme.id, "How long does delivery take?", "Two days.", status="approved")
    token = store.publish(acme.id).token

    def held(request):
        gate.wait(120)
        return nearest_answer(request)

    with FakeOpenAI(default=held) as llm:
        bot = BotProcess(emu, tmp_path, TUNEBOT_INFERENCE_BACKEND="openai", TUNEBOT_INFERENCE_BASE_URL=llm.base_url,
                         TUNEBOT_BASE_MODEL="fake-model", TUNEBOT_EMBEDDING_MODEL="").start()
        try:
            customers = [emu.user(700 + i, f"C{i}") for i in range(10)]
            for c in customers:
                c.ask(f"/start {token}")
            marks = [c.send("How long does delivery take?") for c in customers]
            deadline = time.monotonic() + 60
            while len({d["chat_id"] for d in emu.drafts()} & {c.id for c in customers}) < 10:
                assert time.monotonic() < deadline, "not every customer saw '…' while the model was busy"
                time.sleep(0.05)  # every customer sees "…" while the model holds every answer
            assert "/chat" in emu.user(2, "Expert").ask("/help").text  # the team is answered meanwhile
            assert not gate.is_set() and all(c.messages()[-1].text != "Two days." for c in customers)
            gate.set()
            for c, mark in zip(customers, marks):
                assert c.wait(mark, timeout=60)[-1].text == "Two days."
        finally:
            gate.set()
            bot.stop()
            emu.close()
