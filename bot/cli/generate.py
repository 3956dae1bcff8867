"""CLI commands for synthetic data: `generate`, `import-document`, `review`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bot.app import client_config, endpoint_configured

GENERATE_METHODS = ("paraphrase", "mutate", "new", "document", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the synthetic-data commands to the `tunebot` parser."""
    gen = subparsers.add_parser(
        "generate", help="generate variations of the examples for review",
        description="Generate pending variations of an assistant's approved examples. paraphrase, new and "
                    "document use the OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY, "
                    "TUNEBOT_GENERATOR_MODEL); mutate makes local typos, slang, wrong-layout and similar "
                    "variations with no model and is the default when no endpoint is configured. "
                    "Exit code 2 when a run stopped (budget) or failed; what it generated is kept, "
                    "and --resume RUN continues it.")
    gen.add_argument("--assistant", required=True, metavar="NAME")
    gen.add_argument("--method", choices=GENERATE_METHODS, default=None,
                     help="default: paraphrase with an endpoint configured, mutate without; "
                          "all: paraphrase + new + mutate")
    gen.add_argument("--per-example", type=int, default=None, metavar="N",
                     help="variations per example (per chunk for document, per batch of 5 examples for new; "
                          "default: the mutations_per_example setting)")
    gen.add_argument("--auto-approve", action="store_true",
                     help="approve everything generated right away (no review)")
    gen.add_argument("--judge", action="store_true",
                     help="score each paraphrase with the LLM judge (stored; judge_auto_approve approves high ones)")
    gen.add_argument("--document", type=int, default=None, metavar="ID", help="document id for --method document")
    gen.add_argument("--resume", type=int, default=None, metavar="RUN", help="continue a stopped or failed run")
    gen.add_argument("--seed", type=int, default=0, help="seed of the local mutations (default 0)")
    gen.add_argument("--json", action="store_true", help="print the runs as JSON")
    gen.set_defaults(func=cmd_generate)

    doc = subparsers.add_parser(
        "import-document", help="import a txt, md, pdf or docx document",
        description="Extract the text of a document (txt, md, pdf, docx) and store it with the assistant. "
                    "With --generate (and an endpoint configured), question-answer pairs whose answers come "
                    "only from the text are generated for review, each with a reference to its chunk.")
    doc.add_argument("file", metavar="FILE")
    doc.add_argument("--assistant", required=True, metavar="NAME")
    doc.add_argument("--generate", action="store_true", help="generate pairs from the document now")
    doc.add_argument("--per-chunk", type=int, default=3, metavar="N", help="pairs per chunk (default 3)")
    doc.add_argument("--json", action="store_true", help="print the result as JSON")
    doc.set_defaults(func=cmd_import_document)

    rev = subparsers.add_parser(
        "review", help="review pending examples in the terminal",
        description="First the questions the assistant answered \"I don't know\" (type the answer: it becomes an "
                    "approved example; d dismiss), then pending examples one by one: a approve, r reject, e edit "
                    "(then approve), s skip, q quit. Reads answers from standard input, so it can be scripted.")
    rev.add_argument("--assistant", required=True, metavar="NAME")
    rev.add_argument("--run", type=int, default=None, metavar="RUN", help="only examples of this generation run")
    rev.add_argument("--by", type=int, default=None, metavar="TELEGRAM_ID", help="reviewer id recorded with decisions")
    rev.set_defaults(func=cmd_review)


class _Progress:
    """A tqdm bar on a terminal, silent otherwise."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self.bar = tqdm(desc=label, unit="item", disable=not sys.stderr.isatty(), leave=False)

    def __call__(self, info: dict) -> None:
        self.bar.total = info.get("total")
        self.bar.n = info.get("done", 0)
        self.bar.set_postfix(kept=info.get("kept", 0), requests=info.get("requests", 0), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run_summary(run) -> dict:
    keys = ("id", "method", "model", "status", "requested", "generated", "kept", "requests", "prompt_tokens",
            "completion_tokens", "cost_usd", "error")
    return {k: v for k, v in asdict(run).items() if k in keys}


def cmd_generate(args, app) -> int:
    """Generate variations with the chosen method(s) and report the runs."""
    from tuning.errors import GenerationError
    from tuning.data.mutate import mutate_assistant
    from tuning.data.review import approve_all_in_run
    from tuning.data.synthetic import Budget, generate

    settings, store = app.settings, app.store
    assistant = store.assistant_by_name(args.assistant)
    methods, per_example = _methods(args, settings, store)
    runs = []
    for name in methods:
        progress = _Progress(name)
        try:
            if name == "mutate":
                run = mutate_assistant(store, assistant.id, per_example=per_example, seed=args.seed,
                                       on_progress=progress)
            else:
                run = asyncio.run(generate(
                    store, assistant.id, method=name, per_example=per_example, client_config=client_config(settings),
                    budget=Budget(max_requests=settings.generator_max_requests,
                                  max_tokens=settings.generator_max_tokens),
                    on_progress=progress, judge=args.judge or settings.generator_judge,
                    auto_approve_above=settings.judge_auto_approve, document_id=args.document,
                    resume_run_id=args.resume, max_chars=settings.max_field_chars))
        finally:
            progress.close()
        if args.auto_approve:
            approve_all_in_run(store, run.id)
            run = store.get_generation_run(run.id)
        runs.append(run)
    _report_runs(args, store, assistant, runs)
    failed = [r for r in runs if r.status != "succeeded"]
    if failed:
        resume = f"; resume with `tunebot generate --assistant {assistant.name} --resume {failed[0].id}`" \
            if failed[0].method != "mutate" else ""
        raise GenerationError(f"run #{failed[0].id}: {failed[0].error}{resume}")
    return 0


def _methods(args, settings, store) -> tuple[list[str], int]:
    """The methods to run (what --method asks for, what a resumed run was, what the endpoint allows), and how
    many variations per example; a GenerationError says what is missing."""
    from tuning.errors import GenerationError

    configured = endpoint_configured(settings)
    method = args.method or ("paraphrase" if configured else "mutate")
    if args.resume is not None:
        method = store.get_generation_run(args.resume).method
        if method == "mutate":
            raise GenerationError(f"run #{args.resume} made local mutations, which finish at once; "
                                  "run `tunebot generate --method mutate` again instead")
    per_example = args.per_example if args.per_example is not None else settings.mutations_per_example
    if per_example < 1:
        raise GenerationError("--per-example must be at least 1")
    methods = ["paraphrase", "new", "mutate"] if method == "all" else [method]
    if not configured:
        if method == "all":
            methods = ["mutate"]
            print("no OpenAI-compatible endpoint configured: only local mutations", file=sys.stderr)
        elif method != "mutate":
            raise GenerationError(f"--method {method} needs an OpenAI-compatible endpoint: set OPENAI_BASE_URL "
                                  "(and OPENAI_API_KEY), or use --method mutate")
    if "document" in methods and args.document is None and args.resume is None:
        raise GenerationError("--method document needs --document ID (see tunebot import-document)")
    return methods, per_example


def _report_runs(args, store, assistant, runs) -> None:
    pending = store.count_examples(assistant.id, status="pending")
    if args.json:
        print(json.dumps({"assistant": assistant.name, "runs": [_run_summary(r) for r in runs], "pending": pending},
                         ensure_ascii=False, indent=2))
        return
    for run in runs:
        tokens = f", {run.prompt_tokens + run.completion_tokens} tokens (~${run.cost_usd:.4f})" if run.requests else ""
        print(f"run #{run.id} {run.method} ({run.model}): {run.status}, kept {run.kept} of {run.generated} "
              f"generated, {run.requests} requests{tokens}")
    verb = "approved" if args.auto_approve else "pending review"
    print(f"{pending} examples pending review" if not args.auto_approve else f"all new examples {verb}")
    if pending and not args.auto_approve:
        print(f"review them: tunebot review --assistant {assistant.name}")


def cmd_import_document(args, app) -> int:
    """Store a document's text; optionally generate pairs from it."""
    from tuning.data.documents import chunk_spans, import_document
    from tuning.errors import FormatError, GenerationError
    from tuning.data.synthetic import Budget, generate

    settings, store = app.settings, app.store
    assistant = store.assistant_by_name(args.assistant)
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{args.file}: cannot read the file ({exc.strerror})") from None
    document = import_document(store, assistant.id, path.name, data,
                               max_bytes=int(settings.max_upload_mb * 1024 * 1024))
    chunks = len(chunk_spans(document.text))
    result = {"document_id": document.id, "filename": document.filename, "chars": len(document.text),
              "chunks": chunks, "run": None}
    if args.generate:
        if not endpoint_configured(settings):
            raise GenerationError(f"document #{document.id} stored, but generating pairs needs an "
                                  "OpenAI-compatible endpoint: set OPENAI_BASE_URL (and OPENAI_API_KEY)")
        progress = _Progress("document")
        try:
            run = asyncio.run(generate(
                store, assistant.id, method="document", per_example=args.per_chunk, document_id=document.id,
                client_config=client_config(settings), on_progress=progress, max_chars=settings.max_field_chars,
                budget=Budget(max_requests=settings.generator_max_requests, max_tokens=settings.generator_max_tokens)))
        finally:
            progress.close()
        result["run"] = _run_summary(run)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(f"document #{document.id} {document.filename}: {len(document.text)} characters, {chunks} chunks")
        if result["run"]:
            run = result["run"]
            print(f"run #{run['id']}: {run['status']}, {run['kept']} pairs pending review")
        else:
            print(f"generate pairs: tunebot generate --assistant {assistant.name} --method document "
                  f"--document {document.id}")
    if result["run"] and result["run"]["status"] != "succeeded":
        raise GenerationError(f"run #{result['run']['id']}: {result['run']['error']}")
    return 0


def _show(store, example, position: str) -> None:
    from tuning.data.review import parent_of

    print(f"\n[{position}] #{example.id} {example.method or example.source}"
          + (f" (run #{example.generation_run_id})" if example.generation_run_id else ""))
    if example.method == "new":
        print("  NEW content, not a rewording: check the facts before approving")
    parent = parent_of(store, example)
    if parent is not None:
        print(f"  original: {parent.question}")
    if example.chunk_ref and example.document_id:
        print(f"  source:   document #{example.document_id}, {example.chunk_ref}")
    print(f"  question: {example.question}")
    print(f"  answer:   {example.answer}")
    if example.judge_score is not None:
        print(f"  judge:    {example.judge_score:.2f}")


def _ask(prompt: str) -> str | None:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def cmd_review(args, app) -> int:
    """A terminal review loop over the pending examples."""
    from storage.errors import StorageError
    from tuning.data.review import (approve_variation, edit_variation, next_pending, reject_variation,
                               review_progress)

    store = app.store
    assistant = store.assistant_by_name(args.assistant)
    counts = {"approved": 0, "rejected": 0, "edited": 0, "skipped": 0, "answered": 0, "dismissed": 0}
    if args.run is None and not _review_unanswered(store, assistant, args, counts):
        return 0
    after = None
    while True:
        example = next_pending(store, assistant.id, run_id=args.run, after_id=after)
        if example is None:
            break
        reviewed, total = review_progress(store, assistant.id, args.run)
        _show(store, example, f"{reviewed + 1}/{total}" if total else "pending")
        answer = _ask("a approve, r reject, e edit, s skip, q quit > ")
        if answer is None or answer.strip().lower() in ("q", "quit"):
            break
        choice = answer.strip().lower()[:1]
        if choice == "a":
            approve_variation(store, example.id, by=args.by)
            counts["approved"] += 1
        elif choice == "r":
            reject_variation(store, example.id, by=args.by)
            counts["rejected"] += 1
        elif choice == "e":
            question = _ask("new question (empty keeps it) > ")
            new_answer = _ask("new answer (empty keeps it) > ") if question is not None else None
            try:
                if (question or "").strip() or (new_answer or "").strip():
                    edit_variation(store, example.id, question=question, answer=new_answer, by=args.by)
                else:
                    approve_variation(store, example.id, by=args.by)
                counts["edited"] += 1
            except StorageError as exc:
                print(f"not saved: {exc}")
                continue
        elif choice == "s":
            after = example.id
            counts["skipped"] += 1
        else:
            print("type a, r, e, s or q")
    reviewed, total = review_progress(store, assistant.id, args.run)
    print(f"\nanswered {counts['answered']}, dismissed {counts['dismissed']} unanswered questions; "
          f"approved {counts['approved']}, rejected {counts['rejected']}, edited {counts['edited']}, "
          f"skipped {counts['skipped']}; {reviewed} of {total} generated examples reviewed")
    return 0


def _review_unanswered(store, assistant, args, counts: dict) -> bool:
    """Questions the assistant could not answer, first: typing the answer makes it an approved example.
    False when the reviewer quit."""
    from storage.errors import StorageError

    items = store.list_unanswered(assistant.id)
    for n, item in enumerate(items, 1):
        print(f"\n[unanswered {n}/{len(items)}] asked {item.created_at} and answered \"I don't know\":\n"
              f"Q: {item.question}")
        answer = _ask("type the answer, or d dismiss, s skip, q quit > ")
        if answer is None or answer.strip().lower() in ("q", "quit"):
            return False
        choice = answer.strip()
        if choice.lower() == "s" or not choice:
            continue
        try:
            if choice.lower() == "d":
                store.dismiss_unanswered(item.id, by=args.by)
                counts["dismissed"] += 1
            else:
                example = store.answer_unanswered(item.id, choice, by=args.by)
                counts["answered"] += 1
                print(f"saved as approved example #{example.id}")
        except StorageError as exc:
            print(f"not saved: {exc}")
    return True
