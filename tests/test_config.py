"""Settings: defaults, environment, TOML file, errors that name the variable, secrets never shown."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import Settings, SettingsError, env_name, load_settings


@pytest.fixture(autouse=True)
def clean_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_settings also looks for ./tunebot.toml


def test_defaults():
    s = load_settings({})
    assert s == Settings()
    assert s.data_dir == Path("./data") and s.database_path == Path("./data/tunebot.db")
    assert s.base_model == "bundled:smollm2-135m"
    assert s.artifacts == str(Path("./data/artifacts")) and s.models_cache == Path("./data/models")
    assert (s.max_field_chars, s.api_host, s.api_port, s.default_language) == (4000, "127.0.0.1", 0, "en")
    for f in dataclasses.fields(Settings):  # every setting has a default
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def test_environment_overrides_with_types():
    s = load_settings({
        "TUNEBOT_DATA_DIR": "/srv/tunebot", "TUNEBOT_BASE_MODEL": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "TUNEBOT_ADMINS": "1, 2;3", "TUNEBOT_AUTO_PROMOTE": "yes", "TUNEBOT_TEMPERATURE": "0.7",
        "TUNEBOT_API_PORT": "8080", "TUNEBOT_LOG_LEVEL": "debug", "TUNEBOT_QUIET_HOURS": "09:00-18:00",
        "TUNEBOT_DATABASE": "/tmp/x.db",
    })
    assert s.data_dir == Path("/srv/tunebot") and s.database_path == Path("/tmp/x.db")
    assert s.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert (s.admins, s.auto_promote, s.temperature, s.api_port, s.log_level, s.quiet_hours) == (
        (1, 2, 3), True, 0.7, 8080, "DEBUG", "09:00-18:00")


def test_standard_aliases_and_prefixed_name_wins():
    s = load_settings({"TELEGRAM_BOT_TOKEN": "123:abc", "OPENAI_API_KEY": "sk-1", "OPENAI_BASE_URL": "http://x"})
    assert (s.telegram_token, s.openai_api_key, s.openai_base_url) == ("123:abc", "sk-1", "http://x")
    s = load_settings({"TELEGRAM_BOT_TOKEN": "alias", "TUNEBOT_TELEGRAM_TOKEN": "prefixed"})
    assert s.telegram_token == "prefixed"


def test_toml_file_and_precedence(tmp_path):
    (tmp_path / "tunebot.toml").write_text(
        '[tunebot]\nbase_model = "from-file"\nmax_new_tokens = 64\nadmins = [7, 8]\nauto_promote = true\n',
        encoding="utf-8")
    s = load_settings({})  # found in the working directory
    assert (s.base_model, s.max_new_tokens, s.admins, s.auto_promote) == ("from-file", 64, (7, 8), True)
    s = load_settings({"TUNEBOT_MAX_NEW_TOKENS": "32"})  # environment beats the file
    assert (s.base_model, s.max_new_tokens) == ("from-file", 32)
    other = tmp_path / "other.toml"
    other.write_text('base_model = "flat-file"\n', encoding="utf-8")  # a table is optional
    assert load_settings({"TUNEBOT_CONFIG": str(other)}).base_model == "flat-file"
    assert load_settings({}, config_file=other).base_model == "flat-file"


@pytest.mark.parametrize("env, message", [
    ({"TUNEBOT_MAX_FIELD_CHARS": "lots"}, "TUNEBOT_MAX_FIELD_CHARS: expected a whole number, got 'lots'"),
    ({"TUNEBOT_TEMPERATURE": "hot"}, "TUNEBOT_TEMPERATURE: expected a number"),
    ({"TUNEBOT_AUTO_PROMOTE": "maybe"}, "TUNEBOT_AUTO_PROMOTE: expected true or false"),
    ({"TUNEBOT_ADMINS": "alice"}, "TUNEBOT_ADMINS: expected a comma-separated list of Telegram user ids"),
    ({"TUNEBOT_API_PORT": "-1"}, "TUNEBOT_API_PORT: must not be negative"),
    ({"TUNEBOT_EXECUTOR": "slurm"}, "TUNEBOT_EXECUTOR: expected one of local, ray, got 'slurm'"),
    ({"TUNEBOT_DEFAULT_LANGUAGE": "de"}, "TUNEBOT_DEFAULT_LANGUAGE: expected one of en, ru"),
    ({"TUNEBOT_QUIET_HOURS": "25:00-26:00"}, "TUNEBOT_QUIET_HOURS: expected quiet hours like 09:00-18:00"),
    ({"TUNEBOT_DATA_DIR": ""}, "TUNEBOT_DATA_DIR: expected a valid value"),
    ({"TUNEBOT_CONFIG": "missing.toml"}, "TUNEBOT_CONFIG: file 'missing.toml' does not exist"),
])
def test_invalid_values_name_the_variable(env, message):
    with pytest.raises(SettingsError) as exc:
        load_settings(env)
    assert message in str(exc.value)


def test_invalid_toml_names_file_and_setting(tmp_path):
    path = tmp_path / "tunebot.toml"
    path.write_text("max_new_tokens = 'many'\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="tunebot.toml: max_new_tokens: expected a whole number"):
        load_settings({})
    path.write_text("base_modle = 'typo'\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) base_modle"):
        load_settings({})
    path.write_text("this is = not toml [", encoding="utf-8")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({})


def test_secrets_are_not_echoed():
    s = load_settings({"TELEGRAM_BOT_TOKEN": "123456:SECRET-token", "OPENAI_API_KEY": "sk-SECRETKEY"})
    assert "SECRET" not in repr(s) and "SECRET" not in str(s)


def test_secret_in_invalid_toml_value_is_masked(tmp_path):
    (tmp_path / "tunebot.toml").write_text("telegram_token = 'x'\nopenai_api_key = 'sk-SECRET'\n"
                                           "generator_concurrency = 'sk-SECRET'\n", encoding="utf-8")
    with pytest.raises(SettingsError) as exc:
        load_settings({})
    assert "generator_concurrency" in str(exc.value)
    # the offending value is shown (it is not a secret setting), secrets that are fine never appear
    assert str(exc.value).count("sk-SECRET") == 1 and "'x'" not in str(exc.value)


def test_every_setting_has_an_environment_variable():
    from bot.config import _CHOICES

    special = {"quiet_hours": "01:00-02:00", "auto_promote": "true"}
    for f in dataclasses.fields(Settings):
        default = getattr(Settings(), f.name)
        if f.name in _CHOICES:
            value = next(c for c in _CHOICES[f.name] if c != default)
        elif f.name in special:
            value = special[f.name]
        elif f.type == "bool":
            value = "false" if default else "true"
        else:
            value = "7" if f.type in ("int", "float", "tuple[int, ...]") else "value"
        assert getattr(load_settings({env_name(f.name): value}), f.name) != default, f.name


def test_cli_reports_invalid_setting_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("TUNEBOT_MAX_FIELD_CHARS", "many")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123456:SECRET-token")
    assert main(["assistants", "list"]) == 2
    err = capsys.readouterr().err
    assert err == "tunebot: error: TUNEBOT_MAX_FIELD_CHARS: expected a whole number, got 'many'\n"


def test_torch_threads_caps_this_process_and_the_job_processes_it_starts(monkeypatch):
    import os

    import torch

    from bot.app import configure_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "")
    before = torch.get_num_threads()
    try:
        configure_threads(Settings())  # 0: untouched
        assert os.environ["OMP_NUM_THREADS"] == "" and torch.get_num_threads() == before
        configure_threads(Settings(torch_threads=1))
        assert os.environ["OMP_NUM_THREADS"] == "1"  # inherited by the worker's job processes
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
