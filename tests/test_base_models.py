"""Base models users may pick (TUNEBOT_BASE_MODELS), one engine per model however it is written, and a bounded
number of engines (the least recently used closed)."""

from __future__ import annotations

import time

import pytest

from bot.app import App
from bot.config import Settings, SettingsError, load_settings
from inference_helpers import make_random_model_like
from tuning.models import display_name, model_key


def test_the_offered_models_are_the_default_then_the_admins_list(tmp_path):
    settings = load_settings({"TUNEBOT_BASE_MODEL": "bundled:smollm2-135m",
                              "TUNEBOT_BASE_MODELS": " HuggingFaceTB/SmolLM2-360M-Instruct, ,bundled:smollm2-135m,"
                                                     "HuggingFaceTB/SmolLM2-360M-Instruct"})
    assert settings.base_models == ("HuggingFaceTB/SmolLM2-360M-Instruct", "bundled:smollm2-135m")
    assert settings.offered_base_models == ("bundled:smollm2-135m", "HuggingFaceTB/SmolLM2-360M-Instruct")
    assert load_settings({}).offered_base_models == ("bundled:smollm2-135m",)
    toml = tmp_path / "tunebot.toml"
    toml.write_text('base_models = ["org/a", "org/b"]\n')
    assert load_settings({}, config_file=toml).base_models == ("org/a", "org/b")
    with pytest.raises(SettingsError, match="TUNEBOT_MAX_ENGINES"):
        load_settings({"TUNEBOT_MAX_ENGINES": "0"})


def test_a_model_has_one_key_however_it_is_written_and_users_see_no_paths(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spellings = [str(folder), str(folder) + "/", "models/tiny", "./models/../models/tiny"]
    assert {model_key(s) for s in spellings} == {str(folder.resolve())}
    assert model_key("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert model_key("bundled:smollm2-135m") == "bundled:smollm2-135m"
    assert {display_name(s) for s in spellings} == {"tiny"}
    assert display_name("/srv/models/x.gguf") == "x.gguf"
    assert display_name("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


@pytest.fixture(scope="module")
def three_models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [tiny_model_dir] + [make_random_model_like(tiny_model_dir, root / f"m{i}", seed=i) for i in (1, 2)]


def test_engines_are_keyed_by_the_resolved_model_and_bounded(three_models, tmp_path):
    default, first, second = three_models
    app = App(Settings(data_dir=tmp_path, base_model=default, max_engines=2))
    try:
        assert app.engine_for(first) is app.engine_for(first + "/")  # one engine, not one per spelling
        assert app.engine_for(None) is app.engine is app.engine_for(default)
        busy = app.engine_for(first)
        assert busy.answer("Hello?", max_new_tokens=2).n_tokens >= 1  # its inference thread runs
        assert busy._thread is not None
        other = app.engine_for(second)  # a third model: the least recently used other than the default goes
        assert set(app._engines) == {model_key(default), model_key(second)}
        deadline = time.monotonic() + 30
        while busy._thread is not None and time.monotonic() < deadline:  # closed in the background
            time.sleep(0.02)
        assert busy._thread is None
        assert app.engine_for(second) is other and app.engine_for(first) is not busy  # built again when asked
        assert set(app._engines) == {model_key(default), model_key(first)}
    finally:
        app.close_engines()
