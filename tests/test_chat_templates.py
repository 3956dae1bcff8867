"""Base models without a chat template (pretrained ones such as Gemma 3 270M) get a default one for training and
answers, or a one-line error; never a traceback from apply_chat_template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tuning.errors import ModelLoadError


def _without_template(model_dir: str, out: Path, **tokenizer_config) -> str:
    """A copy of a model folder whose tokenizer has no chat template (and optionally other settings)."""
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("chat_template", None)
    config.update(tokenizer_config)
    path.write_text(json.dumps(config))
    return str(out)


def test_a_base_without_a_template_gets_labelled_turns_ending_in_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tuning.data.dataset import IGNORE, encode_item
    from tuning.models import GENERIC_TEMPLATE, load_tokenizer

    folder = _without_template(tiny_model_dir, tmp_path / "pretrained")
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    tok = load_tokenizer(folder)
    assert tok.chat_template.endswith(GENERIC_TEMPLATE.split("}}", 1)[1])
    enc = encode_item(tok, "When does the ferry leave?", "At 06:45.", system_prompt="You answer for Harbor Line.")
    text = tok.decode(enc.input_ids)
    assert text.index("You answer for Harbor Line.") < text.index("### Question:\nWhen does the ferry leave?")
    answer = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert tok.decode(answer) == "At 06:45." + tok.eos_token and answer[-1] == tok.eos_token_id


def test_a_template_less_tokenizer_is_a_one_line_error_not_a_traceback(tiny_model_dir):
    from transformers import AutoTokenizer

    from tuning.data.dataset import encode_item
    from tuning.models import use_default_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(ModelLoadError, match="no chat template"):
        encode_item(tok, "q", "a")  # not loaded through load_tokenizer: said in one line
    tok.eos_token = None
    with pytest.raises(ModelLoadError, match="no end-of-sequence token"):
        use_default_chat_template(tok)
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ModelLoadError, match="System role not supported"):
        encode_item(tok, "q", "a")


def test_cli_trains_a_template_less_base_with_the_default_template(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from bot.cli import main

    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    folder = _without_template(tiny_model_dir, tmp_path / "pretrained")
    data = tmp_path / "faq.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"When is depot {i} open?", "answer": f"At {7 + i}:00."})
                              for i in range(4)))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--base-model", folder,
                 "--epochs", "1", "--augment", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] >= 1
    # a base that cannot mark the end of an answer at all: one line, exit code 2
    broken = _without_template(tiny_model_dir, tmp_path / "no-eos", eos_token=None)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m2"), "--base-model", broken,
                 "--epochs", "1", "--augment", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no chat template and no end-of-sequence token" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
