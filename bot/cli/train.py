"""CLI commands `train --data FILE --out DIR` and `eval --model DIR --data FILE` (train --assistant: bot.cli.jobs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bot.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `eval` to the `tunebot` parser."""
    train = subparsers.add_parser(
        "train", help="fine-tune a model on question-answer pairs",
        description="Fine-tune the base model with LoRA (default) on a file of question-answer pairs "
                    "(--data FILE --out DIR), or queue a run of an assistant's approved examples "
                    "(--assistant NAME). Hyperparameters left out are chosen from the data size.")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    ev = subparsers.add_parser(
        "eval", help="compare base, few-shot, lookup, tuned and grounded answers on a test file",
        description="Answer every question of a test file with the base model, the base model with few-shot "
                    "examples in the prompt, the nearest example's answer (lookup: no model, the baseline), "
                    "the tuned model closed book, and the tuned model given the retrieved examples (grounded); "
                    "report must_contain accuracy, token F1, ROUGE-L, how often answers end by themselves, "
                    "how often the assistant would say it does not know, retrieval recall, time to first "
                    "token and tokens/s.")
    ev.add_argument("--model", metavar="DIR", help="a folder written by `tunebot train` (needed for 'tuned')")
    ev.add_argument("--data", metavar="FILE", required=True, help="test questions (JSONL/CSV; must_contain optional)")
    ev.add_argument("--compare", default=None, metavar="MODES",
                    help="comma-separated modes among base,fewshot,lookup,tuned,grounded "
                         "(default: all that the inputs allow)")
    ev.add_argument("--fewshot-data", metavar="FILE",
                    help="examples to retrieve from for fewshot/lookup/grounded (default: the retrieval index the "
                         "training run saved in --model)")
    ev.add_argument("--out-of-scope", metavar="FILE",
                    help="questions the examples do not answer: reports how often each mode says it does not know")
    ev.add_argument("--k", type=int, default=None,
                    help="retrieved examples per grounded answer (default: what the model was trained with)")
    ev.add_argument("--base-model", default=None, help="default: the model's own base, else the base_model setting")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ev.add_argument("--answers", action="store_true", help="include every answer in the output")
    ev.add_argument("--json", action="store_true", help='print one JSON object {"n", "modes": {…}}')
    ev.set_defaults(func=cmd_eval)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` options; dests are TrainConfig field names (bot.cli.jobs forwards them to queued runs)."""
    from bot.cli.jobs import add_assistant_arguments

    parser.add_argument("--data", metavar="FILE", help="question-answer pairs (JSONL or CSV) to train on")
    parser.add_argument("--out", metavar="DIR", help="output folder (adapter, report, loss curve); "
                                                     "an interrupted run in it resumes")
    add_assistant_arguments(parser)
    parser.add_argument("--base-model", default=None, help="hub id, folder, .gguf or bundled:smollm2-135m "
                                                           "(default: the base_model setting)")
    parser.add_argument("--method", choices=("lora", "dora", "qlora", "full"), default=None,
                        help="lora (default, all linear layers), dora, qlora (CUDA only), full (small models)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--lr", dest="learning_rate", type=float, default=None, help="learning rate")
    parser.add_argument("--rank", dest="lora_rank", type=int, default=None, help="LoRA rank")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per packed batch")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="data-parallel processes, one per GPU (default: one per visible GPU, 1 on CPU)")
    parser.add_argument("--accumulate", type=int, default=None, metavar="N",
                        help="packed rows per process per optimizer step (default 1)")
    parser.add_argument("--recipe", choices=("grounded", "closed"), default=None,
                        help="grounded (default): each row shows the question with retrieved examples, so the "
                             "model learns to pick and copy the right fact (and some rows without the right one, "
                             "so it learns the facts too); closed: the question alone (closed book)")
    parser.add_argument("--grounded-k", type=int, default=None, metavar="K",
                        help="retrieved examples per grounded row and answer (default 3)")
    parser.add_argument("--augment", default=None, metavar="mutate[:N]|none",
                        help="add N rule-based mutations (typos, layout, …) per example as variations; "
                             "default: mutate with the mutations_per_example setting when the file has none")
    parser.add_argument("--system-prompt", default="", help="system prompt used in training and at inference")
    parser.add_argument("--no-resume", action="store_true", help="start over even if DIR has a checkpoint")
    parser.add_argument("--json", action="store_true", help="print the training report as JSON")


def parse_augment(value: str | None, default_n: int) -> int | None:
    """Mutations per example: None = automatic, 0 = none."""
    if value is None:
        return None
    value = value.strip().lower()
    if value == "none":
        return 0
    if value == "mutate":
        return default_n
    if value.startswith("mutate:"):
        try:
            n = int(value.split(":", 1)[1])
        except ValueError:
            n = -1
        if n >= 0:
            return n
    raise CommandError(f"--augment: expected mutate, mutate:N or none, got {value!r}")


def _read(path: str, what: str):
    from tuning.data.formats import read_examples

    if not Path(path).exists():
        raise CommandError(f"{what} {path!r} does not exist")
    result = read_examples(Path(path))
    for err in result.errors[:10]:
        print(f"{path}: line {err.line}: {err.reason} (skipped)", file=sys.stderr)
    if len(result.errors) > 10:
        print(f"{path}: {len(result.errors) - 10} more bad lines skipped", file=sys.stderr)
    if not result.records:
        raise CommandError(f"{path} has no readable question-answer pairs")
    return result.records


def _read_questions(path: str, what: str) -> list[str]:
    """Questions alone: JSONL lines with a "question" (answers are not needed), or one question per text line."""
    if not Path(path).exists():
        raise CommandError(f"{what} {path!r} does not exist")
    questions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            text = row.get("question") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                print(f"{path}: line {number}: no \"question\" text (skipped)", file=sys.stderr)
                continue
            line = text.strip()
        questions.append(line)
    if not questions:
        raise CommandError(f"{path} has no questions")
    return questions


class TrainingBar:
    """on_progress for a training in a terminal: a tqdm bar on a terminal; one line per epoch on stderr otherwise."""

    def __init__(self, quiet: bool):
        self.bar = None
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def __call__(self, p) -> None:  # a tuning.training.progress.TrainProgress
        if self.tty:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=p.total_steps, desc="training", unit="step", file=sys.stderr)
            self.bar.n = p.step
            self.bar.set_postfix(epoch=p.epoch, loss=p.loss, val=p.val_loss, tok_s=p.tokens_per_s, refresh=True)
        elif not self.quiet and p.epoch_done:
            val = "" if p.val_loss is None else f", val loss {p.val_loss:.4f}"
            print(f"epoch {p.epoch}: loss {p.loss:.4f}{val}, {p.tokens_per_s:.0f} tokens/s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_train(args, app) -> int:
    """`tunebot train`: --assistant queues a run (bot.cli.jobs); --data trains here and now."""
    if getattr(args, "assistant", None):
        if args.data:
            raise CommandError("give either --assistant NAME or --data FILE, not both")
        from bot.cli.jobs import train_assistant

        return train_assistant(args, app)
    if not args.data or not args.out:
        raise CommandError("train needs --data FILE --out DIR (or --assistant NAME)")
    from tuning.data.dataset import TrainItem, add_mutations
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    settings = app.settings
    records = _read(args.data, "--data")
    items = [TrainItem(r.question, r.answer, group=f"line{r.line}", split=r.split) for r in records]
    n = parse_augment(args.augment, settings.mutations_per_example)
    if n is None:
        n = settings.mutations_per_example if not any(i.variation for i in items) else 0
    if n:
        items = add_mutations(items, n=n, seed=args.seed or 0)
    from bot.cli.jobs import train_options

    config = TrainConfig(base_model=args.base_model or settings.base_model, **train_options(args))
    progress = TrainingBar(quiet=False)
    try:
        report = train(items, out_dir=args.out, config=config, system_prompt=args.system_prompt,
                       cache_dir=settings.models_cache, on_progress=progress, resume=not args.no_resume)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0
    print(f"trained {report.method} on {report.counts['train']} examples ({n} mutations per example added), "
          f"{len(report.epochs)} epochs, best epoch {report.best_epoch}"
          + (f" (val loss {report.best_val_loss:.4f})" if report.best_val_loss is not None else ""))
    print(f"{report.tokens_per_s:.0f} tokens/s, peak memory {report.peak_rss_mb:.0f} MB, {report.duration_s:.0f} s")
    print(report.note)
    print(f"adapter, training_report.json and loss_curve.png in {report.out_dir}")
    return 0


def cmd_eval(args, app) -> int:
    """`tunebot eval`: base / few-shot / tuned side by side on a test file."""
    from tuning.evaluate import MODES, evaluate, markdown_table

    model_dir = Path(args.model) if args.model else None
    if model_dir is not None and not model_dir.is_dir():
        raise CommandError(f"--model {args.model!r} is not a folder written by `tunebot train`")
    items = _read(args.data, "--data")
    if args.limit:
        items = items[:args.limit]
    fewshot: list[tuple[str, str]] = []
    has_index = model_dir is not None and (model_dir / "retrieval" / "meta.json").exists()
    if args.fewshot_data:
        fewshot = [(r.question, r.answer) for r in _read(args.fewshot_data, "--fewshot-data")]
    elif not has_index and model_dir is not None and (model_dir / "fewshot_pool.jsonl").exists():
        fewshot = [(r.question, r.answer) for r in _read(str(model_dir / "fewshot_pool.jsonl"), "few-shot pool")]
    out_of_scope = _read_questions(args.out_of_scope, "--out-of-scope") if args.out_of_scope else []
    retrievable = bool(fewshot) or has_index
    if args.compare:
        modes = [m.strip() for m in args.compare.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise CommandError(f"--compare: unknown mode(s) {', '.join(bad) or '(none)'}; choose from {','.join(MODES)}")
    else:
        modes = ["base"] + (["fewshot", "lookup"] if retrievable else []) + (["tuned"] if model_dir else []) \
            + (["grounded"] if model_dir and retrievable else [])
    for mode in ("tuned", "grounded"):
        if mode in modes and model_dir is None:
            raise CommandError(f"--compare {mode} needs --model DIR")
    for mode in ("fewshot", "lookup", "grounded"):
        if mode in modes and not retrievable:
            raise CommandError(f"--compare {mode} needs --fewshot-data FILE (or a --model folder from `tunebot train`)")
    base_model = args.base_model
    if base_model is None and model_dir is not None and (model_dir / "train_config.json").exists():
        base_model = json.loads((model_dir / "train_config.json").read_text())["config"]["base_model"]
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(items) * len(modes), desc="evaluating", unit="answer", file=sys.stderr)
    try:
        result = evaluate(items, base_model=base_model or app.settings.base_model,
                          adapter_dir=str(model_dir) if model_dir else None, modes=modes, fewshot=fewshot,
                          cache_dir=app.settings.models_cache, max_new_tokens=args.max_new_tokens, k=args.k,
                          include_answers=args.answers, out_of_scope=out_of_scope,
                          backend="llamacpp" if app.settings.inference_backend == "llamacpp" else "local",
                          on_progress=(lambda *_: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(markdown_table(result))
    return 0
