"""The generator against a scripted OpenAI-compatible server: every fault ends with a clear message and nothing lost."""

import json

import pytest

from fake_openai import FakeOpenAI, Reply, paraphrases_for
from tuning.data.synthetic import (Budget, ClientConfig, extract_pairs, extract_questions, generate,
                              parse_json_payload, BadOutput)

QUESTIONS = ["How long does delivery to Berlin take?", "How much does a parcel to Paris cost?",
             "Can I change the delivery address?", "Do you deliver on Sundays?"]


@pytest.fixture
def fake():
    with FakeOpenAI(default=paraphrases_for) as server:
        yield server


@pytest.fixture
def roots(store, assistant):
    return [store.add_example(assistant.id, q, f"Answer {i}.") for i, q in enumerate(QUESTIONS)]


def config(fake, **kw):
    values = dict(base_url=fake.base_url, api_key="test", model="fake-model", timeout_s=2.0, concurrency=2,
                  max_retries=3, backoff_s=0.01, max_backoff_s=0.05)
    values.update(kw)
    return ClientConfig(**values)


def variations(store, assistant, run):
    return store.list_examples(assistant.id, generation_run_id=run.id)


def test_parse_json_defensively():
    assert parse_json_payload('Sure!\n```json\n{"questions": ["a?"]}\n```\nHope it helps') == {"questions": ["a?"]}
    assert parse_json_payload('Here: {"questions": ["b?"]} and some trailing {text') == {"questions": ["b?"]}
    assert extract_questions([{"question": "c?"}, "d?", 3]) == ["c?", "d?"]
    assert extract_pairs({"data": [{"q": "x?", "a": "y"}, {"question": "z?"}]}) == [("x?", "y")]
    for bad in ("", "   ", "no json here", "{broken: ["):
        with pytest.raises(BadOutput):
            parse_json_payload(bad)


async def test_paraphrase_success_records_usage_and_dedups(fake, store, assistant, roots):
    progress = []
    run = await generate(store, assistant.id, method="paraphrase", per_example=4, client_config=config(fake),
                         on_progress=progress.append)
    assert run.status == "succeeded", run.error
    made = variations(store, assistant, run)
    assert len(made) == 16 and run.kept == 16
    assert {e.parent_id for e in made} == {r.id for r in roots}
    assert all(e.status == "pending" and e.method == "paraphrase" and e.source == "synthetic" for e in made)
    assert run.requests == 4 and run.prompt_tokens == 80 and run.completion_tokens == 40
    assert run.cost_usd == pytest.approx(120 / 1000 * 0.0006)
    assert progress[-1]["done"] == 4 and progress[-1]["kept"] == 16
    body = fake.requests[0]
    assert body["response_format"] == {"type": "json_object"} and body.get("n") in (None, 1)


async def test_429_then_success_respects_retry_after(fake, store, assistant, roots):
    fake.add(Reply(status=429, content="slow down", headers={"Retry-After": "0.05"}))
    run = await generate(store, assistant.id, method="paraphrase", per_example=2,
                         client_config=config(fake, concurrency=1))
    assert run.status == "succeeded", run.error
    assert run.requests == 5 and run.kept == 8


async def test_500s_until_budget_is_spent_keeps_items_and_resumes(fake, store, assistant, roots):
    fake.add(Reply(json.dumps({"questions": ["Berlin delivery: how many days?", "Days to ship to Berlin?"]})))
    fake.default = lambda request: Reply(status=500, content="upstream exploded")
    run = await generate(store, assistant.id, method="paraphrase", per_example=2,
                         client_config=config(fake, concurrency=1, max_retries=10), budget=Budget(max_requests=4))
    assert run.status == "stopped"
    assert "budget spent: 4 requests" in run.error and "HTTP 500" in run.error and "tunebot" not in run.error
    kept = variations(store, assistant, run)
    assert len(kept) == 2 and run.requests == 4
    # The endpoint recovers; resuming skips the example already done and finishes the rest.
    fake.default = paraphrases_for
    resumed = await generate(store, assistant.id, method="paraphrase", per_example=2, client_config=config(fake),
                             resume_run_id=run.id)
    assert resumed.id == run.id and resumed.status == "succeeded", resumed.error
    made = variations(store, assistant, resumed)
    assert len(made) == 8
    assert sum(e.parent_id == roots[0].id for e in made) == 2
    assert resumed.requests == 4 + 3


async def test_timeout_is_retried(fake, store, assistant, roots):
    fake.add(Reply(json.dumps({"questions": ["late?"]}), delay_s=1.0))
    run = await generate(store, assistant.id, method="paraphrase", per_example=1,
                         client_config=config(fake, timeout_s=0.3, concurrency=1))
    assert run.status == "succeeded", run.error
    assert run.requests == 5 and len(variations(store, assistant, run)) == 4


async def test_persistent_timeouts_fail_clearly(fake, store, assistant, roots):
    fake.default = lambda request: Reply(json.dumps({"questions": ["x?"]}), delay_s=0.5)
    run = await generate(store, assistant.id, method="paraphrase", per_example=1,
                         client_config=config(fake, timeout_s=0.1, concurrency=1, max_retries=1))
    assert run.status == "failed"
    assert "timed out (after 2 tries)" in run.error and "0 items kept" in run.error


async def test_broken_json_is_asked_again_then_reported(fake, store, assistant, roots):
    fake.add(Reply("```json\n{\"questions\": [\"Shipping time to Berlin, roughly?\"]}\n``` done"),
             Reply("{questions: [oops"))
    fake.default = lambda request: Reply("I cannot answer in JSON, sorry")
    run = await generate(store, assistant.id, method="paraphrase", per_example=1,
                         client_config=config(fake, concurrency=1), max_rounds=2)
    assert run.status == "failed"
    assert "3 of 4 got no usable answer" in run.error and "did not return JSON" in run.error
    kept = variations(store, assistant, run)
    assert [e.question for e in kept] == ["Shipping time to Berlin, roughly?"]


async def test_empty_answer_is_reported(fake, store, assistant, roots):
    fake.default = lambda request: Reply("")
    run = await generate(store, assistant.id, method="paraphrase", per_example=1,
                         client_config=config(fake), max_rounds=1)
    assert run.status == "failed" and "empty answer" in run.error and run.kept == 0


async def test_auth_error_stops_at_once(fake, store, assistant, roots):
    fake.default = lambda request: Reply(status=401, content="bad key")
    run = await generate(store, assistant.id, method="paraphrase", per_example=1,
                         client_config=config(fake, concurrency=1))
    assert run.status == "failed" and "HTTP 401" in run.error and "OPENAI_API_KEY" in run.error
    assert len(fake.requests) == 1


async def test_token_budget_and_duplicates_filtered(fake, store, assistant, roots):
    dup = json.dumps({"questions": ["how long does delivery to berlin take", "HOW LONG DOES DELIVERY TO BERLIN TAKE!",
                                    "Delivery to Berlin — how long?", "Сколько ехать до Берлина?"]})
    fake.add(Reply(dup, usage=(100, 100)))
    run = await generate(store, assistant.id, method="paraphrase", per_example=3,
                         client_config=config(fake, concurrency=1), budget=Budget(max_tokens=150), max_rounds=1)
    assert run.status == "stopped" and "budget spent: 200 tokens" in run.error
    assert [e.question for e in variations(store, assistant, run)] == ["Delivery to Berlin — how long?"]
    assert run.generated == 4 and run.kept == 1


async def test_new_pairs_and_judge_auto_approve(fake, store, assistant, roots):
    run = await generate(store, assistant.id, method="new", per_example=3, client_config=config(fake), shots=2)
    assert run.status == "succeeded", run.error
    made = variations(store, assistant, run)
    assert len(made) == 3  # both batches propose the same three; the second batch's are duplicates
    assert all(e.method == "new" and e.parent_id is None and e.chunk_ref.startswith("new: batch") for e in made)
    judged = await generate(store, assistant.id, method="paraphrase", per_example=1, client_config=config(fake),
                            judge=True, auto_approve_above=0.8)
    made = variations(store, assistant, judged)
    assert len(made) == 4 and all(e.judge_score == pytest.approx(0.9) and e.status == "approved" for e in made)


async def test_document_pairs_keep_chunk_reference(fake, store, assistant):
    text = "ACME ships parcels in two days. " * 20 + "\n\n" + "Returns are free for 30 days. " * 20
    doc = store.add_document(assistant.id, "terms.txt", text)
    run = await generate(store, assistant.id, method="document", per_example=1, document_id=doc.id,
                         client_config=config(fake), chunk_chars=700)
    assert run.status == "succeeded", run.error
    made = variations(store, assistant, run)
    assert made and all(e.document_id == doc.id and e.source == "document" and "chunk" in e.chunk_ref for e in made)


async def test_should_stop_ends_a_slow_run_at_once_keeping_what_was_saved(fake, store, assistant, roots):
    import time

    fake.add(Reply(json.dumps({"questions": ["Berlin delivery: how many days?", "Days to ship to Berlin?"]})))
    fake.default = lambda request: Reply(json.dumps({"questions": ["slow one?", "slow two?"]}), delay_s=30)
    stop_at = time.monotonic() + 1.0
    started = time.monotonic()
    run = await generate(store, assistant.id, method="paraphrase", per_example=2,
                         client_config=config(fake, concurrency=1, timeout_s=60),
                         should_stop=lambda: time.monotonic() >= stop_at)
    assert time.monotonic() - started < 20  # not the 30 s the request in flight would take (even on a loaded machine)
    assert run.status == "stopped" and "shutting down" in run.error and "--resume" not in run.error
    assert len(variations(store, assistant, run)) == 2  # the first answer was saved before the stop
    fake.default = paraphrases_for
    resumed = await generate(store, assistant.id, method="paraphrase", per_example=2, client_config=config(fake),
                             resume_run_id=run.id)
    assert resumed.status == "succeeded", resumed.error
    assert len(variations(store, assistant, resumed)) == 8
