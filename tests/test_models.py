"""Base model loading: bundled GGUF, cache, clear errors."""

import logging
from pathlib import Path

import pytest

from tuning.errors import ModelLoadError
from tuning.models import load_base_model, resolve


def test_bundled_loads_from_its_cached_plain_weights(model_cache, bundled_model_dir, caplog):
    # What makes the second load fast, observed instead of timed (a loaded machine is slow either way):
    # no second dequantization, and the weights come from the cached folder, not from the GGUF.
    cached = Path(bundled_model_dir)
    files = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}
    with caplog.at_level(logging.INFO, logger="tuning.models"):
        model, tok = load_base_model("bundled:smollm2-135m", cache_dir=model_cache)
    assert "dequantizing" not in caplog.text
    assert Path(model.config.name_or_path) == cached
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "hf_quantizer", None)
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == files  # read, not rewritten
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


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
