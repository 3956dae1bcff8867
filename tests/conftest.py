"""Shared fixtures: real SQLite stores in tmp_path, the bundled model cache, a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import Store, open_db

ROOT = Path(__file__).resolve().parent.parent
# Dequantized bundled weights are cached across test sessions (like a user's data dir would).
MODEL_CACHE = Path(os.environ.get("TUNEBOT_TEST_CACHE", ROOT / ".cache" / "test-models"))
BUNDLED = "bundled:smollm2-135m"


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "tunebot.db"


@pytest.fixture
def store(db_path) -> Store:
    return Store(open_db(db_path))


@pytest.fixture
def assistant(store):
    return store.create_assistant("acme", system_prompt="You answer for ACME Logistics.", owner_id=1)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """The CLI's environment: a fresh data dir, no config file (e2e modules define their own)."""
    monkeypatch.chdir(tmp_path)  # no stray ./tunebot.toml
    monkeypatch.delenv("TUNEBOT_CONFIG", raising=False)
    monkeypatch.delenv("TUNEBOT_DATABASE", raising=False)
    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture(scope="session")
def model_cache() -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE


@pytest.fixture(scope="session")
def bundled_model_dir(model_cache) -> str:
    """The bundled SmolLM2-135M as a plain transformers folder (dequantized once)."""
    from tuning.models import materialize

    return materialize(BUNDLED, model_cache)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_dir) -> str:
    """A tiny random-weight Llama with the bundled tokenizer (and its chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
