"""`tunebot export-model` from the command line: a `train --out` folder or an assistant's version, checked."""

from __future__ import annotations

import json

import pytest
from inference_helpers import make_random_adapter

from bot.cli import main
from tuning.jobs.versions import register_candidate


@pytest.fixture
def env(monkeypatch, tmp_path, db_path, store):
    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNEBOT_DATABASE", str(db_path))
    monkeypatch.chdir(tmp_path)
    return store


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def train_out_folder(tiny_model_dir: str, folder) -> str:
    """What `tunebot train --data … --out` leaves that the export reads: the adapter, its config, its questions."""
    make_random_adapter(tiny_model_dir, folder, seed=5)
    (folder / "train_config.json").write_text(json.dumps({"config": {"base_model": tiny_model_dir},
                                                          "system_prompt": "Answer briefly."}))
    (folder / "fewshot_pool.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": "-"}) + "\n" for q in ("Where is my parcel?", "Do you open on Sundays?")))
    return str(folder)


def test_a_train_out_folder_exports_merged_and_is_checked(env, capsys, tiny_model_dir, tmp_path):
    folder = train_out_folder(tiny_model_dir, tmp_path / "model")
    code, out, err = run(capsys, "export-model", "--model", folder, "--format", "merged", "-o", str(tmp_path / "m"),
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["probes"] == 2 and report["checks"][0]["same"] == 2 and report["flagged"] is False
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "export_report.json").exists()
    code, _, err = run(capsys, "export-model", "--model", folder, "--format", "merged", "-o", str(tmp_path / "m"))
    assert code == 2 and "not empty" in err  # nothing overwritten


def test_an_assistants_version_exports_its_adapter(env, capsys, tiny_model_dir, tmp_path):
    acme = env.create_assistant("acme", owner_id=1, base_model=tiny_model_dir)
    env.add_example(acme.id, "Where is my parcel?", "Track it on acme.example.", status="approved")
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "v1", seed=6)
    version = register_candidate(env, acme.id, job_id=env.create_job("train", assistant_id=acme.id).id,
                                 adapter_path=adapter, base_model=tiny_model_dir, dataset_hash="h",
                                 hyperparameters={}, metrics={})
    code, _, err = run(capsys, "export-model", "--assistant", "acme", "--format", "adapter", "-o", str(tmp_path / "a"))
    assert code == 2 and "no active version" in err
    code, out, err = run(capsys, "export-model", "--assistant", "acme", "--version", str(version.id), "--format",
                         "adapter", "-o", str(tmp_path / "a"))
    assert code == 0, err
    assert "same answer on 1 of 1 probe questions" in out and "ok" in out
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    other = env.create_assistant("initech", owner_id=1)
    code, _, err = run(capsys, "export-model", "--assistant", "initech", "--version", str(version.id), "--format",
                       "adapter", "-o", str(tmp_path / "b"))
    assert code == 2 and "not initech's" in err and other.id


def test_gguf_needs_a_gguf_base(env, capsys, tiny_model_dir, tmp_path):
    folder = train_out_folder(tiny_model_dir, tmp_path / "model")
    code, _, err = run(capsys, "export-model", "--model", folder, "--format", "gguf", "-o", str(tmp_path / "g"))
    assert code == 2 and "GGUF export needs a GGUF base model" in err and "convert_hf_to_gguf" in err
