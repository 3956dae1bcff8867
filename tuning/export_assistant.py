"""An assistant folder: everything that makes the chat's answers right, in one self-contained folder, and the
same answers served from it.

An exported model alone answers closed book, while the chat answers grounded (the adapter shown the retrieved
examples, "I don't know" below the calibrated retrieval threshold). This folder carries both halves:

  manifest.json      format, assistant, version, base model, embedder, and every file with its sha256 and role
  adapter/           the peft LoRA adapter, its train_config.json and grounding.json (recipe, k, the calibration)
  retrieval/         the retrieval index as the chat uses it (Retriever.save: docs, n-gram terms, embeddings, meta)
  examples.jsonl     the approved examples (key, question, answer, split, parent key, must_contain)
  system_prompt.txt  the assistant's system prompt

`load_assistant_dir` checks every file against the manifest and loads the folder into a small SQLite store of
its own (assistant, examples, the active version pointing at adapter/), so the answer service and the
OpenAI-compatible API answer from it exactly as they answer from the bot's database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from tuning.errors import TuningError

FORMAT = "tunebot-assistant"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = ".serve"  # where `serve --assistant-dir` keeps its store (conversations, unanswered, API keys)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "grounding.json",
                 "fewshot_pool.jsonl", "training_report.json")
ROLES = {
    "adapter/adapter_config.json": "LoRA adapter: its peft configuration",
    "adapter/adapter_model.safetensors": "LoRA adapter: its weights",
    "adapter/train_config.json": "how the adapter was trained (the config snapshot)",
    "adapter/grounding.json": "calibration: answer recipe, examples shown (k), the \"I don't know\" threshold",
    "adapter/fewshot_pool.jsonl": "the trained examples (few-shot pool)",
    "adapter/training_report.json": "the training report",
    "retrieval/docs.jsonl": "retrieval index: the indexed examples (key, question, answer, family)",
    "retrieval/terms.npz": "retrieval index: character n-gram and word term frequencies",
    "retrieval/embeddings.npy": "retrieval index: the examples' embeddings",
    "retrieval/meta.json": "retrieval index: version, weights and the embedder that built it",
    "examples.jsonl": "the approved examples (key, question, answer, split, parent, must_contain)",
    "system_prompt.txt": "the assistant's system prompt",
}


class AssistantDirError(TuningError):
    """An assistant folder that cannot be written or served (the message says which file and what to do)."""


@dataclass(frozen=True)
class AssistantSource:
    """What an assistant folder is made of: a version's adapter and the index and examples it answers with."""

    name: str
    version_id: int | None
    base_model: str
    system_prompt: str
    adapter_dir: Path
    index: object  # tuning.retrieval.Retriever
    examples: tuple[dict, ...] = ()


def source_from_version(store, assistant, version, *, adapter_dir, indexes) -> AssistantSource:
    """An assistant's version as the chat answers with it: its adapter, the assistant's index and examples."""
    approved = store.list_examples(assistant.id, status="approved")
    keys = {e.id for e in approved}
    examples = tuple({"key": str(e.id), "question": e.question, "answer": e.answer, "split": e.split,
                      "parent": str(e.parent_id) if e.parent_id in keys else None,
                      "must_contain": list(e.must_contain or [])} for e in approved)
    return AssistantSource(name=assistant.name, version_id=version.id,
                           base_model=version.base_model or assistant.base_model, system_prompt=assistant.system_prompt
                           or "", adapter_dir=Path(adapter_dir), index=indexes.get(store, assistant.id),
                           examples=examples)


def source_from_train_folder(folder, *, cache_dir=None) -> AssistantSource:
    """A `tunebot train --data … --out DIR` folder: its adapter and the index it saved beside it (retrieval/)."""
    folder = Path(folder)
    config = folder / "train_config.json"
    if not config.exists():
        raise AssistantDirError(f"{folder} has no train_config.json: not a folder written by `tunebot train --out`")
    if not (folder / "retrieval" / "meta.json").exists():
        raise AssistantDirError(f"{folder} has no retrieval index (retrieval/): train it again with this version "
                                "of tunebot, or export an assistant's version with --assistant")
    snapshot = json.loads(config.read_text())
    index = _load_index(folder / "retrieval", cache_dir=cache_dir)
    keys = {d.key for d in index.docs}
    examples = tuple({"key": d.key, "question": d.question, "answer": d.answer, "split": "train",
                      "parent": d.group if d.group in keys and d.group != d.key else None, "must_contain": []}
                     for d in index.docs)
    return AssistantSource(name=folder.resolve().name[:64] or "assistant", version_id=None,
                           base_model=snapshot["config"]["base_model"],
                           system_prompt=snapshot.get("system_prompt", ""), adapter_dir=folder, index=index,
                           examples=examples)


@dataclass
class AssistantExport:
    """An assistant folder just written: where, its manifest, and what it answers with, for the user."""

    path: str
    manifest: dict
    seconds: float
    examples: int
    grounding: dict
    format: str = "assistant"
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        m, g = self.manifest, self.grounding
        version = f" version #{m['version_id']}" if m["version_id"] else ""
        answers = "grounded (shown the retrieved examples)" if g.get("recipe") == "grounded" else "closed book"
        threshold = g["threshold"] if g.get("calibrated_on") else "the default"
        return (f"assistant export in {self.path} (written in {self.seconds:.0f} s): {m['assistant']}{version}, "
                f"{self.examples} approved examples, the retrieval index ({m['embedder'] or 'n-grams only'}); "
                f"it answers {answers}, \"I don't know\" below a retrieval confidence of {threshold}, as the chat "
                "does.\n"
                f"Serve it: tunebot serve --assistant-dir {self.path} (base model: {m['base_model']})")


def _sha256(path: Path) -> str:
    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def export_assistant(source: AssistantSource, out_dir, *, clock=None) -> AssistantExport:
    """Write the assistant folder into out_dir (new or empty) atomically: all of it, or nothing."""
    import time

    from tuning.artifacts import atomic_dir

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AssistantDirError(f"{out} is not empty: choose a new folder, so that nothing is overwritten")
    if not (source.adapter_dir / "adapter_config.json").exists():
        raise AssistantDirError(f"{source.adapter_dir} holds no LoRA adapter (adapter_config.json): nothing to export")
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        (tmp / "adapter").mkdir()
        for name in ADAPTER_FILES:
            if (source.adapter_dir / name).exists():
                shutil.copy2(source.adapter_dir / name, tmp / "adapter" / name)
        source.index.save(tmp / "retrieval")
        with open(tmp / "examples.jsonl", "w", encoding="utf-8") as fp:
            for row in source.examples:
                fp.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "system_prompt.txt").write_text(source.system_prompt, encoding="utf-8")
        files = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        now = (clock or (lambda: dt.datetime.now(dt.timezone.utc)))()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "assistant": source.name,
                    "version_id": source.version_id, "base_model": source.base_model,
                    "embedder": source.index.embedder_name, "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "files": {rel: {"sha256": _sha256(p), "bytes": p.stat().st_size,
                                    "what": ROLES.get(rel, "part of the export")} for rel, p in files.items()}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    grounding = json.loads((out / "adapter" / "grounding.json").read_text()) \
        if (out / "adapter" / "grounding.json").exists() else {}
    return AssistantExport(path=str(out), manifest=manifest, seconds=round(time.perf_counter() - started, 1),
                           examples=len(source.examples), grounding=grounding, files=[MANIFEST, *manifest["files"]])


def verify_assistant_dir(folder) -> dict:
    """The manifest of an intact assistant folder; AssistantDirError naming the first file that is missing or
    does not match its sha256."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AssistantDirError(f"{folder} is not an assistant folder (no {MANIFEST}): write one with `tunebot "
                                "export-model --format assistant`") from None
    except (OSError, ValueError) as exc:
        raise AssistantDirError(f"{folder / MANIFEST} cannot be read ({exc}): export the assistant again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise AssistantDirError(f"{folder / MANIFEST} is not a tunebot assistant manifest: export the assistant again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AssistantDirError(f"{folder} was written in assistant folder format {manifest.get('format_version')}; "
                                f"this tunebot reads format {FORMAT_VERSION}: export it again with this version")
    for rel, entry in sorted(manifest["files"].items()):
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise AssistantDirError(f"{folder / MANIFEST} names a file outside the folder ({rel}): refused")
        if not path.is_file():
            raise AssistantDirError(f"{folder} is damaged: {rel} is missing (export the assistant again)")
        if _sha256(path) != entry.get("sha256"):
            raise AssistantDirError(f"{folder} is damaged: {rel} does not match its sha256 in {MANIFEST} "
                                    "(export the assistant again)")
    for rel in ("adapter/adapter_config.json", "retrieval/meta.json", "examples.jsonl"):
        if rel not in manifest["files"]:
            raise AssistantDirError(f"{folder} is incomplete: its manifest lists no {rel} (export it again)")
    return manifest


class FixedIndex:
    """`indexes` for the answer service: the folder's saved retriever as exported, never rebuilt from the store."""

    def __init__(self, retriever):
        self.retriever = retriever

    def get(self, store, assistant_id: int):
        return self.retriever


@dataclass
class ServedAssistant:
    """An assistant folder loaded for answering: its store, assistant, index, base model, and a new API key
    (shown once) when one was created at this load."""

    folder: Path
    manifest: dict
    store: object
    assistant: object
    indexes: FixedIndex
    new_key: str | None = None

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]


def _load_index(index_dir: Path, *, cache_dir=None):
    """A saved retriever with the embedder that built it (refused when that one cannot be loaded here: n-grams
    alone would find other examples than the chat did)."""
    from tuning.embedding import load_embedder
    from tuning.retrieval import Retriever

    try:
        meta = json.loads((index_dir / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise AssistantDirError(f"the retrieval index in {index_dir} cannot be read ({exc})") from None
    name = meta.get("embedder")
    try:
        embedder = load_embedder(name, cache_dir=cache_dir, required=True) if name else None
    except (TuningError, OSError, ImportError, ValueError) as exc:
        raise AssistantDirError(f"the retrieval index in {index_dir} was made with the embedder {name}, which cannot "
                                f"be loaded here ({exc}): install it, then try again") from None
    try:
        return Retriever.load(index_dir, embedder=embedder, embed_weight=meta.get("embed_weight"))
    except (OSError, ValueError, KeyError) as exc:
        raise AssistantDirError(f"the retrieval index in {index_dir} cannot be read ({exc})") from None


def load_assistant_dir(folder, *, state_dir=None, cache_dir=None, new_key: bool = False) -> ServedAssistant:
    """Check the folder against its manifest and load it into the store under state_dir (default: .serve inside
    the folder), built at the first load with an API key; later loads reuse it (conversations, unanswered
    questions and keys are kept). new_key: create another API key."""
    from storage import Store, open_db

    folder = Path(folder)
    manifest = verify_assistant_dir(folder)
    index = _load_index(folder / "retrieval", cache_dir=cache_dir)
    state = Path(state_dir) if state_dir else folder / STATE_DIR
    stamp = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    created = None
    stamp_file = state / "manifest.sha256"
    if not (state / "tunebot.db").exists():
        created = _build_state(folder, manifest, state, stamp)
    elif not stamp_file.exists() or stamp_file.read_text().strip() != stamp:
        raise AssistantDirError(f"{state} holds the state of another export: remove it, or give another --state-dir")
    store = Store(open_db(state / "tunebot.db"))
    assistant = store.find_assistant(manifest["assistant"])
    if assistant is None or not assistant.active_version_id:
        raise AssistantDirError(f"{state} is incomplete: remove it and serve again")
    if store.get_model_version(assistant.active_version_id).adapter_path != str((folder / "adapter").resolve()):
        raise AssistantDirError(f"{state} was made for the folder at another place: remove it, or give another "
                                "--state-dir")
    keys = json.loads((state / "keys.json").read_text())
    index.docs = [replace(d, key=str(keys[d.key])) if d.key in keys else d for d in index.docs]
    if new_key:
        created = store.create_api_key(assistant.id, name="serve --assistant-dir")[1]
    return ServedAssistant(folder=folder, manifest=manifest, store=store, assistant=assistant,
                           indexes=FixedIndex(index), new_key=created)


def _build_state(folder: Path, manifest: dict, state: Path, stamp: str) -> str:
    """A new store with the folder's assistant, examples (their keys mapped to the new ids in keys.json) and the
    active version on adapter/, and an API key (returned: shown once). Written atomically."""
    from storage import Store, open_db
    from tuning.artifacts import atomic_dir

    rows = [json.loads(line) for line in (folder / "examples.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    with atomic_dir(state) as tmp:
        store = Store(open_db(tmp / "tunebot.db"))
        assistant = store.create_assistant(manifest["assistant"], base_model=manifest["base_model"],
                                           system_prompt=(folder / "system_prompt.txt").read_text(encoding="utf-8"),
                                           description=f"served from {folder.resolve().name}")
        keys: dict[str, int] = {}
        pending = list(rows)
        while pending:  # parents before their variations
            later = [r for r in pending if r.get("parent") and r["parent"] not in keys
                     and any(p["key"] == r["parent"] for p in pending)]
            for row in (r for r in pending if r not in later):
                keys[row["key"]] = store.add_example(
                    assistant.id, row["question"], row["answer"], status="approved", split=row.get("split", "train"),
                    parent_id=keys.get(row.get("parent")), source="import", must_contain=row.get("must_contain")
                    or None, allow_duplicate=True).id
            if len(later) == len(pending):
                break  # a cycle of parents: the rest stay out (the index still holds them)
            pending = later
        version = store.add_model_version(assistant.id, adapter_path=str((folder / "adapter").resolve()),
                                          base_model=manifest["base_model"],
                                          hyperparameters={"exported_version": manifest.get("version_id")})
        store.activate_version(version.id)
        _, plain = store.create_api_key(assistant.id, name="serve --assistant-dir")
        store.db.close()
        (tmp / "keys.json").write_text(json.dumps(keys))
        (tmp / "manifest.sha256").write_text(stamp)
    return plain


def chat_answers(source: AssistantSource, engine, questions: Sequence[str], *, cache_dir=None) -> list[str]:
    """What the chat answers with this version (auto mode: grounded, "I don't know" included) to each question:
    the assistant folder written to a temporary place, loaded and asked, as `serve --assistant-dir` would."""
    from tuning.answering.service import answer_question

    with tempfile.TemporaryDirectory(prefix="tunebot-chat-") as tmp:
        export_assistant(source, Path(tmp) / "assistant")
        served = load_assistant_dir(Path(tmp) / "assistant", state_dir=Path(tmp) / "state", cache_dir=cache_dir)
        try:
            return [answer_question(served.store, engine, served.assistant.id, q, record=False,
                                    indexes=served.indexes).text for q in questions]
        finally:
            served.store.db.close()
