"""`tunebot apikey …` and `tunebot chat` with piped standard input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bot.cli import main
from inference_helpers import make_random_adapter
from storage import Store, open_db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    values = {"TUNEBOT_DATA_DIR": str(tmp_path / "data"), "TUNEBOT_BASE_MODEL": tiny_model_dir,
              "TUNEBOT_MAX_NEW_TOKENS": "6", "TUNEBOT_LOG_LEVEL": "WARNING"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    store = Store(open_db(tmp_path / "data" / "tunebot.db"))
    acme = store.create_assistant("acme", system_prompt="You answer for ACME.", owner_id=1)
    store.add_example(acme.id, "How long does delivery take?", "Two days.")
    return {"store": store, "acme": acme, "env": {**os.environ, **values}}


def test_apikey_create_list_revoke(env, capsys):
    assert main(["apikey", "create", "--assistant", "acme", "--name", "ci", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("tb-") and env["store"].lookup_api_key(created["key"]).id == created["id"]
    assert main(["apikey", "list", "--assistant", "acme", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"id": created["id"], "prefix": created["prefix"], "name": "ci",
                       "created_at": listed[0]["created_at"], "revoked_at": None}]
    assert created["key"] not in json.dumps(listed)
    assert main(["apikey", "revoke", str(created["id"]), "--assistant", "acme"]) == 0
    assert env["store"].lookup_api_key(created["key"]) is None
    capsys.readouterr()
    assert main(["apikey", "revoke", "999", "--assistant", "acme"]) == 2
    assert "no API key #999" in capsys.readouterr().err
    assert main(["apikey", "list", "--assistant", "nobody"]) == 2


def test_chat_json_modes_and_compare(env, capsys, monkeypatch, tmp_path, tiny_model_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("How long does delivery take?\n\nWho are you?\n"))
    assert main(["chat", "--assistant", "acme", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(l["question"], l["mode"]) for l in lines] == [("How long does delivery take?", "fewshot"),
                                                            ("Who are you?", "fewshot")]
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "v1", seed=5)
    store = env["store"]
    store.activate_version(store.add_model_version(env["acme"].id, adapter_path=adapter, base_model=tiny_model_dir).id)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\n"))
    assert main(["chat", "--assistant", "acme", "--compare", "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["mode"] for a in answers] == ["base", "fewshot", "tuned", "grounded"]
    assert answers[2]["answer"] != answers[0]["answer"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--assistant", "acme", "--mode", "tuned"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--assistant", "acme", "--mode", "version"]) == 2
    assert "needs a version id" in capsys.readouterr().err


def test_chat_streams_answers_for_piped_stdin(env):
    """The real console entry point in a subprocess, stdin piped: one streamed answer line per question."""
    result = subprocess.run([sys.executable, "-m", "bot", "chat", "--assistant", "acme", "--mode", "base"],
                            input="Hello?\nHow long does delivery take?\n", capture_output=True, text=True,
                            env=env["env"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2  # one line ends each answer (the random model's answers may add more)
    rows = list(env["store"].db.query("select role, mode from messages order by id"))
    assert rows == [{"role": "user", "mode": "base"}, {"role": "assistant", "mode": "base"}] * 2


def test_demo_runs_the_whole_loop_on_the_tiny_model(env, capsys, monkeypatch):
    """The wiring of `tunebot demo` (import, mutate, approve, train, evaluate, answer) on a random tiny model."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: three sample answers instead of a chat
    assert main(["demo", "--epochs", "1", "--per-example", "1", "--max-examples", "6", "--max-eval", "3"]) == 0
    out = capsys.readouterr().out
    assert "imported 6 approved examples" in out and "approved 6" in out
    for mode in ("base", "fewshot", "lookup", "tuned", "grounded"):
        assert f"| {mode} |" in out
    assert "3 out of scope" in out and "recall@1" in out
    assert out.count("\nQ: ") == 3 and "sources: #" in out
    store = env["store"]
    demo = store.assistant_by_name("acme-demo")
    version = store.get_model_version(demo.active_version_id)
    assert (os.path.exists(os.path.join(version.adapter_path, "adapter_config.json")))
    assert store.count_examples(demo.id, status="approved") == 12
