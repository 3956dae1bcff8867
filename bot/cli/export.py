"""`tunebot export-model`: a tuned version (or a `train --out` folder) as adapter, merged, GGUF or Ollama, checked;
or as an assistant folder that answers as the chat does (`tunebot serve --assistant-dir`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from tuning import exitcodes

PROBES = 40
ASSISTANT = "assistant"


def register(subparsers: argparse._SubParsersAction) -> None:
    from tuning.export import FORMATS

    exp = subparsers.add_parser(
        "export-model", help="export a tuned model (adapter, merged, GGUF, Ollama), checked before it is handed over",
        description="Write a model version as the peft adapter, merged safetensors, a GGUF file (the LoRA folded "
                    "into the base GGUF, and the LoRA as a GGUF adapter), or an Ollama folder (GGUF + Modelfile). "
                    "The export is then loaded in its runtime (transformers or llama.cpp) and asked probe questions "
                    "(the version's test questions, else its examples); the report says on how many it answers "
                    "exactly as the tuned model does, and flags one that does not; for gguf and ollama also how many "
                    "the closed-book model gets right beside the chat's grounded answers. `assistant` writes a "
                    "self-contained folder that answers as the chat does (the adapter, the retrieval index, the "
                    "approved examples, the \"I don't know\" calibration, the system prompt and a manifest with "
                    "sha256s): serve it with `tunebot serve --assistant-dir DIR`.")
    which = exp.add_mutually_exclusive_group(required=True)
    which.add_argument("--assistant", metavar="NAME", help="an assistant (its active version unless --version)")
    which.add_argument("--model", metavar="DIR", help="a folder written by `tunebot train --data … --out DIR`")
    exp.add_argument("--version", type=int, metavar="ID", help="the version to export (with --assistant)")
    exp.add_argument("--format", required=True, choices=(*FORMATS, ASSISTANT))
    exp.add_argument("-o", "--out", required=True, metavar="DIR", help="a new (or empty) folder")
    exp.add_argument("--quant", default="q8_0", choices=("q8_0", "f16", "q4_1", "q4_0", "same"),
                     help="GGUF type of the weights the LoRA changes (default q8_0: the others keep the base's)")
    exp.add_argument("--probes", type=int, default=PROBES, metavar="N",
                     help=f"probe questions to check the export on (default {PROBES}; 0: no check)")
    exp.add_argument("--json", action="store_true", help="print the report as JSON")
    exp.set_defaults(func=cmd_export_model)


def _assistant_version(app, args):
    """(assistant, version) named by --assistant and --version (its active one by default)."""
    from bot.cli import CommandError

    store = app.store
    assistant = store.assistant_by_name(args.assistant)  # NotFound says what to do
    version_id = args.version or assistant.active_version_id
    if not version_id:
        raise CommandError(f"{assistant.name} has no active version: train one, or name it with --version ID")
    version = store.get_model_version(version_id)
    if version.assistant_id != assistant.id:
        raise CommandError(f"version #{version_id} is not {assistant.name}'s; see `tunebot versions --assistant "
                           f"{assistant.name}`")
    return assistant, version


def _version_source(app, args):
    """(adapter folder, base model, system prompt, probes) of an assistant's version."""
    from tuning.artifacts import local_dir
    from tuning.export import Probe

    store = app.store
    assistant, version = _assistant_version(app, args)
    tests = store.list_examples(assistant.id, status="approved", split="test")
    pool = tests or store.list_examples(assistant.id, status="approved")
    probes = [Probe(e.question, tuple(e.must_contain or ()), e.answer) for e in pool[:args.probes]]
    return (local_dir(version.adapter_path, cache_dir=app.settings.models_cache),
            version.base_model or assistant.base_model or app.settings.base_model,
            assistant.system_prompt or "", probes)


def _assistant_source(app, args):
    """What an assistant folder is made of: the version's adapter with the assistant's index and examples."""
    from tuning.artifacts import local_dir
    from tuning.export_assistant import source_from_train_folder, source_from_version

    if args.model:
        return source_from_train_folder(args.model, cache_dir=app.settings.models_cache)
    assistant, version = _assistant_version(app, args)
    source = source_from_version(app.store, assistant, version, indexes=app.indexes,
                                 adapter_dir=local_dir(version.adapter_path, cache_dir=app.settings.models_cache))
    return source if source.base_model else dataclasses.replace(source, base_model=app.settings.base_model)


def _folder_source(app, args):
    """The same for a `train --data … --out DIR` folder: its base model, system prompt and trained questions."""
    from bot.cli import CommandError
    from tuning.export import Probe

    folder = Path(args.model)
    config = folder / "train_config.json"
    if not config.exists():
        raise CommandError(f"{folder} has no train_config.json: not a folder written by `tunebot train --out`")
    snapshot = json.loads(config.read_text())
    probes = []
    pool = folder / "fewshot_pool.jsonl"
    if pool.exists():
        for line in pool.read_text(encoding="utf-8").splitlines():
            if line.strip() and len(probes) < args.probes:
                row = json.loads(line)
                probes.append(Probe(row["question"], answer=row.get("answer", "")))
    return folder, snapshot["config"]["base_model"], snapshot.get("system_prompt", ""), probes


def cmd_export_model(args, app) -> int:
    from bot.cli import CommandError
    from tuning.export import export_model

    if args.probes < 0:
        raise CommandError("--probes must be 0 or more")
    if args.version and not args.assistant:
        raise CommandError("--version goes with --assistant")
    if args.format == ASSISTANT:
        return _export_assistant(app, args)
    adapter, base_model, system_prompt, probes = (_version_source if args.assistant else _folder_source)(app, args)
    chat = None
    if args.format in ("gguf", "ollama") and probes and (args.assistant or Path(args.model, "retrieval").is_dir()):
        def chat(engine, questions):  # what leaves is closed book: how would the chat's grounded answers score?
            from tuning.export_assistant import chat_answers

            return chat_answers(_assistant_source(app, args), engine, questions, cache_dir=app.settings.models_cache)
    report = export_model(adapter, base_model=base_model, out_dir=args.out, fmt=args.format, probes=probes,
                          system_prompt=system_prompt, cache_dir=app.settings.models_cache, quant=args.quant,
                          chat=chat)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(report), "flagged": report.flagged}, ensure_ascii=False))
    else:
        print(report.summary())
        if report.note:
            print(report.note)
        for check in report.checks:
            for d in check.disagreements[:2]:
                print(f"  {check.artifact} differs on {d['question']!r}\n    tuned:  {d['torch'][:120]!r}\n"
                      f"    export: {d['export'][:120]!r}")
    return exitcodes.FLAGGED if report.flagged else exitcodes.OK


def _export_assistant(app, args) -> int:
    """The assistant folder (answers as the chat does), with its manifest."""
    from tuning.export_assistant import export_assistant

    result = export_assistant(_assistant_source(app, args), args.out)
    if args.json:
        print(json.dumps({"format": ASSISTANT, "path": result.path, "files": result.files,
                          "manifest": result.manifest, "seconds": result.seconds}, ensure_ascii=False))
    else:
        print(result.summary())
    return exitcodes.OK
