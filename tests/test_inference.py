"""The inference engine on the tiny model: adapters per request, the LRU, modes and the answer service."""

from __future__ import annotations

import threading
import time

import pytest

from inference_helpers import make_random_adapter, plain_generate
from tuning.answering.engine import Engine
from tuning.answering.requests import InferenceError, NoActiveVersion, prepare_messages
from tuning.answering.service import answer_question, compare_answers, plan_answer, select_fewshot
from tuning.errors import TuningError

QUESTION = "How long does delivery take?"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_random_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir, adapter_cache_size=2, max_new_tokens=8)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(engine, adapters):
    """The greedy answer of the base model and of each adapter, asked one at a time."""
    return {name: engine.answer(QUESTION, adapter_dir=path).text for name, path in
            [("base", None), *[(f"a{i}", p) for i, p in enumerate(adapters)]]}


def test_adapters_change_the_answer(reference):
    assert len(set(reference.values())) == 4, reference


def test_interleaved_concurrent_requests_never_mix_adapters(engine, adapters, reference):
    order = ["a0", "a1", "base", "a0", "a1", "a0", "base", "a1"]
    results: dict[int, str] = {}

    def ask(i, name):
        path = None if name == "base" else adapters[int(name[1])]
        results[i] = "".join(engine.stream(QUESTION, adapter_dir=path))

    threads = [threading.Thread(target=ask, args=(i, name)) for i, name in enumerate(order)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(len(order))] == [reference[name] for name in order]


def test_lru_evicts_the_least_recently_used_and_reloads_it(engine, adapters, reference):
    a0, a1, a2 = adapters
    engine.answer(QUESTION, adapter_dir=a0)
    engine.answer(QUESTION, adapter_dir=a1)
    loads, evictions = engine.adapter_loads, engine.adapter_evictions
    engine.answer(QUESTION, adapter_dir=a0)  # a0 becomes the most recent: nothing loaded
    assert engine.adapter_loads == loads
    assert engine.answer(QUESTION, adapter_dir=a2).text == reference["a2"]
    assert engine.adapter_evictions == evictions + 1
    assert [p.rsplit("/", 1)[-1] for p in engine.resident_adapters] == ["a0", "a2"]  # a1 was evicted
    assert engine.answer(QUESTION, adapter_dir=a1).text == reference["a1"]  # reloaded, same answer
    assert engine.adapter_loads == loads + 2
    assert len(engine.resident_adapters) == 2


def test_streaming_is_token_by_token_and_closing_cancels(engine, adapters):
    stream = engine.stream(QUESTION, adapter_dir=adapters[0], max_new_tokens=50)
    first = next(stream)
    assert first
    stream.close()  # the request is cancelled; the engine keeps serving
    pieces = list(engine.stream(QUESTION, max_new_tokens=5))
    assert 1 <= len(pieces) <= 5


def test_bad_adapter_folder_is_a_clear_error_and_the_engine_survives(engine, tmp_path):
    with pytest.raises(TuningError, match="not a LoRA adapter folder"):
        engine.answer(QUESTION, adapter_dir=tmp_path)
    assert engine.answer(QUESTION, max_new_tokens=3).n_tokens >= 1


def test_select_fewshot_picks_the_most_similar_examples():
    pairs = [("What are your opening hours?", "9 to 5"), ("How long does delivery take to Berlin?", "2 days"),
             ("Do you ship pianos?", "No"), ("How long does delivery take?", "2 days")]
    chosen = select_fewshot("How long does the delivery take to Paris?", pairs, k=2)
    assert chosen[-1][1] == "2 days"  # a delivery-time example, the best next to the question
    assert len(chosen) == 2 and ("Do you ship pianos?", "No") not in chosen
    assert len(select_fewshot("x", pairs, k=10)) == 3  # the same answer is used once


def test_fewshot_mode_puts_approved_train_examples_in_the_prompt(store, assistant, engine):
    store.add_example(assistant.id, "How long does delivery take to Berlin?", "Two working days.")
    store.add_example(assistant.id, "Do you deliver on Sundays?", "No, Monday to Saturday.")
    held_out = store.add_example(assistant.id, "How long does delivery take to Rome?", "Three days.", split="test")
    plan = plan_answer(store, assistant.id, QUESTION, mode="fewshot")
    assert plan.mode == "fewshot" and plan.adapter_dir is None
    messages = prepare_messages(QUESTION, **{k: v for k, v in plan.engine_kwargs().items() if "adapter" not in k})
    contents = [m["content"] for m in messages]
    assert contents[0] == "You answer for ACME Logistics."
    assert "How long does delivery take to Berlin?" in contents and "Two working days." in contents
    assert held_out.question not in contents
    assert contents[-1] == QUESTION
    answer = answer_question(store, engine, assistant.id, QUESTION, mode="fewshot", user_id=1)
    stored = store.get_message(answer.message_id)
    assert stored["mode"] == "fewshot" and stored["role"] == "assistant" and stored["text"] == answer.text


def test_tuned_mode_uses_the_active_version(store, assistant, engine, adapters, reference):
    with pytest.raises(NoActiveVersion, match="no trained version"):
        answer_question(store, engine, assistant.id, QUESTION, mode="tuned")
    assert plan_answer(store, assistant.id, QUESTION).mode == "fewshot"  # auto before any training
    version = store.add_model_version(assistant.id, adapter_path=adapters[1], base_model="tiny")
    store.activate_version(version.id)
    answer = answer_question(store, engine, assistant.id, QUESTION, user_id=1)
    assert answer.mode == "tuned" and answer.version_id == version.id
    # The assistant's system prompt differs from the reference run's default, so compare via the engine.
    expected = engine.answer(QUESTION, adapter_dir=adapters[1], system_prompt=assistant.system_prompt).text
    assert answer.text == expected.strip()
    assert store.get_message(answer.message_id)["model_version_id"] == version.id
    compared = compare_answers(store, engine, assistant.id, QUESTION, modes=("base", "tuned"))
    assert [a.mode for a in compared] == ["base", "tuned"] and compared[1].text == expected.strip()
    other = store.create_assistant("other")
    with pytest.raises(InferenceError, match="another assistant"):
        plan_answer(store, other.id, QUESTION, mode="version", version_id=version.id)


def test_engine_serves_again_after_close(tiny_model_dir):
    eng = Engine(tiny_model_dir, max_new_tokens=3)
    first = eng.answer(QUESTION).text
    eng.close()
    assert eng.answer(QUESTION).text == first  # a new inference thread starts
    eng.close()


def test_engine_answers_token_for_token_like_plain_generate(engine, adapters, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    messages = prepare_messages(QUESTION, system_prompt="You answer for ACME.")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), adapters[0]).eval()
    for model, adapter in ((base, None), (tuned, adapters[0]), (base, None)):  # base again after an adapter
        generation = engine.submit(messages, adapter_dir=adapter, max_new_tokens=24)
        result = generation.result()
        expected = plain_generate(model, engine.tokenizer, messages, max_new_tokens=24, stop_ids=engine.stop_ids)
        assert generation.token_ids == expected and result.n_tokens == len(expected)
        assert result.text == engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_batched_requests_answer_exactly_as_one_at_a_time(tiny_model_dir, adapters):
    eng = Engine(tiny_model_dir, max_new_tokens=12, max_batch_size=4)
    questions = [QUESTION, "Hi", "Where is my parcel? It was sent last week from Berlin to Rome.", "Pianos?", "Hello"]
    asks = [(q, a) for q in questions for a in (adapters[0], None)]
    alone = {}
    for q, a in [("Tell me a long story.", adapters[0]), *asks]:
        generation = eng.submit(prepare_messages(q), adapter_dir=a, max_new_tokens=200 if "story" in q else None)
        generation.result()
        alone[q, a] = generation.token_ids
    assert eng.largest_batch == 1
    # A long request keeps a batch running while the others arrive: same-adapter ones join it (prompts of
    # different lengths, left-padded), the base ones wait and then run as a batch of their own.
    long = eng.submit(prepare_messages("Tell me a long story."), adapter_dir=adapters[0], max_new_tokens=200)
    batched = [eng.submit(prepare_messages(q), adapter_dir=a) for q, a in asks]
    for generation in [long, *batched]:
        generation.result()
    assert 2 <= eng.largest_batch <= 4
    assert long.token_ids == alone["Tell me a long story.", adapters[0]]
    assert [g.token_ids for g in batched] == [alone[k] for k in asks]
    assert [g.text for g in batched] == [eng.tokenizer.decode(alone[k], skip_special_tokens=True) for k in asks]
    eng.close()


def test_a_cancelled_request_leaves_its_batch_and_the_others_finish(tiny_model_dir, adapters):
    eng = Engine(tiny_model_dir, max_new_tokens=40)
    expected = eng.submit(prepare_messages(QUESTION), adapter_dir=adapters[1])
    expected.result()
    streams = [eng.stream(QUESTION, adapter_dir=adapters[1]) for _ in range(3)]
    firsts = [next(s) for s in streams]
    streams[1].close()  # cancelled after its first piece
    texts = [first + "".join(s) for first, s in zip(firsts, (streams[0], streams[2]))]
    assert texts == [expected.text, expected.text]
    assert eng.largest_batch >= 2
    eng.close()


def test_adapter_logits_are_exactly_peft_logits(engine, adapters, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuning.prompts import encode_prompt

    engine.answer(QUESTION, adapter_dir=adapters[2], max_new_tokens=1)  # the engine's LoRA layers point at a2 now
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), adapters[2]).eval()
    ids = encode_prompt(engine.tokenizer, prepare_messages(QUESTION))
    with torch.inference_mode():
        assert torch.equal(engine.model(ids).logits, tuned(ids).logits)


def test_adapters_loaded_by_the_engine_stay_ordinary_tensors(engine, adapters):
    engine.answer(QUESTION, adapter_dir=adapters[0], max_new_tokens=1)
    lora = [p for name, p in engine.model.named_parameters() if "lora_" in name]
    assert lora and not any(p.is_inference() for p in lora)


def test_close_while_decoding_returns_and_racing_requests_are_all_answered(tiny_model_dir):
    """close() during a batch returns (it used to wait forever: the thread blocked on an empty queue after
    taking the stop marker), and a request submitted while close() runs is served, never stranded."""
    import threading

    eng = Engine(tiny_model_dir, max_new_tokens=1)
    eng.load()
    messages = prepare_messages(QUESTION)
    generations = []
    for _ in range(60):
        eng.submit(messages)  # a live thread for close() to stop
        submitted: list = []
        closer = threading.Thread(target=eng.close, daemon=True)
        submitter = threading.Thread(target=lambda: submitted.append(eng.submit(messages)), daemon=True)
        closer.start()
        submitter.start()
        closer.join(30)
        submitter.join(30)
        assert not closer.is_alive() and not submitter.is_alive(), "close() never returned"
        generations += submitted
    done = threading.Event()
    threading.Thread(target=lambda: ([g.result() for g in generations], done.set()), daemon=True).start()
    try:
        assert done.wait(60), f"{sum(g.finished_at is None for g in generations)} request(s) never served"
    finally:
        eng.close()


def test_engine_records_the_first_tokens_alternatives_as_the_model_scored_them(engine, tiny_model_dir):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from tuning.prompts import encode_prompt
    from tuning.answering.requests import ALTERNATIVES, ALTERNATIVE_STEPS

    messages = prepare_messages(QUESTION)
    result = engine.submit(messages, max_new_tokens=8).result()
    assert len(result.alternatives) == min(ALTERNATIVE_STEPS, result.n_tokens)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = encode_prompt(engine.tokenizer, messages)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
    top = torch.topk(logprobs, ALTERNATIVES)
    first = result.alternatives[0]
    assert [text for text, _ in first] == [engine.tokenizer.decode([int(t)]) for t in top.indices]
    assert [lp for _, lp in first] == pytest.approx([float(v) for v in top.values], abs=1e-4)
    assert first[0][1] == pytest.approx(result.token_logprobs[0], abs=1e-6)  # greedy: the likeliest was chosen
    assert all(lp <= 0 and math.isfinite(lp) for step in result.alternatives for _, lp in step)


def _damage(adapter: str, out, how: str) -> str:
    """A copy of an adapter folder whose weights file is cut in half (corrupt) or gone (missing)."""
    import shutil
    from pathlib import Path

    shutil.copytree(adapter, out)
    weights = Path(out) / "adapter_model.safetensors"
    if how == "corrupt":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    return str(out)


@pytest.fixture(scope="module")
def untied_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny model whose base answers vary with the prompt (the tied one mostly repeats a token)."""
    from inference_helpers import make_random_model_like

    return make_random_model_like(tiny_model_dir, tmp_path_factory.mktemp("untied"), seed=11)


@pytest.mark.parametrize("how", ["corrupt", "missing"])
@pytest.mark.parametrize("resident", [False, True], ids=["first-adapter", "after-another"])
def test_a_broken_adapter_is_a_clear_error_and_every_other_model_answers_as_before(untied_model_dir, tmp_path,
                                                                                     how, resident):
    """peft wraps the shared model's layers before it reads the weights: a failed load used to leave them in,
    and base answers were garbage for every assistant until a restart."""
    import torch

    from tuning.prompts import encode_prompt
    from tuning.answering.requests import AdapterLoadError

    good = make_random_adapter(untied_model_dir, tmp_path / "good", seed=5)
    broken = _damage(good, tmp_path / "broken", how)
    eng = Engine(untied_model_dir, max_new_tokens=12)
    messages = prepare_messages(QUESTION)

    def tokens(adapter=None) -> list[int]:
        generation = eng.submit(messages, adapter_dir=adapter)
        generation.result()
        return generation.token_ids

    def logits():
        with torch.inference_mode():
            return eng.model(encode_prompt(eng.tokenizer, messages)).logits

    base = tokens()
    base_logits = logits()
    tuned = tokens(good)
    assert tuned != base
    if not resident:
        eng.close()
        eng = Engine(untied_model_dir, max_new_tokens=12)  # the broken adapter is the first one it loads
        assert tokens() == base
    for _ in range(2):  # and it fails the same way when asked again
        with pytest.raises(AdapterLoadError, match="cannot be loaded") as err:
            eng.answer(QUESTION, adapter_dir=broken)
        assert str(tmp_path) not in str(err.value)  # no server path in what a user sees
        assert tokens() == base
        assert torch.equal(logits(), base_logits)
    assert tokens(good) == tuned
    assert tokens() == base
    assert eng.resident_adapters == [str((tmp_path / "good").resolve())]
    eng.close()


def test_prompts_longer_than_the_context_window_are_refused_and_answers_stop_at_its_end(tiny_model_dir):
    from tuning.answering.requests import ContextLengthExceeded

    eng = Engine(tiny_model_dir, max_new_tokens=4000)
    eng.load()
    assert eng.context_length == 1024  # the tiny model's max_position_embeddings
    with pytest.raises(ContextLengthExceeded, match="1024 tokens") as err:
        eng.submit(prepare_messages("word " * 1100))
    assert err.value.code == "context_length_exceeded" and err.value.prompt_tokens > 1024
    generation = eng.submit(prepare_messages("word " * 900))
    assert generation.max_new_tokens == 1024 - generation.prompt_tokens
    eng.close()


def test_in_flight_counts_unfinished_requests_and_cancellations_are_counted(tiny_model_dir):
    eng = Engine(tiny_model_dir, max_new_tokens=500)
    assert eng.in_flight == 0
    stream = eng.stream(QUESTION)
    next(stream)
    assert eng.in_flight == 1
    stream.close()
    deadline = time.monotonic() + 30
    while eng.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.in_flight == 0 and eng.cancellations == 1
    eng.answer(QUESTION, max_new_tokens=2)
    assert eng.in_flight == 0 and eng.cancellations == 1
    eng.close()


def test_a_vanishing_temperature_answers_greedily_instead_of_failing(engine):
    messages = prepare_messages(QUESTION)
    greedy = engine.submit(messages, max_new_tokens=6).result()
    tiny = engine.submit(messages, max_new_tokens=6, temperature=3.7e-100).result()  # found by the API fuzz
    assert tiny.text == greedy.text


def test_requests_of_other_adapters_are_decoded_in_turns_not_after_a_long_batch(tiny_model_dir, adapters):
    """A long answer on one adapter no longer holds up the others: each adapter's batch gets a decode step in
    turn, so a request on another adapter (or the base model) has its first token while the long one runs,
    and every answer is still exactly the one-at-a-time answer."""
    eng = Engine(tiny_model_dir, max_new_tokens=8)
    try:
        asks = [("Hi", adapters[1]), ("Hello", None), ("Pianos?", adapters[2])]
        alone = {k: eng.submit(prepare_messages(k[0]), adapter_dir=k[1]).result().text for k in asks}
        story = eng.submit(prepare_messages("Tell me a long story."), adapter_dir=adapters[0], max_new_tokens=300)
        others = [eng.submit(prepare_messages(q), adapter_dir=a) for q, a in asks]
        answers = [g.result() for g in others]
        assert story.finished_at is None or all(g.finished_at < story.finished_at for g in others)
        assert [a.text for a in answers] == [alone[k] for k in asks]
        assert story.result().n_tokens > 8 and all(g.first_token_at < story.finished_at for g in others)
    finally:
        eng.close()
