"""A Russian-speaking owner's conversation, through the real Application and the Bot API emulator: every message
the bot sends is read back and may hold no Latin-script word except names, commands, file names, numbers with
units and the user's own data (issue 14, item 4). Local mutations say nothing about a cost (item 5)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from inprocess import InProcessBot
from texts_check import latin_noise

from bot.telegram.progress import render_progress
from bot.telegram.texts import t
from storage.records import Job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OWNER = 7101
NAME = "severo"
PAIRS = [("Сколько стоит доставка паллеты в Казань?", "Паллета в Казань стоит 4 500 рублей."),
         ("Когда открыт склад в Подольске?", "Склад в Подольске открыт с 8 до 20 по будням."),
         ("Кто платит за возврат груза?", "За возврат платит отправитель.")]
UPLOAD = "\n".join([
    json.dumps({"question": "Можно ли оплатить картой?", "answer": "Да, картой курьеру."}, ensure_ascii=False),
    '{"question": "Сломанная строка", "answer": }',                              # 2 JSON syntax error
    json.dumps({"question": "Сколько весит коробка?", "answer": 12}, ensure_ascii=False),  # 3 wrong type
    "[1, 2]",                                                                    # 4 an array, not an object
    json.dumps({"question": "Где забрать груз?", "answer": "На складе в Подольске."}, ensure_ascii=False),
]).encode()


@pytest.fixture(scope="module")
def bot(emulator, tmp_path_factory):
    b = InProcessBot(emulator, tmp_path_factory.mktemp("ru-texts"))
    yield b
    b.close()


def send_document(bot: InProcessBot, user_id: int, filename: str, data: bytes) -> None:
    """A file from the user: the emulator stores it (so the bot can download it), the update goes in directly."""
    base = {"botToken": bot.emu.token, "date": int(time.time()),
            "from": bot._user(user_id, "ru"), "chat": bot._chat(user_id, None)}
    info = bot.emu.post("/userDocument", {"token": bot.emu.token, "filename": filename, "mime": "application/jsonl",
                                          "message": base, "content_base64": base64.b64encode(data).decode()})
    message = {"message_id": 20_000 + user_id, "date": int(time.time()), "chat": base["chat"], "from": base["from"],
               "document": {"file_id": info["file_id"], "file_unique_id": info.get("file_unique_id", info["file_id"]),
                            "file_name": filename, "file_size": len(data)}}
    bot.process({"update_id": 90_000, "message": message})


def settle(bot: InProcessBot, timeout: float = 60) -> None:
    """Let the application's background tasks (a generation run) finish on the bot's event loop."""

    async def wait() -> None:
        tasks = {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    bot._runner.run(wait())


def test_a_russian_conversation_has_no_english_words(bot):
    store = bot.store
    assistant = store.create_assistant(NAME, owner_id=OWNER)
    bot.user_data(OWNER)["assistant_id"] = assistant.id
    ru = {"language": "ru"}
    start = bot.emu.last_message_id()
    bot.send(OWNER, "/start", **ru)
    bot.send(OWNER, "/help", **ru)

    for question, answer in PAIRS:
        bot.send(OWNER, f"В: {question}\nО: {answer}", **ru)
    send_document(bot, OWNER, "faq.jsonl", UPLOAD)
    upload = bot.replies(OWNER, start)[-1].text
    assert "строка 2: некорректный JSON: здесь ожидалось значение" in upload and "позиция 44" in upload, upload
    assert 'строка 3: поле "answer" должно быть строкой, а не число' in upload, upload
    assert "строка 4: ожидался JSON-объект" in upload and "а не массив" in upload, upload

    stats = bot.ask(OWNER, "/stats", **ru)[-1].text
    assert "Примеры по статусу: одобрен: 5" in stats and "эксперт: 3" in stats and "импорт: 2" in stats, stats
    pager = bot.ask(OWNER, "/examples", **ru)[-1].text
    assert "[одобрен, эксперт]" in pager and "В: Кто платит за возврат груза?" in pager, pager

    menu = bot.ask(OWNER, "/generate", **ru)[-1]
    mark = bot.tap(OWNER, "gen:m:3", **ru)
    settle(bot)
    done = bot.replies(OWNER, mark)[-1].text
    run = store.list_generation_runs(assistant.id)[-1]
    assert run.status == "succeeded" and run.kept > 0, run
    assert done == t("ru", "generate_done_free", kept=run.kept, requested=run.requested), done
    assert "токен" not in done and "$" not in done and menu.buttons

    card = bot.press(OWNER, f"rvgo:{run.id}", **ru)[-1].text
    assert "Метод: мутация: " in card and "mutation" not in card, card
    for _ in range(3):  # a few cards, each with its own kind of mutation
        first = store.list_examples(assistant.id, status="pending", generation_run_id=run.id)[0]
        bot.press(OWNER, f"rv:a:{first.id}", **ru)
    bot.press(OWNER, f"rv:all:{run.id}", **ru)

    bot.ask(OWNER, "/train", **ru)
    queued = bot.press(OWNER, "tr:now", **ru)[-1].text
    busy = bot.press(OWNER, "tr:now", **ru)[-1].text  # a second run while the first waits: said in Russian
    assert "уже обучается" in busy and "/jobs" in busy and "tunebot" not in busy, busy
    assert [getattr(e, "code", None) for e in bot.errors] == ["training_busy"]  # worded by the global handler
    bot.errors.clear()
    jobs = bot.ask(OWNER, "/jobs", **ru)[-1].text
    assert "обучение: в очереди" in jobs, jobs
    assert bot.errors == [], bot.errors

    sent = [m.text for m in bot.emu.bot_messages(OWNER) if m.message_id > start]
    assert queued in sent and len(sent) >= 12
    job = store.list_jobs(assistant_id=assistant.id)[0]
    progress = {"step": 40, "total_steps": 132, "epoch": 1, "loss": 1.25, "val_loss": 1.5, "eta_s": 235}
    for state in ("scheduled", "queued", "running", "succeeded", "cancelled"):
        sent.append(render_progress(Job(id=job.id, kind="train", assistant_id=assistant.id, status=state,
                                        progress=progress, scheduled_at="2026-01-01 02:00"), "ru"))
    assert "Осталось около 3 мин 55 с" in sent[-3], sent[-3]

    user_data = [NAME, store.get_assistant(assistant.id).base_model or bot.app.settings.base_model]
    for ex in store.list_examples(assistant.id):  # with the variations the mutations wrote (translit, layout)
        user_data += [ex.question, ex.answer, " ".join(ex.question.split()), " ".join(ex.answer.split())]
    noisy = {text: noise for text in sent if (noise := latin_noise(text, user_data))}
    assert noisy == {}, json.dumps(noisy, ensure_ascii=False, indent=1)


def test_the_check_finds_what_issue_14_saw():
    seen = "[одобрен, expert] Метод: mutation:layout. Осталось около 3m 55s; Expecting value, позиция 66"
    assert latin_noise(seen, []) == ["expert", "mutation", "layout", "m", "s", "Expecting", "value"]
    assert latin_noise("Файл faq.jsonl: /train, 12 MB, JSON; поле \"question\" от severo", ["severo"]) == []
