"""The first answer after a start does not wait for the model: it is loaded in the background at start (and after
/create); a question that comes earlier is told "loading the model…" first. And /train's estimate uses the speed
that earlier runs of the model measured here."""

from __future__ import annotations

import threading
import time

import pytest
from bot_process import BotProcess
from inprocess import InProcessBot

from tuning.answering.engine import Engine
from tuning.jobs.versions import register_candidate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OWNER = 9101
LOADING = {"en": "Loading the model…", "ru": "Загружаю модель…"}


class HeldEngine(Engine):
    """An Engine whose load waits until the test lets it go: a question meets the model still loading."""

    def __init__(self, base_model: str, *, gate: threading.Event, **kw):
        super().__init__(base_model, **kw)
        self.gate = gate

    def load(self) -> None:
        self.gate.wait(120)
        super().load()


def _release_when_seen(bot: InProcessBot, chat_id: int, text: str, gate: threading.Event, seen: list) -> threading.Thread:
    """Let the load go once the bot has shown `text` in the chat (a draft or a message) (or after a minute, to fail rather than hang)."""
    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not gate.is_set():
            shown = [d["text"] for d in bot.emu.drafts(chat_id)] + [m.text for m in bot.emu.bot_messages(chat_id)]
            found = [t for t in shown if text in t]  # a draft in a private chat, else a message
            if found:
                seen.extend(found)
                break
            time.sleep(0.05)
        gate.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("language", ["en", "ru"])
def test_a_question_while_the_model_loads_is_told_so_then_answered(emulator, tmp_path, tiny_model_dir, language):
    gate, seen = threading.Event(), []
    bot = InProcessBot(emulator, tmp_path, base_model=tiny_model_dir, max_new_tokens=4, preload_models=True,
                       engine_factory=lambda model: HeldEngine(model, gate=gate, max_new_tokens=4))
    user = OWNER + (language == "ru")
    try:
        bot.store.create_assistant("acme", owner_id=user)
        bot.ask(user, "/chat", language=language)
        preloading = bot.app.preload()  # what `tunebot run` does at start
        assert preloading is not None and not bot.app.engine_ready()
        watcher = _release_when_seen(bot, user, LOADING[language], gate, seen)
        replies = bot.ask(user, "What are your opening hours?", language=language)
        watcher.join(5)
        assert seen and seen[0].startswith("⏳ " + LOADING[language])  # said first, while the model loaded
        answer = replies[-1]
        assert LOADING[language] not in answer.text  # then the answer, as a message of its own
        assert [b for b in answer.button_texts if b == "👍"]
        preloading.join(60)
        assert bot.app.engine_ready() and not bot.errors
    finally:
        gate.set()
        bot.close()


def test_create_loads_the_new_assistants_model(emulator, tmp_path, tiny_model_dir):
    bot = InProcessBot(emulator, tmp_path, base_model=tiny_model_dir, max_new_tokens=4, preload_models=True)
    try:
        for text in ("/create", "initech", "Parcel help", "Answer briefly."):
            bot.ask(OWNER, text)
        assert not bot.app.engine_ready()
        assert "created" in bot.press(OWNER, "cr:0")[0].text  # then the first-run checklist
        deadline = time.monotonic() + 120  # no question asked: the background load finishes by itself
        while not bot.app.engine_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bot.app.engine_ready() and not bot.errors
    finally:
        bot.close()


def test_train_estimate_uses_the_measured_speed_of_earlier_runs(emulator, tmp_path, tiny_model_dir):
    bot = InProcessBot(emulator, tmp_path, base_model=tiny_model_dir)
    try:
        acme = bot.store.create_assistant("acme", owner_id=OWNER)
        for i in range(3):
            bot.store.add_example(acme.id, f"Question number {i}?", f"Answer number {i}.", status="approved")
        assert "≈" in bot.ask(OWNER, "/train")[-1].text.splitlines()[-1]
        assert "first run of this model here: a rough estimate" in bot.ask(OWNER, "/train")[-1].text
        job = bot.store.create_job("train", assistant_id=acme.id)
        register_candidate(bot.store, acme.id, job_id=job.id, adapter_path="/nowhere", base_model=tiny_model_dir,
                           dataset_hash="h", hyperparameters={}, metrics={"tokens_per_s": 2448.5})
        estimate = bot.ask(OWNER, "/train", language="ru")[-1].text.splitlines()[-1]
        assert estimate.startswith("Оценка времени: ~") and "2448 токенов/с" in estimate and "≈" not in estimate
    finally:
        bot.close()


def test_tunebot_run_loads_the_model_at_start_and_keeps_its_log_quiet(emulator, tmp_path, tiny_model_dir):
    proc = BotProcess(emulator, tmp_path, TUNEBOT_BASE_MODEL=tiny_model_dir, TUNEBOT_PRELOAD_MODELS="1",
                      TUNEBOT_TORCH_THREADS="1").start()
    try:
        deadline = time.monotonic() + 120
        while "(preloaded)" not in proc.log() and time.monotonic() < deadline:
            assert proc.proc.poll() is None, proc.log()
            time.sleep(0.2)
        assert "(preloaded)" in proc.log(), proc.log()  # with no question asked
        time.sleep(2.5)  # two runs of the once-a-second progress poll
        assert "apscheduler" not in proc.log(), proc.log()
    finally:
        proc.stop()
