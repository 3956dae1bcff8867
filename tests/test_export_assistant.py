"""`export-model --format assistant` and `serve --assistant-dir`: a folder that answers as the chat does, asked
through the official `openai` client, checked against its manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from inference_helpers import ServerThread, make_random_adapter
from openai import OpenAI

from bot.cli import main
from tuning.answering.api import create_api_app
from tuning.answering.engine import Engine
from tuning.answering.service import ABSTAIN_TEXT, answer_question
from tuning.export_assistant import (MANIFEST, AssistantDirError, chat_answers, export_assistant,
                                     load_assistant_dir, source_from_version)
from tuning.grounding import Grounding, confidence
from tuning.retrieval import AssistantIndexes, Retriever, docs_from_pairs

IN_SCOPE = "where's my parcel right now, please?"
OUT_OF_SCOPE = "Who won the football world cup in 1998?"
FACTS = [("Where is my parcel?", "Track it on acme.example/track with your 10-digit number."),
         ("Do you deliver on Sundays?", "No, we deliver Monday to Saturday."),
         ("How much does a small parcel cost?", "A small parcel costs 4.90 euros."),
         ("Can I change the delivery address?", "Yes, until the parcel leaves the depot.")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir, max_new_tokens=8)
    eng.load()
    yield eng
    eng.close()


@pytest.fixture
def acme(monkeypatch, tmp_path, db_path, store, tiny_model_dir):
    """A trained (random-weight) grounded version whose "I don't know" threshold lies between the two questions."""
    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TUNEBOT_DATABASE", str(db_path))
    monkeypatch.setenv("TUNEBOT_BASE_MODEL", tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    assistant = store.create_assistant("acme", system_prompt="You answer for ACME Parcel.", owner_id=1,
                                       base_model=tiny_model_dir)
    ids = [store.add_example(assistant.id, q, a).id for q, a in FACTS]
    store.add_example(assistant.id, "where is my package at??", FACTS[0][1], parent_id=ids[0], source="synthetic",
                      method="mutation:typo")
    store.add_example(assistant.id, "Is there delivery on Sunday?", FACTS[1][1], split="test",
                      must_contain=["Monday to Saturday"])
    indexes = AssistantIndexes(tmp_path / "data" / "retrieval")  # the chat's: the default embedder, as the CLI's
    retriever = indexes.get(store, assistant.id)
    inside, outside = (confidence(retriever.search(q, 1)) for q in (IN_SCOPE, OUT_OF_SCOPE))
    assert inside > outside
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "v1", seed=11)
    Grounding(recipe="grounded", k=2, threshold=round((inside + outside) / 2, 4), no_answer_above=0.5,
              calibrated_on=4, abstain_by="retrieval").save(adapter)
    (Path(adapter) / "train_config.json").write_text(json.dumps({"config": {"base_model": tiny_model_dir},
                                                                 "system_prompt": "You answer for ACME Parcel."}))
    version = store.add_model_version(assistant.id, adapter_path=adapter, base_model=tiny_model_dir)
    store.activate_version(version.id)
    return {"store": store, "assistant": store.get_assistant(assistant.id), "version": version, "indexes": indexes,
            "adapter": adapter}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def export(capsys, tmp_path, *which) -> Path:
    out = tmp_path / "exported"
    code, stdout, err = run(capsys, "export-model", *(which or ("--assistant", "acme")), "--format", "assistant",
                            "-o", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["path"] == str(out)
    return out


def test_the_served_folder_answers_as_the_chat_does(acme, engine, capsys, tmp_path):
    store, assistant = acme["store"], acme["assistant"]
    chat = {q: answer_question(store, engine, assistant.id, q, record=False, indexes=acme["indexes"])
            for q in (IN_SCOPE, OUT_OF_SCOPE)}
    assert chat[IN_SCOPE].mode == "grounded" and not chat[IN_SCOPE].abstained and chat[IN_SCOPE].text
    assert chat[OUT_OF_SCOPE].abstained and chat[OUT_OF_SCOPE].text == ABSTAIN_TEXT
    closed_book = answer_question(store, engine, assistant.id, IN_SCOPE, mode="tuned", record=False)
    assert closed_book.text != chat[IN_SCOPE].text  # the retrieved examples in the prompt make the difference

    out = export(capsys, tmp_path)
    served = load_assistant_dir(out, state_dir=tmp_path / "state")
    assert served.new_key and served.base_model == assistant.base_model
    with ServerThread(create_api_app(served.store, engine, indexes=served.indexes)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=served.new_key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()][0] == "acme"

        def ask(question: str, **kwargs):
            return client.chat.completions.create(model="acme", messages=[{"role": "user", "content": question}],
                                                  **kwargs)

        assert ask(IN_SCOPE).choices[0].message.content == chat[IN_SCOPE].text
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(IN_SCOPE, stream=True) if c.choices)
        assert streamed.strip() == chat[IN_SCOPE].text
        assert ask(OUT_OF_SCOPE).choices[0].message.content == ABSTAIN_TEXT
    unanswered = served.store.list_unanswered(served.assistant.id)
    assert [u.question for u in unanswered] == [OUT_OF_SCOPE]  # queued in the folder's own store


def test_the_manifest_lists_every_file_with_its_sha256(acme, capsys, tmp_path):
    out = export(capsys, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert {"adapter/adapter_model.safetensors", "adapter/grounding.json", "adapter/train_config.json",
            "retrieval/docs.jsonl", "retrieval/terms.npz", "retrieval/embeddings.npy", "retrieval/meta.json",
            "examples.jsonl", "system_prompt.txt"} <= on_disk
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest() and entry["what"]
    assert (manifest["format_version"], manifest["assistant"], manifest["version_id"], manifest["base_model"]) == \
        (1, "acme", acme["version"].id, acme["assistant"].base_model)
    assert manifest["embedder"] == json.loads((out / "retrieval/meta.json").read_text())["embedder"]
    assert manifest["created_at"].endswith("Z")
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train", "test"}
    assert (out / "system_prompt.txt").read_text() == "You answer for ACME Parcel."
    code, _, err = run(capsys, "export-model", "--assistant", "acme", "--format", "assistant", "-o", str(out))
    assert code == 2 and "not empty" in err  # nothing overwritten


@pytest.mark.parametrize("damage", ["tamper", "delete"])
def test_a_damaged_folder_is_refused_with_one_line(acme, capsys, tmp_path, damage):
    out = export(capsys, tmp_path)
    target = out / "retrieval" / "docs.jsonl"
    if damage == "tamper":
        target.write_text(target.read_text().replace("Saturday", "Sunday"))
    else:
        target.unlink()
    code, stdout, err = run(capsys, "serve", "--assistant-dir", str(out))
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "retrieval/docs.jsonl" in err
    assert ("does not match its sha256" if damage == "tamper" else "is missing") in err
    assert not (out / ".serve").exists()  # nothing was loaded
    code, _, err = run(capsys, "serve", "--assistant-dir", str(tmp_path))
    assert code == 2 and "not an assistant folder" in err
    code, _, err = run(capsys, "serve", "--new-api-key")
    assert code == 2 and "go with --assistant-dir" in err


def test_a_later_start_keeps_its_store_and_key(acme, capsys, tmp_path):
    out = export(capsys, tmp_path)
    first = load_assistant_dir(out)
    again = load_assistant_dir(out)
    assert again.new_key is None and again.store.lookup_api_key(first.new_key) is not None
    extra = load_assistant_dir(out, new_key=True).new_key
    assert extra and extra != first.new_key
    assert len(again.store.list_examples(again.assistant.id, status="approved")) == 6
    moved = tmp_path / "moved"  # the same export (its manifest byte for byte) at another place
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".serve"))
    with pytest.raises(AssistantDirError, match="folder at another place"):
        load_assistant_dir(moved, state_dir=out / ".serve")
    other = export_assistant(source_from_version(acme["store"], acme["assistant"], acme["version"],
                                                 adapter_dir=acme["adapter"], indexes=acme["indexes"]),
                             tmp_path / "other")
    # another export: its manifest differs by its creation time (within the same second it is the same bytes,
    # so the same export at another place)
    with pytest.raises(AssistantDirError, match="state of another export|folder at another place"):
        load_assistant_dir(other.path, state_dir=out / ".serve")


def test_a_train_out_folder_exports_and_serves_with_sources(acme, engine, capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    make_random_adapter(tiny_model_dir, folder, seed=12)
    (folder / "train_config.json").write_text(json.dumps({"config": {"base_model": tiny_model_dir},
                                                          "system_prompt": "Answer briefly."}))
    Grounding(recipe="grounded", k=2, threshold=0.0, calibrated_on=1).save(folder)
    Retriever(docs_from_pairs(FACTS), embedder=None).save(folder / "retrieval")
    out = export(capsys, tmp_path, "--model", str(folder))
    served = load_assistant_dir(out, state_dir=tmp_path / "state")
    answer = answer_question(served.store, engine, served.assistant.id, "Do you deliver on Sunday?",
                             indexes=served.indexes)
    assert answer.mode == "grounded" and not answer.abstained
    example = served.store.get_example(answer.sources[0][0])  # sources name the served store's examples
    assert example.question == answer.sources[0][1] and example.assistant_id == served.assistant.id


def test_the_closed_book_export_reports_the_chats_grounded_score(acme, engine, tmp_path, tiny_model_dir):
    from tuning.export import Probe, export_model

    store, assistant = acme["store"], acme["assistant"]
    source = source_from_version(store, assistant, acme["version"], adapter_dir=acme["adapter"],
                                 indexes=acme["indexes"])
    questions = [IN_SCOPE, OUT_OF_SCOPE]
    chat = [answer_question(store, engine, assistant.id, q, record=False, indexes=acme["indexes"]).text
            for q in questions]
    assert chat_answers(source, engine, questions) == chat  # the comparison scores what the chat answers
    probes = [Probe(IN_SCOPE, answer=FACTS[0][1]), Probe(OUT_OF_SCOPE, ("Brazil",)), Probe("unscored?")]
    report = export_model(acme["adapter"], base_model=tiny_model_dir, out_dir=tmp_path / "a", fmt="adapter",
                          probes=probes, system_prompt=assistant.system_prompt, max_new_tokens=8,
                          chat=lambda eng, qs: chat_answers(source, eng, qs))
    assert report.scored == 2 and report.closed_book_right == 0
    assert report.grounded_right == int(FACTS[0][1] in chat[0])
    assert (f"closed book (adapter, what this export answers with): 0 of 2 probe questions right; grounded (as the "
            f"chat answers): {report.grounded_right} of 2") in report.summary()
    saved = json.loads((tmp_path / "a" / "export_report.json").read_text())
    assert (saved["scored"], saved["grounded_right"]) == (2, report.grounded_right)


def test_export_assistant_refuses_a_folder_without_adapter(acme, tmp_path):
    source = source_from_version(acme["store"], acme["assistant"], acme["version"], adapter_dir=tmp_path,
                                 indexes=acme["indexes"])
    with pytest.raises(AssistantDirError, match="holds no LoRA adapter"):
        export_assistant(source, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tunebot_serve_assistant_dir_prints_its_key_once_and_answers(acme, engine, capsys, tmp_path, monkeypatch):
    """The real command in its own process: the key on standard output, then the chat's answer over HTTP."""
    import os
    import socket
    import subprocess
    import sys
    import threading

    import httpx

    expected = answer_question(acme["store"], engine, acme["assistant"].id, IN_SCOPE, record=False,
                               indexes=acme["indexes"]).text
    out = export(capsys, tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TUNEBOT_MAX_NEW_TOKENS": "8", "TUNEBOT_LOG_LEVEL": "WARNING",
           "TUNEBOT_DATABASE": str(tmp_path / "no-bot.db")}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "bot", "serve", "--assistant-dir", str(out), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        key = proc.stdout.readline().strip()
        assert key.startswith("tb-"), proc.stderr.read() if proc.poll() is not None else key
        for line in proc.stderr:  # the server says when it is about to listen
            if "serving the OpenAI-compatible API" in line:
                break
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # a full pipe would stall the server
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=8, timeout=60)
        reply = client.chat.completions.create(model="acme", messages=[{"role": "user", "content": IN_SCOPE}])
        assert reply.choices[0].message.content == expected
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not (tmp_path / "no-bot.db").exists()  # no bot database was needed
