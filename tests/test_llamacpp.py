"""The llama.cpp backend and GGUF exports against the real runtimes: llama.cpp (llama-cpp-python) on the bundled
SmolLM2 GGUF, and transformers + peft on the same model dequantized, as the reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama_cpp is not importable: make setup builds llama-cpp-python")
BUNDLED = "bundled:smollm2-135m"
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?"]


def random_adapter(model_dir: str, out: Path, *, targets, seed: int = 0, scale: float = 0.3, **config) -> Path:
    """A LoRA with random A and B (B scaled down so that answers change but stay text)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                                      task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qk_adapter(bundled_model_dir, tmp_path_factory) -> Path:
    # Only q and k: the projections whose rows llama.cpp keeps in another order. A wrong layout shows at once.
    return random_adapter(bundled_model_dir, tmp_path_factory.mktemp("qk"), targets=["q_proj", "k_proj"], scale=1.0)


@pytest.fixture(scope="module")
def all_adapter(bundled_model_dir, tmp_path_factory) -> Path:
    return random_adapter(bundled_model_dir, tmp_path_factory.mktemp("all"), targets="all-linear")


@pytest.fixture(scope="module")
def gentle_adapter(bundled_model_dir, tmp_path_factory) -> Path:
    """A small change, as training makes: answers stay the model's, where the two runtimes agree."""
    return random_adapter(bundled_model_dir, tmp_path_factory.mktemp("gentle"), targets="all-linear", scale=0.05)


def torch_logits(model_dir: str, adapter: Path | None, ids: list[int]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_logits(gguf: Path, adapter_gguf: Path | None, ids: list[int]):
    import ctypes

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        if adapter_gguf is not None:
            adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter_gguf).encode())
            assert adapter, "llama.cpp refused the adapter"
            assert llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                                     (ctypes.c_float * 1)(1.0)) == 0
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def agreement(a, b) -> tuple[float, float]:
    """(correlation of the last position's logits, share of positions with the same most likely token)."""
    return float(np.corrcoef(a[-1], b[-1])[0, 1]), float(np.mean([x.argmax() == y.argmax() for x, y in zip(a, b)]))


def prompt_ids(model_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    from tuning.prompts import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    return encode_prompt(tok, [{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": QUESTIONS[0]}])[0].tolist()


def test_a_converted_lora_changes_llama_cpp_as_peft_changes_torch(bundled_model_dir, qk_adapter, tmp_path):
    from tuning.lora_gguf import write_adapter_gguf
    from tuning.models import bundled_gguf

    ids = prompt_ids(bundled_model_dir)
    gguf = bundled_gguf(BUNDLED)
    base_corr, _ = agreement(torch_logits(bundled_model_dir, None, ids), llama_logits(gguf, None, ids))
    reference = torch_logits(bundled_model_dir, qk_adapter, ids)
    converted = write_adapter_gguf(qk_adapter, gguf, tmp_path / "qk.gguf")
    corr, same = agreement(reference, llama_logits(gguf, converted, ids))
    # As close as the two runtimes are without any adapter (llama.cpp quantizes activations): the q/k rows follow
    # llama.cpp's order. Without that permutation this adapter gives a correlation near 0.9.
    assert corr > 0.99 and corr > base_corr - 0.01 and same >= 0.9, (corr, base_corr, same)
    assert (tmp_path / "qk.gguf").stat().st_size > 0 and not list(tmp_path.glob("*.part"))


def test_a_merged_gguf_answers_like_the_adapter_on_its_base(bundled_model_dir, all_adapter, tmp_path):
    from tuning.lora_gguf import write_adapter_gguf, write_merged_gguf
    from tuning.models import bundled_gguf

    ids = prompt_ids(bundled_model_dir)
    gguf = bundled_gguf(BUNDLED)
    pair = llama_logits(gguf, write_adapter_gguf(all_adapter, gguf, tmp_path / "a.gguf"), ids)
    merged = llama_logits(write_merged_gguf(all_adapter, gguf, tmp_path / "m.gguf", quant="q8_0"), None, ids)
    corr, same = agreement(pair, merged)
    assert corr > 0.99 and same >= 0.9, (corr, same)


def test_scales_are_folded_into_b_whatever_peft_used(tmp_path):
    """alpha/r, alpha/√r (rsLoRA) and per-module rank/alpha patterns all end up in B (llama.cpp's scale is 1)."""
    from safetensors.numpy import save_file

    from tuning.lora_gguf import lora_pairs

    a, b = np.ones((4, 6), np.float32), np.ones((10, 4), np.float32)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
               "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": b}, str(tmp_path / "adapter_model.safetensors"))
    for config, q_scale, up_scale in (({"r": 4, "lora_alpha": 8}, 2.0, 2.0),
                                      ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4.0, 4.0),
                                      ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"up_proj": 2}}, 2.0, 0.5)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
        pairs = lora_pairs(tmp_path)
        assert pairs["model.layers.0.self_attn.q_proj"][1][0, 0] == pytest.approx(q_scale)
        assert pairs["model.layers.0.mlp.up_proj"][1][0, 0] == pytest.approx(up_scale)


def test_what_llama_cpp_cannot_apply_is_refused_with_a_reason(tmp_path, all_adapter):
    from tuning.lora_gguf import GGUFConversionError, write_adapter_gguf
    from tuning.models import bundled_gguf

    for extra, said in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")):
        folder = tmp_path / said
        folder.mkdir()
        config = json.loads((all_adapter / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **extra}))
        (folder / "adapter_model.safetensors").write_bytes((all_adapter / "adapter_model.safetensors").read_bytes())
        with pytest.raises(GGUFConversionError, match=said):
            write_adapter_gguf(folder, bundled_gguf(BUNDLED), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_the_llamacpp_engine_streams_switches_adapters_and_cancels(model_cache, all_adapter, tmp_path):
    from tuning.answering.engine import Engine
    from tuning.answering.requests import ContextLengthExceeded
    from tuning.answering.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, max_new_tokens=24, n_threads=2, adapter_cache_size=1)
    reference = Engine(BUNDLED, cache_dir=model_cache, max_new_tokens=24)
    try:
        base = [engine.answer(q) for q in QUESTIONS]
        tuned = [engine.answer(q, adapter_dir=all_adapter) for q in QUESTIONS]
        again = engine.answer(QUESTIONS[0])  # back to the base model: its own answer, not the adapter's
        assert again.text == base[0].text and [a.text for a in tuned] != [a.text for a in base]
        assert engine.resident_adapters == [str(all_adapter.resolve())] and engine.adapter_loads == 1
        torch_tuned = [reference.answer(q, adapter_dir=all_adapter).text for q in QUESTIONS]
        assert sum(a.text == b for a, b in zip(tuned, torch_tuned)) >= 2, ([a.text for a in tuned], torch_tuned)
        first = tuned[0]
        assert first.n_tokens > 0 and len(first.token_logprobs) == first.n_tokens
        assert len(first.alternatives) == min(4, first.n_tokens) and len(first.alternatives[0]) == 8
        pieces = list(engine.stream(QUESTIONS[1]))
        assert "".join(pieces) == base[1].text and len(pieces) > 1  # streamed piece by piece
        generation = engine.submit([{"role": "user", "content": "Count to one hundred."}], max_new_tokens=200)
        next(iter(generation))
        generation.cancel()
        assert generation.result().n_tokens < 200 and engine.cancellations == 1
        with pytest.raises(ContextLengthExceeded):
            engine.submit([{"role": "user", "content": "word " * 5000}])
        # An adapter that is not this model's is refused for that request only.
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
        (broken / "adapter_model.safetensors").write_bytes((all_adapter / "adapter_model.safetensors").read_bytes())
        with pytest.raises(Exception, match="llama.cpp"):
            engine.answer(QUESTIONS[0], adapter_dir=broken)
        assert engine.answer(QUESTIONS[0]).text == base[0].text
    finally:
        engine.close()
        reference.close()


def test_a_gguf_base_is_needed(model_cache):
    from tuning.errors import ModelLoadError
    from tuning.answering.llamacpp import LlamaCppEngine

    with pytest.raises(ModelLoadError, match="GGUF base model"):
        LlamaCppEngine("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=model_cache).load()


def test_ollama_export_is_checked_and_its_template_renders_the_chat_template(model_cache, gentle_adapter, tmp_path):
    from tuning.export import OLLAMA_TEMPLATE, Probe, export_model, render_ollama_template

    probes = [Probe(q, ()) for q in QUESTIONS] + [Probe("What is two plus two?", ("4",))]
    report = export_model(gentle_adapter, base_model=BUNDLED, out_dir=tmp_path / "ollama", fmt="ollama",
                          probes=probes, system_prompt="Answer briefly.", cache_dir=model_cache, max_new_tokens=24)
    assert {"model.gguf", "adapter.gguf", "Modelfile", "export_report.json"} <= set(report.files)
    # Both handed-over artifacts were asked every probe in llama.cpp (how often they agree with the torch engine
    # is bench/llamacpp_speed.py's measure; the logits tests above hold the conversion to a tolerance).
    assert report.probes == 4 and all(0 <= c.same <= 4 for c in report.checks), report.summary()
    assert [c.artifact for c in report.checks] == ["model.gguf", "adapter.gguf on SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert all(len(c.disagreements) == 4 - c.same for c in report.checks)
    saved = json.loads((tmp_path / "ollama" / "export_report.json").read_text())
    assert [c["same"] for c in saved["checks"]] == [c.same for c in report.checks]
    assert saved["flagged"] == report.flagged == any(c.flagged for c in report.checks)
    assert {c["runtime"] for c in saved["checks"]} == {"llama.cpp"}
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Answer briefly."""' in text
    assert render_ollama_template(OLLAMA_TEMPLATE, {"System": "S", "Prompt": "Q"}) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert render_ollama_template(OLLAMA_TEMPLATE, {"Prompt": "Q"}) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    # Nothing is overwritten.
    from tuning.export import ExportError

    with pytest.raises(ExportError, match="not empty"):
        export_model(gentle_adapter, base_model=BUNDLED, out_dir=tmp_path / "ollama", fmt="gguf", cache_dir=model_cache)


def test_an_export_is_flagged_when_it_answers_otherwise_and_accuracy_does_not_excuse_it():
    from tuning.export import Probe, _check

    probes = [Probe(f"q{i}", ("yes",)) for i in range(10)]
    reference = ["yes"] * 5 + ["no"] * 5  # the tuned model: 50% must_contain accuracy
    assert not _check("m", "r", probes, reference, list(reference)).flagged
    assert not _check("m", "r", probes, reference, reference[:8] + ["x", "y"]).flagged  # 8 of 10 the same
    reworded = ["yes, sure"] * 5 + ["nope"] * 5  # all different words, the same facts
    assert not _check("m", "r", probes, reference, reworded).flagged
    assert _check("m", "r", probes, reference, ["no"] * 10).flagged  # different and wrong
    wrong = ["no"] * 10
    assert _check("m", "r", probes, wrong, ["nah"] * 10).flagged  # 0% accuracy excuses nothing
    assert _check("m", "r", probes, reference, ["no"] * 10).disagreements[0] == {
        "question": "q0", "torch": "yes", "export": "no"}


def test_merged_and_adapter_exports_answer_like_the_version(tiny_model_dir, tmp_path):
    from inference_helpers import make_random_adapter

    from tuning.export import Probe, export_model

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "lora", seed=3)
    probes = [Probe(q) for q in QUESTIONS]
    for fmt in ("merged", "adapter"):
        report = export_model(adapter, base_model=tiny_model_dir, out_dir=tmp_path / fmt, fmt=fmt, probes=probes,
                              max_new_tokens=8)
        assert report.same == 3 and not report.flagged, report
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(report_files(tmp_path / "merged"))


def report_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def test_requests_submitted_together_answer_as_alone(model_cache, all_adapter):
    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.prompts import build_messages

    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, max_new_tokens=16, n_threads=2)
    try:
        alone = {q: engine.answer(q, adapter_dir=all_adapter).text for q in QUESTIONS}
        # Submitted together: decoded one after the other, the KV cache of a shared prompt prefix reused only
        # under the same adapter (a base-model request after them gets its own answer, not the adapter's).
        together = [engine.submit(build_messages(q), adapter_dir=all_adapter) for q in QUESTIONS * 2]
        base = engine.submit(build_messages(QUESTIONS[0]))
        assert [g.result().text for g in together] == [alone[q] for q in QUESTIONS * 2]
        assert base.result().text == engine.answer(QUESTIONS[0]).text
    finally:
        engine.close()



def test_a_long_answer_does_not_hold_back_other_adapters(model_cache, all_adapter, gentle_adapter):
    """One llama.cpp context per adapter, decoding in turns: requests on other adapters that arrive while a long
    answer is decoding get their first tokens and finish long before it (before, they waited for its end)."""
    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.prompts import build_messages

    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, n_threads=2)
    try:
        alone = {a: engine.answer(QUESTIONS[1], adapter_dir=a, max_new_tokens=8).text for a in (all_adapter, None)}
        long = engine.submit(build_messages("Count from one to two hundred, in words."), adapter_dir=gentle_adapter,
                             max_new_tokens=200, temperature=0.0)
        next(iter(long))  # it is decoding
        others = [engine.submit(build_messages(QUESTIONS[1]), adapter_dir=a, max_new_tokens=8) for a in alone]
        texts = [g.result().text for g in others]
        assert long.finished_at is None, "the short answers waited for the long one"
        assert texts == list(alone.values())  # decoded beside another context: the same answers as alone
        assert len(engine._contexts) == 3 and engine.resident_adapters[-1] == str(all_adapter.resolve())
        long.cancel()
        assert long.result().n_tokens < 200
    finally:
        engine.close()


def test_batched_requests_share_a_context_within_its_kv_cells(model_cache, all_adapter):
    """With max_batch_size > 1, requests of one adapter decode together in one context while its KV cells hold
    their prompts and answers; one that would not fit waits for room instead of failing."""
    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.prompts import build_messages

    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, n_threads=2, max_slots=1, max_batch_size=4, n_ctx=160)
    try:
        prompt = build_messages(QUESTIONS[0])
        pending = [engine.submit(prompt, adapter_dir=all_adapter, max_new_tokens=24) for _ in range(4)]
        results = [g.result() for g in pending]  # no "no room left in the KV cache"
        assert all(r.n_tokens > 0 for r in results)
        assert len(engine._contexts) == 1 and 1 <= engine.largest_batch <= 160 // (results[0].prompt_tokens + 24)
    finally:
        engine.close()


def test_a_burst_on_one_adapter_leaves_a_context_for_the_others(model_cache, all_adapter, gentle_adapter):
    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.prompts import build_messages

    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, n_threads=2, max_slots=2)
    try:
        count = build_messages("Count from one to two hundred, in words.")
        first = engine.submit(count, adapter_dir=gentle_adapter, max_new_tokens=200)
        next(iter(first))
        second = engine.submit(count, adapter_dir=gentle_adapter, max_new_tokens=200)  # waits: one context is kept
        other = engine.submit(build_messages(QUESTIONS[1]), adapter_dir=all_adapter, max_new_tokens=8).result()
        assert other.n_tokens > 0 and first.finished_at is None and second.first_token_at is None
        first.cancel()
        assert first.result().n_tokens < 200
        next(iter(second))  # the freed context takes the waiting request
        second.cancel()
        assert second.result().n_tokens < 200 and len(engine._contexts) == 2
    finally:
        engine.close()


def test_a_new_context_copies_the_prompt_prefix_of_another_on_the_same_adapter(model_cache, gentle_adapter):
    """A context that starts on an adapter takes the KV of the shared prompt prefix from another context on that
    adapter instead of evaluating it again; the answers are exactly those of a context that evaluated it all."""
    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.prompts import build_messages

    system = "You answer for ACME Parcel, a parcel delivery company in the Netherlands. Be brief and exact."
    cold = LlamaCppEngine(BUNDLED, cache_dir=model_cache, n_threads=2, max_slots=1, max_new_tokens=12)
    try:
        cold.load()
        alone = []
        for q in QUESTIONS[:2]:
            cold._contexts[0].clear()  # (the engine is idle) its whole prompt evaluated, nothing reused
            alone.append(cold.answer(build_messages(q, system_prompt=system), adapter_dir=gentle_adapter).text)
    finally:
        cold.close()
    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, n_threads=2, max_new_tokens=12)
    try:
        engine.answer(build_messages("Hello", system_prompt=system), adapter_dir=gentle_adapter)
        busy = engine.submit(build_messages("Count to one hundred.", system_prompt=system),
                             adapter_dir=gentle_adapter, max_new_tokens=200)
        next(iter(busy))  # the warm context is taken: the next requests start new contexts
        texts = [engine.submit(build_messages(q, system_prompt=system), adapter_dir=gentle_adapter).result().text
                 for q in QUESTIONS[:2]]
        busy.cancel()
        assert engine.prefix_copies >= 1 and texts == alone
    finally:
        engine.close()


def test_adapters_asked_in_turn_keep_their_own_warm_contexts(model_cache, all_adapter, gentle_adapter):
    """While fewer than max_slots contexts exist, a new adapter gets a new context rather than another adapter's
    warm cache (taking the least recently used one instead, 8 adapters on 7 contexts evicted each other in turn)."""
    from tuning.answering.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(BUNDLED, cache_dir=model_cache, n_threads=2, max_slots=3, max_new_tokens=2)
    try:
        for _ in range(2):
            for adapter in (all_adapter, gentle_adapter, None):
                engine.answer(QUESTIONS[0], adapter_dir=adapter)
        held = {c.adapter for c in engine._contexts}
        assert held == {str(all_adapter.resolve()), str(gentle_adapter.resolve()), None} and len(engine._contexts) == 3
        assert engine.adapter_loads == 2 and all(c.used for c in engine._contexts)
    finally:
        engine.close()
