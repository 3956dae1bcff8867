"""`tunebot generate`, `import-document` and `review` end to end through the CLI, on a real SQLite file."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, paraphrases_for

from bot.cli import main
from storage import Store, open_db
from storage.text import normalize_question
from tuning.data.importing import import_file

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "acme_faq.jsonl"


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "TUNEBOT_OPENAI_BASE_URL", "TUNEBOT_OPENAI_API_KEY",
                "TUNEBOT_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def faq_store(env):
    store = Store(open_db(env / "data" / "tunebot.db"))
    assistant = store.create_assistant("acme", owner_id=1)
    report = import_file(store, assistant.id, FAQ, approve=True)
    assert report.added >= 30
    return store, assistant


def test_generate_mutate_on_the_faq(faq_store, env):
    store, assistant = faq_store
    roots = store.list_examples(assistant.id)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bot", "generate", "--assistant", "acme", "--method", "mutate",
                           "--per-example", "5", "--json"], capture_output=True, text=True, cwd=env,
                          env={**__import__("os").environ}, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["runs"][0]["method"] == "mutate" and out["runs"][0]["status"] == "succeeded"
    made = store.list_examples(assistant.id, status="pending")
    assert len(made) == 5 * len(roots) and out["pending"] == len(made)
    per_parent = {}
    for ex in made:
        per_parent.setdefault(ex.parent_id, []).append(ex)
    assert all(len(v) == 5 for v in per_parent.values()) and len(per_parent) == len(roots)
    norms = [normalize_question(e.question) for e in store.list_examples(assistant.id)]
    assert len(norms) == len(set(norms))
    assert elapsed < 110  # local mutations need no model: well inside the run's 120 s limit on a loaded machine


def test_generate_defaults_to_mutate_and_needs_endpoint_for_paraphrase(faq_store, env, capsys):
    assert main(["generate", "--assistant", "acme", "--per-example", "2"]) == 0
    assert "mutate (local-mutations): succeeded" in capsys.readouterr().out
    assert main(["generate", "--assistant", "acme", "--method", "paraphrase"]) == 2
    assert "needs an OpenAI-compatible endpoint" in capsys.readouterr().err
    assert main(["generate", "--assistant", "nobody"]) == 2


def test_generate_paraphrase_against_fake_endpoint(faq_store, env, monkeypatch, capsys):
    store, assistant = faq_store
    with FakeOpenAI(default=paraphrases_for) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("TUNEBOT_GENERATOR_MAX_REQUESTS", "3")
        code = main(["generate", "--assistant", "acme", "--per-example", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and "budget spent: 3 requests" in captured.err
    run = json.loads(captured.out)["runs"][0]
    assert run["status"] == "stopped" and run["kept"] == 6 and run["requests"] == 3
    assert f"--resume {run['id']}" in captured.err


def test_auto_approve(faq_store, env, capsys):
    store, assistant = faq_store
    assert main(["generate", "--assistant", "acme", "--method", "mutate", "--per-example", "1", "--auto-approve"]) == 0
    assert store.count_examples(assistant.id, status="pending") == 0
    assert store.count_examples(assistant.id, source="synthetic", status="approved") == len(
        store.list_examples(assistant.id, roots_only=True))


def test_review_loop_reads_stdin(faq_store, env, monkeypatch, capsys):
    store, assistant = faq_store
    assert main(["generate", "--assistant", "acme", "--method", "mutate", "--per-example", "1"]) == 0
    pending = store.list_examples(assistant.id, status="pending")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nr\ns\ne\nWhat does a small parcel cost in NL?\n\nx\nq\n"))
    assert main(["review", "--assistant", "acme", "--by", "7"]) == 0
    out = capsys.readouterr().out
    assert "original:" in out and "approved 1, rejected 1, edited 1, skipped 1" in out
    assert store.get_example(pending[0].id).status == "approved"
    assert store.get_example(pending[0].id).reviewer_id == 7
    assert store.get_example(pending[1].id).status == "rejected"
    assert store.get_example(pending[2].id).status == "pending"
    edited = store.get_example(pending[3].id)
    assert edited.question == "What does a small parcel cost in NL?" and edited.status == "approved"
    assert "type a, r, e, s or q" in out


def test_review_answers_the_unanswered_questions_first(faq_store, env, monkeypatch, capsys):
    store, assistant = faq_store
    first = store.add_unanswered(assistant.id, "Do you deliver to Japan?")
    second = store.add_unanswered(assistant.id, "What's the weather?")
    third = store.add_unanswered(assistant.id, "Can I send a bike?")
    monkeypatch.setattr(sys, "stdin", io.StringIO("No, only within the EU.\nd\ns\nq\n"))
    assert main(["review", "--assistant", "acme", "--by", "7"]) == 0
    out = capsys.readouterr().out
    assert "Q: Do you deliver to Japan?" in out and "saved as approved example #" in out
    example = store.get_example(store.get_unanswered(first.id).example_id)
    assert (example.question, example.answer, example.status) == ("Do you deliver to Japan?",
                                                                   "No, only within the EU.", "approved")
    assert store.get_unanswered(second.id).status == "dismissed"
    assert [u.id for u in store.list_unanswered(assistant.id)] == [third.id]  # skipped: still open


def test_import_document(env, tmp_path, capsys):
    store = Store(open_db(env / "data" / "tunebot.db"))
    store.create_assistant("acme")
    doc = tmp_path / "terms.md"
    doc.write_text("# Terms\n\nACME Parcel delivers in two working days.\n", encoding="utf-8")
    assert main(["import-document", str(doc), "--assistant", "acme", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chunks"] == 1 and store.get_document(result["document_id"]).text.startswith("# Terms")
    (tmp_path / "x.exe").write_bytes(b"MZ")
    assert main(["import-document", str(tmp_path / "x.exe"), "--assistant", "acme"]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert main(["import-document", str(doc), "--assistant", "acme", "--generate"]) == 2
    assert "needs an OpenAI-compatible endpoint" in capsys.readouterr().err
