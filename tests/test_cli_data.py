"""The data commands of the `tunebot` CLI, run in-process (and --help once through a real process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main
from storage import Store, open_db

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def acme(data_dir, capsys) -> str:
    assert main(["assistants", "create", "acme", "--system-prompt", "You answer for ACME Parcel."]) == 0
    capsys.readouterr()
    return "acme"


def db(data_dir) -> Store:
    return Store(open_db(data_dir / "tunebot.db"))


def test_create_and_list_assistants(data_dir, capsys, monkeypatch):
    monkeypatch.setenv("TUNEBOT_BASE_MODEL", "some/hub-model")
    assert main(["assistants", "create", "acme", "--description", "parcels", "--owner", "42"]) == 0
    assert "created assistant 'acme'" in capsys.readouterr().out
    assert main(["assistants", "create", "clinic", "--base-model", "bundled:smollm2-135m", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["name"] == "clinic" and created["base_model"] == "bundled:smollm2-135m"
    assert main(["assistants", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["base_model"], a["examples"]) for a in listed] == [
        ("acme", "some/hub-model", 0), ("clinic", "bundled:smollm2-135m", 0)]
    assert db(data_dir).role_of(listed[0]["id"], 42) == "owner"
    assert main(["assistants", "list"]) == 0
    table = capsys.readouterr().out
    assert "acme" in table and "clinic" in table and "some/hub-model" in table


def test_duplicate_assistant_name_is_a_one_line_error(acme, capsys):
    assert main(["assistants", "create", "acme"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "tunebot: error: an assistant named 'acme' already exists"


def test_empty_list_says_how_to_create(data_dir, capsys):
    assert main(["assistants", "list"]) == 0
    assert "tunebot assistants create" in capsys.readouterr().out


def test_import_17_of_20_then_reimport_adds_nothing(acme, data_dir, capsys):
    assert main(["import", str(EXAMPLES / "bad_lines.jsonl"), "--assistant", "acme"]) == 1
    out = capsys.readouterr().out
    assert "Added 17 examples (pending review)." in out
    assert "Skipped 3 bad lines:" in out
    for line, reason in ((4, "invalid JSON"), (11, 'missing "answer"'), (17, '"answer" must be a string')):
        assert f"line {line}: {reason}" in out
    store = db(data_dir)
    aid = store.assistant_by_name("acme").id
    assert store.count_examples(aid, status="pending") == 17

    assert main(["import", str(EXAMPLES / "bad_lines.jsonl"), "--assistant", "acme", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 0 and len(report["duplicates"]) == 17
    assert [e["line"] for e in report["errors"]] == [4, 11, 17]
    assert store.count_examples(aid) == 17

    assert main(["import", str(EXAMPLES / "bad_lines.jsonl"), "--assistant", "acme"]) == 1
    assert capsys.readouterr().out.startswith("Nothing new")


def test_import_approve_clean_file_exits_0(acme, data_dir, capsys):
    assert main(["import", str(EXAMPLES / "acme_faq.jsonl"), "--assistant", "acme", "--approve"]) == 0
    assert "Added 40 examples (approved)." in capsys.readouterr().out
    assert db(data_dir).count_examples(1, status="approved") == 40


def test_import_csv_from_stdin(acme, data_dir, capsys, monkeypatch):
    import io

    stdin = io.TextIOWrapper(io.BytesIO("вопрос;ответ\nКак дела?;Хорошо.\n".encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["import", "-", "--assistant", "acme"]) == 0
    assert [e.question for e in db(data_dir).list_examples(1)] == ["Как дела?"]


@pytest.mark.parametrize("argv, message", [
    (["import", "nope.jsonl", "--assistant", "acme"], "file not found: nope.jsonl"),
    (["import", str(EXAMPLES / "acme_faq.jsonl"), "--assistant", "ghost"], "no assistant named 'ghost'"),
    (["export", "--assistant", "ghost"], "no assistant named 'ghost'"),
    (["stats", "--assistant", "ghost"], "no assistant named 'ghost'"),
])
def test_bad_input_exit_2_with_one_line(acme, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tunebot: error: ") and message in err


def test_binary_file_is_rejected(acme, tmp_path, capsys):
    pdf = tmp_path / "faq.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    assert main(["import", str(pdf), "--assistant", "acme"]) == 2
    assert "is a PDF document" in capsys.readouterr().err


def test_upload_size_limit(acme, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEBOT_MAX_UPLOAD_MB", "0.001")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"question": "q", "answer": "a" * 3000}) + "\n")
    assert main(["import", str(big), "--assistant", "acme"]) == 2
    assert "the limit is 0.001 MB" in capsys.readouterr().err


def test_over_long_field_limit_comes_from_settings(acme, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEBOT_MAX_FIELD_CHARS", "50")
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a" * 51}) + "\n")
    assert main(["import", str(path), "--assistant", "acme"]) == 1
    assert 'line 1: "answer" is 51 characters long; the limit is 50' in capsys.readouterr().out


def test_export_formats_and_status(acme, data_dir, tmp_path, capsys):
    main(["import", str(EXAMPLES / "acme_faq.jsonl"), "--assistant", "acme", "--approve"])
    main(["import", str(EXAMPLES / "acme_eval.jsonl"), "--assistant", "acme"])
    capsys.readouterr()
    assert main(["export", "--assistant", "acme", "--format", "openai"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 40 and "exported 40 examples" in captured.err
    assert lines[0]["messages"][0] == {"role": "system", "content": "You answer for ACME Parcel."}
    out = tmp_path / "all.jsonl"
    assert main(["export", "--assistant", "acme", "--status", "all", "-o", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 80
    assert not out.with_name("all.jsonl.part").exists()

    # round trip through the CLI: export -> import into a fresh assistant gives the same examples
    main(["assistants", "create", "copy"])
    assert main(["import", str(out), "--assistant", "copy", "--approve"]) == 0
    store = db(data_dir)
    a, b = store.assistant_by_name("acme").id, store.assistant_by_name("copy").id
    assert [(e.question, e.answer, e.split, e.must_contain) for e in store.list_examples(a)] == \
           [(e.question, e.answer, e.split, e.must_contain) for e in store.list_examples(b)]


def test_export_rejects_unknown_format(acme, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--assistant", "acme", "--format", "xml"])
    assert exc.value.code == 2


def test_stats_text_and_json(acme, capsys):
    main(["import", str(EXAMPLES / "ru_faq.jsonl"), "--assistant", "acme", "--approve"])
    main(["import", str(EXAMPLES / "bad_lines.jsonl"), "--assistant", "acme"])
    capsys.readouterr()
    assert main(["stats", "--assistant", "acme", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total"] == 47
    assert stats["by_status"] == {"approved": 30, "pending": 17}
    assert stats["by_source"] == {"import": 47} and stats["by_split"] == {"train": 47}
    assert stats["approved_tokens_estimate"] > 2500  # ~2550 real tokens of Russian text alone
    assert main(["stats", "--assistant", "acme"]) == 0
    text = capsys.readouterr().out
    assert "47 examples" in text and "approved 30, pending 17" in text and "tokens" in text


def test_help_of_every_data_command(capsys):
    for argv in (["--help"], ["assistants", "--help"], ["assistants", "create", "--help"], ["import", "--help"],
                 ["export", "--help"], ["stats", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--approve" in capsys.readouterr().out


def test_console_script_and_python_m_bot_start(tmp_path):
    env = {**os.environ, "TUNEBOT_DATA_DIR": str(tmp_path / "data")}
    script = Path(sys.executable).parent / "tunebot"
    for argv in ([str(script), "--help"], [sys.executable, "-m", "bot", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage: tunebot" in done.stdout and "import" in done.stdout
