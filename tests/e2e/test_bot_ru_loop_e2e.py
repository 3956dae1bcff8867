"""The whole loop as a Russian-speaking owner, against the real `tunebot run` process and the Bot API emulator:
/create, the quick form (saved as typed, colons and all), an upload with broken lines, free mutations, review,
/train to the end with its before/after table, /chat naming the version that answers, 👎 with a correction,
/stats. Every text the bot sent (messages, their edits as they read now, and streamed drafts) is read back and
may hold no Latin-script word but names, commands, file names, numbers with units and the user's or the model's
own text (issue 14). The English owner's loop is tests/e2e/test_bot_e2e.py."""

from __future__ import annotations

import html
import json
import re

import pytest
from bot_process import BotProcess
from texts_check import latin_noise

from storage import Store, open_db

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

OWNER = 7301
NAME = "severo"
PAIRS = [("Терминал в Домодедово: какой адрес?", "Улица Ленина, 5."),
         ("Сколько стоит доставка паллеты в Казань?", "Паллета в Казань: 4 500 рублей."),
         ("Когда открыт склад в Подольске?", "С 8 до 20 по будням."),
         ("Кто платит за возврат груза?", "За возврат платит отправитель.")]
UPLOAD = "\n".join([
    json.dumps({"question": "Можно ли оплатить картой?", "answer": "Да, картой курьеру."}, ensure_ascii=False),
    '{"question": "Сломанная строка", "answer": }',
    json.dumps({"question": "Где забрать груз?", "answer": "На складе в Подольске."}, ensure_ascii=False),
    json.dumps({"question": "Сколько хранится груз на складе?", "answer": "Бесплатно 3 дня."}, ensure_ascii=False),
]).encode()


@pytest.fixture(scope="module")
def run(emulator, tmp_path_factory, tiny_model_dir, model_cache):
    data_dir = tmp_path_factory.mktemp("ru-loop")
    proc = BotProcess(emulator, data_dir, TUNEBOT_BASE_MODEL=tiny_model_dir, TUNEBOT_MAX_NEW_TOKENS="16",
                      TUNEBOT_WORKER_SLOTS="1", TUNEBOT_MAX_UPLOAD_MB="1", TUNEBOT_TEST_CACHE=str(model_cache),
                      TUNEBOT_DEFAULT_LANGUAGE="en")  # the Russian comes from the user's language_code alone
    proc.start()
    yield proc, Store(open_db(data_dir / "tunebot.db"))
    proc.stop()


def test_the_loop_in_russian(emulator, run):
    bot, db = run
    owner = emulator.user(OWNER, "Ольга", language="ru")
    start = owner.ask("/start")
    assert start.button_texts[0] == "➕ Создать ассистента"
    assert "Как назовём" in owner.press(start, "Создать").text
    assert "Коротко" in owner.ask(NAME).text
    assert "Системная подсказка" in owner.ask("Грузоперевозки по России").text
    model_question = owner.ask("Отвечай кратко и вежливо.")
    assert "базовой модели" in model_question.text
    created = owner.press(model_question, "по умолчанию", contains="создан")
    assert f"Ассистент {NAME} создан" in created.text
    aid = db.assistant_by_name(NAME).id

    # The quick form: split at the markers only, and the reply shows what was saved.
    for question, answer in PAIRS:
        saved = owner.ask(f"В: {question} О: {answer}", contains="Сохранено как пример").text
        assert f"В: {question}\nО: {answer}" in saved, saved
        assert db.find_duplicate(aid, question).answer == answer

    mark = owner.send_document("faq.jsonl", UPLOAD)
    report = owner.wait(mark, until=lambda ms: any("строка 2" in m.text for m in ms))[-1].text
    assert "Пропущена 1 строка с ошибкой" in report and "строка 2: некорректный JSON" in report, report
    assert db.count_examples(aid) == len(PAIRS) + 3  # the good lines are in, the broken one is reported

    menu = owner.ask("/generate")
    done = owner.press(menu, "Опечатки ×3", contains="Готово")
    assert "токен" not in done.text and "$" not in done.text  # free: no word about a cost
    card = owner.press(done, "Проверить", contains="Проверка:")
    owner.press(card, "Одобрить все оставшиеся", contains="Одобрено")
    assert db.list_examples(aid, status="pending") == []

    summary = owner.ask("/train")
    assert "Одобрено:" in summary.text and "Оценка времени" in summary.text, summary.text
    progress = owner.press(summary, "Начать сейчас", contains="Обучение #")
    job_id = int(re.search(r"#(\d+)", progress.text).group(1))
    final = owner.wait(progress.message_id - 1, timeout=600,
                       until=lambda ms: any("до и после" in m.text or "не удалось" in m.text for m in ms))
    assert db.get_job(job_id).status == "succeeded", bot.log()
    report = [m for m in final if "до и после" in m.text][-1].text
    assert "<pre>" in report and "кто отвечает" in report and "ближайший пример" in report, report
    version = db.get_job(job_id).result["version_id"]
    assert re.search(rf"Версия #{version} правильно отвечает на \d+ из \d+ вопросов \(необученная модель – на \d+\)",
                     report), report
    assert "стала активной сама" in report  # the first version answers by itself

    header = owner.ask("/chat").text
    assert f"отвечает версия #{version}" in header, header
    mark = owner.send("Сколько стоит доставка паллеты в Казань?")
    answer = owner.wait(mark, until=lambda ms: ms and ms[-1].buttons)[-1]
    assert "👍" in answer.button_texts or "Я не уверен" in answer.text
    if "👎" in answer.button_texts:
        assert "правильный ответ" in owner.press(answer, "👎", contains="ответ").text
        saved = owner.ask("Паллета в Казань стоит 4 500 рублей.", contains="Сохранено как пример").text
        assert "эксперт его проверит" in saved
    assert "Вы вышли" in owner.ask("/stop").text
    stats = owner.ask("/stats").text
    assert "одобрен:" in stats and "импорт: 3" in stats, stats

    # Every text a person read, and what the user and the model wrote, which may be in any script.
    base_model = db.get_assistant(aid).base_model or ""
    own = [NAME, base_model, base_model.rstrip("/").rsplit("/", 1)[-1], "faq.jsonl"]
    for ex in db.list_examples(aid):
        own += [ex.question, ex.answer, " ".join(ex.question.split()), " ".join(ex.answer.split())]
    for ex in (db.get_job(job_id).result.get("metrics") or {}).get("eval_examples") or []:
        own += [ex.get(k) or "" for k in ("question", "before", "after", "expected")]
    own += [text for (text,) in db.db.execute(  # the model's answers in /chat
        "select m.text from messages m join conversations c on c.id = m.conversation_id where c.assistant_id = ?",
        [aid])]
    own = [s for item in own for s in (item, html.escape(item), item.strip(), html.escape(item).strip()) if s]
    answers = [text for text in own if text]
    # A draft is the answer as it grew: a beginning of one of the model's answers, and " …".
    drafts = [d["text"] for d in emulator.drafts(OWNER)]
    sent = [m.text for m in owner.messages()] + [
        d for d in drafts if not any(a.startswith(d.removesuffix(" …").strip()) for a in answers if d.strip(" …"))]
    noisy = {text[:300]: noise for text in sent if (noise := latin_noise(text, own))}
    assert noisy == {}, json.dumps(noisy, ensure_ascii=False, indent=1)
    assert "Traceback" not in bot.log()
