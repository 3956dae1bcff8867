"""CLI commands for data: `assistants create|list`, `import`, `export`, `stats`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from tuning import exitcodes

EXIT_SKIPPED_LINES = exitcodes.INCOMPLETE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data commands to the `tunebot` parser."""
    assistants = subparsers.add_parser("assistants", help="create and list assistants",
                                       description="Create and list assistants.")
    asub = assistants.add_subparsers(dest="assistants_command", metavar="ACTION")
    create = asub.add_parser("create", help="create an assistant", description="Create an assistant.")
    create.add_argument("name", metavar="NAME", help="a unique name, e.g. acme")
    create.add_argument("--system-prompt", default="", help="instructions given to the model with every question")
    create.add_argument("--description", default="", help="what the assistant is for")
    create.add_argument("--base-model", default=None,
                        help="hub id, folder, .gguf file or bundled:smollm2-135m (default: the base_model setting)")
    create.add_argument("--owner", type=int, default=None, metavar="TELEGRAM_ID",
                        help="Telegram user id of the owner (can manage it in the bot)")
    create.add_argument("--json", action="store_true", help="print the assistant as JSON")
    create.set_defaults(func=cmd_assistants_create)
    listing = asub.add_parser("list", help="list assistants", description="List assistants with example counts.")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=cmd_assistants_list)

    imp = subparsers.add_parser(
        "import", help="import examples from a JSONL or CSV file",
        description="Import question-answer pairs from JSONL ({question,answer}, {prompt,completion} or OpenAI "
                    "{messages}) or CSV (question/answer columns). Good lines are added, bad lines are reported "
                    "with their line number, questions that already exist are skipped. Exit code: 0 all lines "
                    "usable, 1 some lines skipped for errors, 2 the file or arguments are unusable.")
    imp.add_argument("file", metavar="FILE", help="path to the file, or - for standard input")
    imp.add_argument("--assistant", required=True, metavar="NAME", help="the assistant to add the examples to")
    imp.add_argument("--approve", action="store_true", help="mark the examples approved (default: pending review)")
    imp.add_argument("--json", action="store_true", help="print the report as JSON")
    imp.set_defaults(func=cmd_import)

    exp = subparsers.add_parser("export", help="export examples as JSONL",
                                description="Export an assistant's examples as JSONL.")
    exp.add_argument("--assistant", required=True, metavar="NAME")
    exp.add_argument("--format", choices=("jsonl", "openai"), default="jsonl",
                     help="jsonl: {question,answer}; openai: chat {messages} with the system prompt (default: jsonl)")
    exp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    exp.add_argument("--status", choices=("approved", "all"), default="approved",
                     help="approved examples only, or all live ones (default: approved)")
    exp.set_defaults(func=cmd_export)

    stats = subparsers.add_parser("stats", help="show dataset statistics",
                                  description="Counts of examples by source, status and split, and a token estimate.")
    stats.add_argument("--assistant", required=True, metavar="NAME")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--customers", action="store_true",
                       help="customers' questions per day, share answered and \"don't know\", 👍/👎, the team's "
                            "answers and the questions most often left unanswered")
    stats.add_argument("--days", type=int, default=30, metavar="N", help="with --customers: the last N days")
    stats.set_defaults(func=cmd_stats)


@contextmanager
def _stdout_may_close():
    """`tunebot export | head` closes the pipe early: stop quietly instead of a traceback."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _print_json(value) -> None:
    with _stdout_may_close():
        print(json.dumps(value, ensure_ascii=False, indent=2))


def cmd_assistants_create(args, app) -> int:
    """Create an assistant; the base model defaults to the base_model setting."""
    assistant = app.store.create_assistant(
        args.name, description=args.description, system_prompt=args.system_prompt,
        base_model=args.base_model or app.settings.base_model, owner_id=args.owner)
    if args.json:
        _print_json({"id": assistant.id, "name": assistant.name, "base_model": assistant.base_model,
                     "system_prompt": assistant.system_prompt, "description": assistant.description})
    else:
        print(f"created assistant {assistant.name!r} (#{assistant.id}, base model {assistant.base_model})")
    return 0


def cmd_assistants_list(args, app) -> int:
    """List assistants with their example counts and active version."""
    rows = []
    for a in app.store.list_assistants():
        counts = app.store.example_counts(a.id)["status"]
        rows.append({"id": a.id, "name": a.name, "base_model": a.base_model, "description": a.description,
                     "active_version_id": a.active_version_id, "examples": sum(counts.values()),
                     "approved": counts.get("approved", 0), "pending": counts.get("pending", 0)})
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no assistants yet; create one with `tunebot assistants create NAME`")
    else:
        print(f"{'id':>4}  {'name':<20} {'examples':>8} {'approved':>8} {'pending':>8}  base model")
        for r in rows:
            print(f"{r['id']:>4}  {r['name']:<20} {r['examples']:>8} {r['approved']:>8} {r['pending']:>8}  "
                  f"{r['base_model']}")
    return 0


@contextmanager
def _progress(total_hint: str):
    """A tqdm bar on a terminal, nothing otherwise; yields an on_progress(done, total) callback."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=total_hint, unit="ex", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def cmd_import(args, app) -> int:
    """Import a file into an assistant and report added, duplicate and bad lines."""
    from bot.cli import CommandError
    from tuning.data.importing import import_file

    assistant = app.store.assistant_by_name(args.assistant)
    if args.file == "-":
        source, filename = sys.stdin.buffer.read(), None
    else:
        path = Path(args.file)
        if not path.is_file():
            raise CommandError(f"file not found: {args.file}")
        size_mb = path.stat().st_size / 2**20
        if size_mb > app.settings.max_upload_mb:
            raise CommandError(f"{args.file} is {size_mb:.1f} MB; the limit is {app.settings.max_upload_mb:g} MB "
                               "(TUNEBOT_MAX_UPLOAD_MB)")
        source, filename = path, path.name
    with _progress("importing") as on_progress:
        report = import_file(app.store, assistant.id, source, filename=filename, approve=args.approve,
                             max_field_chars=app.settings.max_field_chars, on_progress=on_progress)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.summary())
    return 0 if report.ok else EXIT_SKIPPED_LINES


def cmd_export(args, app) -> int:
    """Write examples to a file or standard output."""
    from tuning.data.importing import export_examples

    assistant = app.store.assistant_by_name(args.assistant)
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(out.name + ".part")
        try:
            with tmp.open("w", encoding="utf-8") as fp:
                count = export_examples(app.store, assistant.id, fp, format=args.format, status=args.status)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"exported {count} examples to {out}", file=sys.stderr)
    else:
        count = None
        with _stdout_may_close():
            count = export_examples(app.store, assistant.id, sys.stdout, format=args.format, status=args.status)
        if count is not None:
            print(f"exported {count} examples", file=sys.stderr)
    return 0


def cmd_stats(args, app) -> int:
    """Print counts by source, status and split, and the token estimate."""
    from tuning.data.importing import dataset_stats

    if args.customers:
        from bot.cli.customers import print_customer_stats

        return print_customer_stats(app, app.store.assistant_by_name(args.assistant), days=args.days,
                                    as_json=args.json)
    stats = dataset_stats(app.store, app.store.assistant_by_name(args.assistant).id)
    if args.json:
        _print_json(stats)
        return 0
    print(f"assistant {stats['assistant']}: {stats['total']} examples ({stats['variations']} variations)")
    for key in ("by_status", "by_source", "by_split"):
        parts = ", ".join(f"{k} {v}" for k, v in stats[key].items()) or "none"
        print(f"  {key[3:]:<7} {parts}")
    print(f"  tokens  ~{stats['approved_tokens_estimate']} in approved examples with the chat template "
          f"(longest ~{stats['max_example_tokens_estimate']})")
    return 0
