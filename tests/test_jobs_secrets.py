"""Secrets: a job process starts without the bot's tokens and keys unless its kind needs them, and the
larger model's API key stays out of reprs (logs, tracebacks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuning.jobs import Worker
from jobs_helpers import add_examples

SECRETS = {"TELEGRAM_BOT_TOKEN": "123:telegram-secret", "OPENAI_API_KEY": "sk-openai-secret",
           "TUNEBOT_TELEGRAM_TOKEN": "456:tunebot-telegram-secret", "TUNEBOT_OPENAI_API_KEY": "sk-tunebot-secret"}


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (Linux)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


@pytest.mark.parametrize("kind, needed", [("train", set()), ("eval", set()),
                                          ("generate", {"OPENAI_API_KEY", "TUNEBOT_OPENAI_API_KEY"})])
def test_a_job_process_gets_only_the_secrets_its_kind_needs(monkeypatch, db_path, store, assistant, tmp_path,
                                                            kind, needed):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_TOKEN", "hf-for-a-gated-base-model")  # not the bot's: a job may need it
    add_examples(store, assistant.id, 2)
    job = store.create_job(kind, assistant_id=assistant.id)
    worker = Worker(db_path, artifacts=tmp_path / "art", gpus=0, shutdown_grace_s=2.0)
    try:
        worker.run_once()  # starts the job's process
        env = environ_of(store.get_job(job.id).pid)
    finally:
        worker.shutdown()
    assert {name for name in SECRETS if name in env} == needed
    assert all(env[name] == SECRETS[name] for name in needed)
    assert env["HF_TOKEN"] == "hf-for-a-gated-base-model" and env["CUDA_VISIBLE_DEVICES"] == ""


def test_the_generator_api_key_is_not_in_the_config_repr():
    from tuning.data.synthetic import ClientConfig

    config = ClientConfig(base_url="http://127.0.0.1:9/v1", api_key="sk-do-not-log-me")
    assert "sk-do-not-log-me" not in repr(config) and "127.0.0.1:9" in repr(config)
    assert config.api_key == "sk-do-not-log-me"
