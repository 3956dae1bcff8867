"""The larger model in chat, through the emulator against `tunebot run` with a scripted OpenAI-compatible server:
/generate paraphrases with a cost estimate, pairs from an uploaded .docx reviewed with buttons; and /compare,
/schedule, /apikey, /stats, /lang."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from fake_openai import FakeOpenAI, Reply, paraphrases_for

from bot_process import BotProcess
from storage import Store, open_db

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OWNER, EXPERT, TESTER = 3001, 3002, 3003
HANDBOOK = [("How much does a pallet to Norway cost?", "A pallet to Norway costs 180 euros."),
            ("When is the Oslo depot open?", "The Oslo depot is open from 7 to 15 on weekdays."),
            ("Who pays customs duties?", "The receiver pays customs duties on arrival.")]

FRESH = ["Is weekend shipping something you offer?", "My grandmother asks whether couriers ring twice",
         "Which documents does customs want from me?", "Could a neighbour sign for my box?",
         "Why was my label rejected yesterday?", "Do drivers accept cash on delivery?",
         "Where can refunds be claimed online?", "What happens to fragile glassware in transit?",
         "Can heavy furniture be picked up from home?", "Are lithium batteries allowed in parcels?",
         "How do I change the delivery address later?", "Who answers the phone after midnight?",
         "Is there a discount for students?", "Will rain damage cardboard boxes outside?"]


def llm_reply(request: dict) -> Reply:
    """Pairs taken from the document chunk in the prompt; paraphrases and new pairs as tests/fake_openai does."""
    text = request["messages"][-1]["content"]
    if "Text:\n<<<" in text:
        chunk = text.split("<<<", 1)[1]
        pairs = [{"question": q, "answer": a} for q, a in HANDBOOK if a in chunk]
        return Reply(json.dumps({"pairs": pairs}), usage=(300, 60))
    reply = paraphrases_for(request)
    reply.usage = (prompt_tokens(request), len(reply.content) // 4)  # about what a real endpoint would count
    return reply


def prompt_tokens(request: dict) -> int:
    return sum(len(m["content"]) // 4 + 4 for m in request["messages"])


@pytest.fixture(scope="module")
def llm():
    with FakeOpenAI(default=llm_reply) as fake:
        yield fake


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bot-llm-data")


@pytest.fixture(scope="module")
def db(data_dir, tiny_model_dir):
    store = Store(open_db(data_dir / "tunebot.db"))
    assistant = store.create_assistant("parcels", description="ACME parcel delivery", owner_id=OWNER,
                                       base_model=tiny_model_dir)
    store.add_member(assistant.id, EXPERT, "expert")
    store.add_member(assistant.id, TESTER, "tester")
    for q, a in (("How long does delivery take?", "Two to three working days."),
                 ("Can I track my parcel?", "Yes, with the tracking number on acme.example/track.")):
        store.add_example(assistant.id, q, a, author_id=EXPERT)
    return store


@pytest.fixture(scope="module")
def bot(emulator, llm, db, data_dir, tiny_model_dir, model_cache):
    proc = BotProcess(emulator, data_dir, TUNEBOT_BASE_MODEL=tiny_model_dir, TUNEBOT_MAX_NEW_TOKENS="8",
                      TUNEBOT_WORKER_SLOTS="1", TUNEBOT_OPENAI_BASE_URL=llm.base_url,
                      TUNEBOT_OPENAI_API_KEY="sk-test", TUNEBOT_GENERATOR_MODEL="fake-large",
                      TUNEBOT_PRICE_PER_1K_TOKENS="0.5", TUNEBOT_TEST_CACHE=str(model_cache))
    proc.start()
    yield proc
    proc.stop()
    print(proc.log()[-3000:])


def test_generate_paraphrases_with_cost_estimate(emulator, bot, db, llm):
    expert = emulator.user(EXPERT, "Expert")
    aid = db.assistant_by_name("parcels").id
    menu = expert.ask("/generate")
    assert "fake-large" in menu.text
    label = menu.button("Paraphrase ×3")["text"]
    estimate = float(re.search(r"~\$([\d.]+)", label).group(1))
    assert estimate > 0, label
    before = len(llm.requests)
    done = expert.press(menu, "Paraphrase ×3", contains="Done")
    run = db.list_generation_runs(aid)[-1]
    assert (run.method, run.model, run.status) == ("paraphrase", "fake-large", "succeeded")
    assert run.requests == len(llm.requests) - before == 2  # one request per approved example
    assert run.prompt_tokens == sum(prompt_tokens(r) for r in llm.requests[before:])
    tokens = run.prompt_tokens + run.completion_tokens
    assert run.cost_usd == pytest.approx(tokens / 1000 * 0.5)
    assert 0.6 < estimate / run.cost_usd < 1.6, (estimate, run.cost_usd)  # the estimate is about right
    assert f"{run.kept} new variation" in done.text and f"{tokens} tokens" in done.text
    pending = db.list_examples(aid, status="pending", generation_run_id=run.id)
    assert len(pending) == run.kept == 6
    assert all(e.parent_id and e.method == "paraphrase" and e.source == "synthetic" for e in pending)

    card = expert.press(done, "Review now", contains="reviewed")
    assert "0 of 6 reviewed" in card.text and "Method: paraphrase" in card.text
    first = int(re.search(r"rv:a:(\d+)", json.dumps(card.buttons)).group(1))
    assert db.get_example(db.get_example(first).parent_id).question in card.text
    card = expert.press(card, "✅", contains="1 of 6 reviewed")
    assert db.get_example(first).status == "approved"
    expert.press(card, "Approve all remaining", contains="Approved 5")
    assert db.list_examples(aid, status="pending", generation_run_id=run.id) == []


def test_docx_upload_extracts_pairs_for_review(emulator, bot, db):
    import docx

    expert = emulator.user(EXPERT, "Expert")
    aid = db.assistant_by_name("parcels").id
    document = docx.Document()
    document.add_heading("ACME Nordic handbook", 1)
    for _, answer in HANDBOOK:
        document.add_paragraph(answer)
    buf = io.BytesIO()
    document.save(buf)
    mark = expert.send_document("handbook.docx", buf.getvalue())
    done = expert.wait(mark, timeout=60, until=lambda ms: any("from the document" in m.text for m in ms))
    report = [m for m in done if "from the document" in m.text][-1]
    assert "handbook.docx" in report.text and "3 question-answer pair" in report.text, report.text
    pairs = db.list_examples(aid, source="document", status="pending")
    assert {(e.question, e.answer) for e in pairs} == set(HANDBOOK)
    doc_id = pairs[0].document_id
    assert doc_id and db.get_document(doc_id).filename == "handbook.docx"
    assert all(e.chunk_ref and "chunk 1" in e.chunk_ref and e.generation_run_id for e in pairs)

    card = expert.press(report, "Review now", contains="reviewed")
    assert "document handbook.docx, chunk 1" in card.text
    shown = int(re.search(r"rv:a:(\d+)", json.dumps(card.buttons)).group(1))
    card = expert.press(card, "✅", contains="1 of 3 reviewed")
    assert db.get_example(shown).status == "approved"
    rejected = int(re.search(r"rv:r:(\d+)", json.dumps(card.buttons)).group(1))
    expert.press(card, "❌", contains="2 of 3 reviewed")
    assert db.get_example(rejected).status == "rejected"

    menu = expert.ask("/generate")
    assert "Pairs from handbook.docx" in " ".join(menu.button_texts)


def test_compare_answers_side_by_side(emulator, bot):
    tester = emulator.user(TESTER, "Tester")
    reply = tester.ask("/compare How long does delivery take?", timeout=90)
    assert "— base (" in reply.text and "— few-shot (" in reply.text, reply.text
    assert "No tuned version yet" in reply.text
    assert "Usage: /compare" in tester.ask("/compare").text


def test_schedule_is_owner_only_and_stored(emulator, bot, db):
    owner, expert = emulator.user(OWNER, "Owner"), emulator.user(EXPERT, "Expert")
    aid = db.assistant_by_name("parcels").id
    assert "needs the owner role" in expert.ask("/schedule daily 03:30").text
    assert "Usage: /schedule" in owner.ask("/schedule sometimes").text
    assert "30 3 * * *" in owner.ask("/schedule daily 03:30 5").text
    policy = db.get_retrain_policy(aid)
    assert (policy.cron, policy.min_new, bool(policy.enabled)) == ("30 3 * * *", 5, True)
    assert "0 22 * * 0" in owner.ask("/schedule weekly 22:00").text
    assert "off" in owner.ask("/schedule off").text
    assert not db.get_retrain_policy(aid).enabled


def test_apikey_shown_once_and_stored_hashed(emulator, bot, db, data_dir):
    owner = emulator.user(OWNER, "Owner")
    aid = db.assistant_by_name("parcels").id
    assert "needs the owner role" in emulator.user(TESTER, "Tester").ask("/apikey").text
    reply = owner.ask("/apikey support-widget")
    key = re.search(r"\b(tb-\S+)", reply.text).group(1)
    assert db.lookup_api_key(key).assistant_id == aid
    [record] = db.list_api_keys(aid)
    assert record.name == "support-widget" and key.startswith(record.prefix) and len(record.prefix) < len(key)
    stored = b"".join(p.read_bytes() for p in data_dir.glob("tunebot.db*"))
    assert key.encode() not in stored
    assert key not in " ".join(m.text for m in owner.messages() if m.message_id != reply.message_id)


def test_stats_counts_match_the_database(emulator, bot, db):
    tester = emulator.user(TESTER, "Tester")
    counts = db.example_counts(db.assistant_by_name("parcels").id)
    text = tester.ask("/stats").text
    assert text.startswith("parcels")
    assert f"approved: {counts['status']['approved']}" in text and f"document: {counts['source']['document']}" in text


def test_lang_switches_to_russian(emulator, bot):
    tester = emulator.user(TESTER, "Tester")
    assert tester.ask("/lang ru").text == "Язык: русский."
    help_text = tester.ask("/help").text
    assert "Ассистент: parcels (ваша роль: тестировщик)" in help_text, help_text
    assert "Извините" in tester.ask("/train").text
    menu = tester.ask("/lang")
    assert tester.press(menu, "English", contains="Language").text == "Language: English."


def _wait_for_text(user, message_id: int, part: str, *, timeout: float):
    deadline = time.monotonic() + timeout
    while part not in (message := user.message(message_id)).text:
        assert time.monotonic() < deadline, f"message #{message_id} never showed {part!r}: {message.text!r}"
        time.sleep(0.05)
    return message


def test_generation_runs_off_the_event_loop_with_progress(emulator, bot, db, llm):
    expert, tester = emulator.user(EXPERT, "Expert"), emulator.user(TESTER, "Tester")
    aid = db.assistant_by_name("parcels").id
    roots = len(db.list_examples(aid, status="approved", roots_only=True))
    calls = []

    def slow(request: dict) -> Reply:
        calls.append(request)
        n = len(calls)
        questions = [FRESH[(3 * n + i) % len(FRESH)] for i in range(3)]
        # One unit finishes early, the rest take a while.
        return Reply(json.dumps({"questions": questions}), delay_s=0.5 if n == 1 else 6.0)

    llm.default = slow
    try:
        menu = expert.ask("/generate")
        mark = emulator.last_message_id()
        expert.tap(menu, "Paraphrase ×3")
        while not calls:
            expert.is_silent_after(mark, wait_s=0.1)
        # While the larger model writes, other users are answered at once.
        assert tester.ask("/stats", timeout=3).text.startswith("parcels")
        assert db.list_generation_runs(aid)[-1].status == "running"
        # The menu message itself becomes the progress message, edited in place, then the result.
        status = _wait_for_text(expert, menu.message_id, "done,", timeout=15)
        assert f"1 of {roots} done" in status.text, status.text
        final = _wait_for_text(expert, menu.message_id, "Done:", timeout=30)
        assert final.edits >= 3 and "Review now" in final.button_texts[0]  # started, progress, result
    finally:
        llm.default = llm_reply
    run = db.list_generation_runs(aid)[-1]
    assert run.status == "succeeded" and run.kept == 3 * roots


def test_shutdown_does_not_wait_for_a_slow_generation(emulator, bot, db, llm):
    """Last in this module: it stops the bot. SIGTERM ends a generation stuck on the larger model at once."""
    expert = emulator.user(EXPERT, "Expert")
    aid = db.assistant_by_name("parcels").id
    calls = []

    def stuck(request: dict) -> Reply:
        calls.append(request)
        return Reply(json.dumps({"questions": ["never delivered?"]}), delay_s=60.0)

    llm.default = stuck
    try:
        menu = expert.ask("/generate")
        expert.tap(menu, "Paraphrase ×3")
        deadline = time.monotonic() + 20
        while not calls:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.1)
        started = time.monotonic()
        bot.stop()  # SIGTERM; killed after 30 s
        stopped_in = time.monotonic() - started
    finally:
        llm.default = llm_reply
    assert bot.proc.returncode == 0 and stopped_in < 20, (bot.proc.returncode, stopped_in, bot.log()[-2000:])
    run = db.list_generation_runs(aid)[-1]
    assert run.status == "stopped" and "shutting down" in run.error and "--resume" not in run.error  # no CLI syntax
