"""CLI commands for answers: `serve` (the OpenAI-compatible API), `apikey`, `chat`, `demo`."""

from __future__ import annotations

import argparse
import json
import sys

MODES = ("auto", "tuned", "base", "fewshot", "version")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the answer commands to the `tunebot` parser."""
    serve = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible API",
        description="Serve /v1/models and /v1/chat/completions (with stream) for every assistant: the model id is "
                    "the assistant's name (its active version), NAME:base or NAME:fewshot. Requests need an API key "
                    "of that assistant (`tunebot apikey create`). With --assistant-dir, one assistant folder "
                    "(`tunebot export-model --format assistant`) instead of the bot's database: its files are "
                    "checked against the manifest, it answers as the chat does, and the first start prints its "
                    "API key once.")
    serve.add_argument("--host", default=None, help="address to listen on (default: the api_host setting, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: the api_port setting, else 8000)")
    serve.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted (default: 1024)")
    serve.add_argument("--assistant-dir", metavar="DIR", help="serve this assistant folder (no bot database)")
    serve.add_argument("--state-dir", metavar="DIR",
                       help="where --assistant-dir keeps its conversations, unanswered questions and API keys "
                            "(default: DIR/.serve)")
    serve.add_argument("--new-api-key", action="store_true",
                       help="with --assistant-dir: create another API key and print it once")
    serve.set_defaults(func=cmd_serve)

    apikey = subparsers.add_parser("apikey", help="create, list and revoke API keys",
                                   description="API keys of one assistant; keys are stored hashed and shown once.")
    ksub = apikey.add_subparsers(dest="apikey_command", metavar="ACTION")
    create = ksub.add_parser("create", help="create a key (printed once)", description="Create an API key.")
    create.add_argument("--assistant", required=True, metavar="NAME")
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.add_argument("--json", action="store_true", help="print {id, prefix, key} as JSON")
    create.set_defaults(func=cmd_apikey_create)
    listing = ksub.add_parser("list", help="list keys", description="List an assistant's API keys (prefixes only).")
    listing.add_argument("--assistant", required=True, metavar="NAME")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=cmd_apikey_list)
    revoke = ksub.add_parser("revoke", help="revoke a key", description="Revoke an API key by its id.")
    revoke.add_argument("key_id", type=int, metavar="KEY_ID", help="the id shown by `tunebot apikey list`")
    revoke.add_argument("--assistant", required=True, metavar="NAME")
    revoke.set_defaults(func=cmd_apikey_revoke)

    chat = subparsers.add_parser(
        "chat", help="chat with an assistant in the terminal",
        description="Ask questions line by line (standard input works too: `echo hi | tunebot chat --assistant A`). "
                    "Answers stream as they are generated. Type /quit or press Ctrl-D to leave.")
    chat.add_argument("--assistant", required=True, metavar="NAME")
    chat.add_argument("--mode", choices=MODES, default="auto",
                      help="auto (default): the active version as it was trained (grounded: given the retrieved "
                           "examples), else few-shot, and \"I don't know\" when unsure; grounded; tuned (closed book); "
                           "base; fewshot (retrieved examples as context); version (with --version)")
    chat.add_argument("--version", type=int, default=None, metavar="ID", help="a model version id (mode version)")
    chat.add_argument("--compare", action="store_true", help="answer each question in base, few-shot, tuned and grounded mode")
    chat.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens")
    chat.add_argument("--json", action="store_true", help="print one JSON object per answer instead of streaming")
    chat.set_defaults(func=cmd_chat)

    demo = subparsers.add_parser(
        "demo", help="the whole loop offline in a few minutes",
        description="Create an assistant from an example FAQ (English: examples/acme_faq.jsonl; Russian: "
                    "examples/ru_faq.jsonl), add local mutations, train a LoRA adapter on this machine, print the "
                    "table of every answer mode (base, few-shot, lookup, tuned, grounded) on held-out customer "
                    "questions and out-of-scope ones, then show grounded answers with their sources and an "
                    "out-of-scope question answered \"I don't know\" and queued for the experts; then chat "
                    "(when standard input is a terminal).")
    demo.add_argument("--name", default=None, help="name of the demo assistant (default: acme-demo or clinic-demo)")
    demo.add_argument("--language", choices=("en", "ru"), default="en",
                      help="en: ACME Parcel's FAQ (default); ru: a clinic's FAQ in Russian")
    demo.add_argument("--epochs", type=int, default=None,
                      help="most training epochs, early stopping may end sooner (default: automatic)")
    demo.add_argument("--per-example", type=int, default=3, help="mutations per example (default: 3)")
    demo.add_argument("--max-examples", type=int, default=None, help="use only the first N FAQ pairs (a quick try)")
    demo.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many held-out questions")
    demo.set_defaults(func=cmd_demo)


def _assistant(app, name: str):
    return app.store.assistant_by_name(name)


# ------------------------------------------------------------------ serve
def cmd_serve(args, app) -> int:
    """Load the base model, then serve the API until interrupted."""
    import uvicorn

    from tuning.answering.api import create_api_app

    host = args.host or app.settings.api_host
    port = args.port if args.port is not None else (app.settings.api_port or 8000)
    if args.assistant_dir:
        store, engine, indexes = _assistant_dir(app, args)
    elif args.state_dir or args.new_api_key:
        from bot.cli import CommandError

        raise CommandError("--state-dir and --new-api-key go with --assistant-dir")
    else:
        store, engine, indexes = app.store, app.engine, app.indexes
        print(f"loading {app.settings.base_model} …", file=sys.stderr)
    engine.load()
    print(f"serving the OpenAI-compatible API on http://{host}:{port}/v1", file=sys.stderr)
    try:
        uvicorn.run(create_api_app(store, engine, engine_for=None if args.assistant_dir else app.engine_for,
                                   indexes=indexes, max_body_bytes=args.max_body_kb * 1024),
                    host=host, port=port, log_level=app.settings.log_level.lower())
    finally:
        app.close_engines()
    return 0


def _assistant_dir(app, args):
    """(store, engine, indexes) of an assistant folder, checked against its manifest; a new API key printed once."""
    from tuning.export_assistant import load_assistant_dir

    served = load_assistant_dir(args.assistant_dir, state_dir=args.state_dir, cache_dir=app.settings.models_cache,
                                new_key=args.new_api_key)
    name = served.assistant.name
    if served.new_key:
        print(served.new_key)
        print(f"API key for {name}: shown once, store it now (use it as `Authorization: Bearer <key>`, "
              f"model {name!r})", file=sys.stderr)
    print(f"loading {served.base_model} for {name} …", file=sys.stderr)
    return served.store, app.engine_for(served.base_model), served.indexes


# ----------------------------------------------------------------- apikey
def cmd_apikey_create(args, app) -> int:
    assistant = _assistant(app, args.assistant)
    key, plain = app.store.create_api_key(assistant.id, name=args.name)
    if args.json:
        print(json.dumps({"id": key.id, "assistant": assistant.name, "prefix": key.prefix, "key": plain}))
    else:
        print(plain)
        print(f"key #{key.id} for {assistant.name}: shown once, store it now "
              f"(use it as `Authorization: Bearer <key>`)", file=sys.stderr)
    return 0


def cmd_apikey_list(args, app) -> int:
    assistant = _assistant(app, args.assistant)
    keys = app.store.list_api_keys(assistant.id)
    if args.json:
        print(json.dumps([{"id": k.id, "prefix": k.prefix, "name": k.name, "created_at": k.created_at,
                           "revoked_at": k.revoked_at} for k in keys]))
        return 0
    if not keys:
        print(f"{assistant.name} has no API keys; create one with `tunebot apikey create --assistant {assistant.name}`")
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        print(f"#{k.id}  {k.prefix}…  {k.name or '-'}  created {k.created_at}  {state}")
    return 0


def cmd_apikey_revoke(args, app) -> int:
    from bot.cli import CommandError

    assistant = _assistant(app, args.assistant)
    if args.key_id not in {k.id for k in app.store.list_api_keys(assistant.id)}:
        raise CommandError(f"{assistant.name} has no API key #{args.key_id}; see `tunebot apikey list`")
    app.store.revoke_api_key(args.key_id)
    print(f"revoked key #{args.key_id}")
    return 0


# ------------------------------------------------------------------- chat
def _engine_for(app, assistant):
    """The shared engine of the assistant's base model."""
    return app.engine_for(assistant.base_model)


def _answer_line(app, engine, assistant, question: str, args, out) -> None:
    from tuning.answering.service import answer_question, compare_answers

    if args.json:
        if args.compare:
            answers = compare_answers(app.store, engine, assistant.id, question, indexes=app.indexes)
        else:
            answers = [answer_question(app.store, engine, assistant.id, question, mode=args.mode,
                                       version_id=args.version, indexes=app.indexes)]
        for a in answers:
            out.write(json.dumps({"question": question, "mode": a.mode, "version_id": a.version_id, "answer": a.text,
                                  "ttft_ms": round(a.ttft_ms, 1), "tokens_per_s": round(a.tokens_per_s, 1),
                                  "message_id": a.message_id, "abstained": a.abstained,
                                  "unanswered_id": a.unanswered_id, "confidence": a.confidence,
                                  "sources": [{"example_id": i, "question": q} for i, q in a.sources]},
                                 ensure_ascii=False) + "\n")
        out.flush()
        return

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    if args.compare:
        current = [None]

        def show_mode(mode: str, piece: str) -> None:
            if current[0] != mode:
                out.write(("\n" if current[0] else "") + f"[{mode}] ")
                current[0] = mode
            show(piece)

        compare_answers(app.store, engine, assistant.id, question, on_piece=show_mode, indexes=app.indexes)
        out.write("\n")
    else:
        answer = answer_question(app.store, engine, assistant.id, question, mode=args.mode, version_id=args.version,
                                 on_piece=show, indexes=app.indexes)
        out.write("\n")
        if answer.abstained:
            out.write(f"  (not sure: confidence {answer.confidence:.2f}; queued for the experts as unanswered "
                      f"#{answer.unanswered_id}, see /review)\n")
        if answer.sources:
            out.write("  sources: " + "; ".join(f"#{i} {q[:60]}" for i, q in answer.sources) + "\n")
        if out.isatty():
            out.write(f"  ({answer.mode}, first token {answer.ttft_ms:.0f} ms, {answer.tokens_per_s:.0f} tokens/s)\n")
    out.flush()


def chat_loop(app, assistant, args, *, stdin=None, out=None) -> int:
    """Answer each line of stdin; the prompt and hints only on a terminal."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    engine = _engine_for(app, assistant)
    if args.max_tokens:
        engine.max_new_tokens = args.max_tokens
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {assistant.name} ({'compare' if args.compare else args.mode}); /quit to leave",
              file=sys.stderr)
    try:
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            question = line.strip()
            if question in ("/quit", "/exit"):
                break
            if question:
                _answer_line(app, engine, assistant, question, args, out)
    finally:
        engine.close()
    return 0


def cmd_chat(args, app) -> int:
    from bot.cli import CommandError

    if args.mode == "version" and args.version is None:
        raise CommandError("--mode version needs a version id: --version ID")
    assistant = _assistant(app, args.assistant)
    return chat_loop(app, assistant, args)


# ------------------------------------------------------------------- demo
DEMO_SYSTEM_PROMPT = "You answer customer questions for ACME Parcel, a parcel delivery company."
DEMOS = {  # language: (default name, files prefix, system prompt, description)
    "en": ("acme-demo", "acme", DEMO_SYSTEM_PROMPT, "ACME Parcel FAQ (tunebot demo)"),
    "ru": ("clinic-demo", "ru", "Ты отвечаешь на вопросы пациентов клиники «Здоровье+».",
           "FAQ клиники «Здоровье+» (tunebot demo)"),
}


def _examples_dir():
    from pathlib import Path

    for folder in (Path(__file__).resolve().parents[2] / "examples", Path.cwd() / "examples"):
        if (folder / "acme_faq.jsonl").exists():
            return folder
    from bot.cli import CommandError

    raise CommandError("examples/acme_faq.jsonl not found: run the demo from a Tunebot checkout")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not sys.stderr.isatty(), leave=True)


def cmd_demo(args, app) -> int:
    """The whole loop offline: import, mutate and approve, train, compare every mode, grounded answers, abstain."""
    import time

    started = time.perf_counter()
    folder = _examples_dir()
    assistant, out_dir = _demo_data(app, args, folder)  # steps 1 and 2
    _demo_train(app, args, assistant, out_dir)  # 3
    engine = _engine_for(app, assistant)
    try:
        held_out, out_of_scope, result = _demo_evaluate(app, args, assistant, out_dir, folder, engine)  # 4
        print("5/5 what a customer gets (auto mode: grounded answers with their sources, \"I don't know\" when unsure)")
        _demo_answers(app, engine, assistant, [r.question for r in held_out[:2]] + out_of_scope[:1],
                      threshold=result["abstain_threshold"])
        print(f"done in {time.perf_counter() - started:.0f} s. "
              f"Chat with it: tunebot chat --assistant {assistant.name} [--compare]")
        if sys.stdin.isatty():
            return chat_loop(app, app.store.get_assistant(assistant.id),
                             argparse.Namespace(mode="auto", version=None, compare=False, max_tokens=None, json=False))
    finally:
        engine.close()
    return 0


def _demo_data(app, args, folder):
    """A new assistant (its name made unique) with the demo FAQ approved and local mutations of it approved."""
    from tuning.data.importing import import_file
    from tuning.data.mutate import mutate_assistant
    from tuning.data.review import approve_all_in_run

    store, settings = app.store, app.settings
    default_name, prefix, system_prompt, description = DEMOS[args.language]
    base_name = args.name or default_name
    name, n = base_name, 1
    while store.find_assistant(name) is not None:
        n += 1
        name = f"{base_name}-{n}"
    assistant = store.create_assistant(name, system_prompt=system_prompt, base_model=settings.base_model,
                                       description=description)
    faq_path = folder / f"{prefix}_faq.jsonl"
    faq = faq_path.read_bytes()
    if args.max_examples:
        faq = b"\n".join(faq.splitlines()[: args.max_examples]) + b"\n"
    report = import_file(store, assistant.id, faq, filename=faq_path.name, approve=True)
    print(f"1/5 assistant {name!r}: imported {report.added} approved examples from {faq_path}")
    run = mutate_assistant(store, assistant.id, per_example=args.per_example, seed=0)
    approved = approve_all_in_run(store, run.id)
    print(f"2/5 generated {run.kept} local mutations (typos, layout, abbreviations …) and approved {approved}")
    return assistant, f"{settings.artifacts}/{name}/v1"


def _demo_train(app, args, assistant, out_dir: str) -> None:
    """Train a LoRA adapter on the approved examples and make it the active version."""
    from bot.cli.train import TrainingBar
    from tuning.data.dataset import items_from_store
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    store, settings = app.store, app.settings
    items = items_from_store(store, assistant.id)
    config = TrainConfig(base_model=settings.base_model, epochs=args.epochs, seed=0)
    print(f"3/5 training a LoRA adapter ({config.recipe} recipe) on {len(items)} examples ({settings.base_model}) "
          f"into {out_dir}")
    bar = TrainingBar(quiet=False)
    try:
        trained = train(items, out_dir=out_dir, config=config, system_prompt=assistant.system_prompt,
                        cache_dir=settings.models_cache, on_progress=bar)
    finally:
        bar.close()
    version = store.add_model_version(assistant.id, adapter_path=out_dir, base_model=settings.base_model,
                                      dataset_hash=trained.data_hash, hyperparameters=trained.hyperparameters)
    store.activate_version(version.id)
    print(f"    trained in {trained.duration_s:.0f} s ({trained.tokens_per_s:.0f} tokens/s); version #{version.id} active")


def _demo_evaluate(app, args, assistant, out_dir: str, folder, engine):
    """Every mode on the held-out rewordings and the out-of-scope questions: (held out, out of scope, result)."""
    from tuning.data.formats import read_examples
    from tuning.evaluate import evaluate, markdown_table

    settings = app.settings
    prefix = DEMOS[args.language][1]
    held_out = read_examples(folder / f"{prefix}_eval.jsonl").records[: args.max_eval]
    oos_path = folder / f"{prefix}_out_of_scope.jsonl"
    out_of_scope = [json.loads(line)["question"] for line in oos_path.read_text(encoding="utf-8").splitlines()
                    if line.strip()][: args.max_eval] if oos_path.exists() else []
    modes = ("base", "fewshot", "lookup", "tuned", "grounded")
    print(f"4/5 answering {len(held_out)} held-out customer questions and {len(out_of_scope)} out-of-scope ones "
          f"in every mode: {', '.join(modes)}")
    eval_bar = _progress((len(modes) - 1) * (len(held_out) + len(out_of_scope)), "evaluating")
    result = evaluate(held_out, base_model=settings.base_model, adapter_dir=out_dir, modes=modes,
                      system_prompt=assistant.system_prompt, cache_dir=settings.models_cache, max_new_tokens=64,
                      out_of_scope=out_of_scope, engine=engine,
                      on_progress=lambda mode, done, total: eval_bar.update(1))
    eval_bar.close()
    print()
    print(markdown_table(result))
    print()
    accuracy = json.dumps({m: v["accuracy"] for m, v in result["modes"].items()})
    app.store.update_assistant(assistant.id, description=f"{DEMOS[args.language][3]}: {accuracy}")
    return held_out, out_of_scope, result


def _demo_answers(app, engine, assistant, questions: list[str], *, threshold: float) -> None:
    """What the chat answers: the text, why it abstained (and the unanswered question it queued), its sources."""
    from tuning.answering.service import answer_question

    for question in questions:
        answer = answer_question(app.store, engine, assistant.id, question, indexes=app.indexes)
        print(f"Q: {question}\nA: {answer.text}")
        if answer.abstained:
            print(f"   (confidence {answer.confidence:.2f} below {threshold:.2f}: queued for "
                  f"the experts as unanswered #{answer.unanswered_id}; they answer it in /review)")
        if answer.sources:
            print("   sources: " + "; ".join(f"#{i} {q[:70]}" for i, q in answer.sources))
        print()
