"""Base model loading: bundled GGUF, cache, clear errors."""

import time

import pytest

from tuning.errors import ModelLoadError
from tuning.models import load_base_model, resolve


def test_bundled_loads_from_cache_fast(model_cache, bundled_model_dir):
    start = time.perf_counter()
    model, tok = load_base_model("bundled:smollm2-135m", cache_dir=model_cache)
    elapsed = time.perf_counter() - start
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert elapsed < 10, f"cached load took {elapsed:.1f}s"


def test_tiny_folder_loads(tiny_model_dir):
    model, tok = load_base_model(tiny_model_dir)
    assert model.config.hidden_size == 64
    assert tok.pad_token is not None


@pytest.mark.parametrize("spec, message", [
    ("bundled:nope", "unknown bundled model"),
    ("/no/such/file.gguf", "does not exist"),
    ("not a model !!", "neither a hub id"),
])
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve(spec)


def test_hub_ids_are_kept():
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve(str(tmp_path))
