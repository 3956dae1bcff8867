"""Training throughput: tunebot's packed, answer-only LoRA loop vs transformers Trainer with padding, per base.

For each base model (default: both bundled ones, SmolLM2-135M and Gemma 3 270M), both runs: LoRA r=16 on all
linear layers, the same 200 Q&A pairs (the first 40 facts of examples/*_faq.jsonl, 5 pairs each, built
deterministically with templates, short and long), the same epochs and learning rate.
Baseline: transformers Trainer, default padding collator, loss on the whole sequence (its full logits), batches
of 8. Each run is a separate process so peak RSS is its own. Reported: real (non-padding) tokens per second of the
training steps, peak RSS, and the validation loss on the answer tokens of the same held-out set.

    python bench/train_throughput.py [--base bundled:gemma3-270m ...] [--epochs 1] [--train 200] [--val 24]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASES = ("bundled:smollm2-135m", "bundled:gemma3-270m")
LR = 1e-3
RANK = 16
BATCH = 8
SYSTEM = "You answer customer questions for ACME Parcel."


def build_pairs() -> list[tuple[str, str]]:
    """A realistic mix of short and long pairs from examples/ FAQs, deterministic."""
    from tuning.data.formats import read_examples

    base: list[tuple[str, str]] = []
    for path in sorted((ROOT / "examples").glob("*_faq.jsonl")):
        base += [(r.question, r.answer) for r in read_examples(path).records]
    pairs = []
    for i, (q, a) in enumerate(base):
        nxt, other = base[(i + 1) % len(base)], base[(i + 7) % len(base)]
        first = a.split(";")[0].split(". ")[0].rstrip(".") + "."
        pairs += [
            (q, a),
            (f"Quick one: {q[0].lower() + q[1:]}", first),
            (f"{q} Please explain in detail, I also wonder: {nxt[0]}",
             f"{a} As for your second question: {nxt[1]} One more thing you may find useful: {other[1]}"),
            (f"Customer asks: {q}", f"Thanks for asking! {a} Is there anything else I can help you with?"),
            (f"{q.rstrip('?')} — and {other[0][0].lower() + other[0][1:]}", f"{a} Also: {other[1]}"),
        ]
    return pairs


def split(pairs, n_train: int, n_val: int):
    val = pairs[::10][:n_val]
    held = set(val)
    train = [p for p in pairs if p not in held][:n_train]
    return train, val


def val_rows(tokenizer, val, batch_tokens: int):
    from tuning.data.dataset import encode_items, items_from_pairs, pack

    return pack(encode_items(tokenizer, items_from_pairs(val), system_prompt=SYSTEM), batch_tokens=batch_tokens)


def run_tunebot(args) -> dict:
    from tuning.data.dataset import TrainItem, encode_items
    from tuning.models import load_tokenizer
    from tuning.training.config import TrainConfig
    from tuning.training.model import peak_rss_mb
    from tuning.training.run import train

    train_pairs, val = split(build_pairs(), args.train, args.val)
    items = [TrainItem(q, a, group=f"t{i}") for i, (q, a) in enumerate(train_pairs)]
    items += [TrainItem(q, a, group=f"v{i}", split="val") for i, (q, a) in enumerate(val)]
    tok = load_tokenizer(args.base, cache_dir=args.cache_dir)
    lengths = [len(e.input_ids) for e in encode_items(tok, items[:len(train_pairs)], system_prompt=SYSTEM)]
    batch_tokens = BATCH * sum(lengths) // len(lengths)  # as many examples per step as the baseline
    report = train(items, out_dir=args.out / "tunebot", resume=False, system_prompt=SYSTEM, cache_dir=args.cache_dir,
                   config=TrainConfig(base_model=args.base, epochs=args.epochs, learning_rate=LR, lora_rank=RANK,
                                      batch_tokens=batch_tokens, val_share=0.0, patience=args.epochs + 1,
                                      recipe="closed"))  # the baseline's rows: no retrieved examples
    return {"tokens_per_s": report.tokens_per_s, "val_loss": report.epochs[-1]["val_loss"],
            "peak_rss_mb": peak_rss_mb(), "steps": report.steps, "real_tokens": report.counts["train_tokens"],
            "val_loss_before": report.extra.get("val_loss_before"), "batch_tokens": batch_tokens}


def run_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from tuning.models import load_base_model
    from tuning.prompts import training_messages
    from tuning.training.model import evaluate_loss, peak_rss_mb

    train_pairs, val = split(build_pairs(), args.train, args.val)
    model, tok = load_base_model(args.base, cache_dir=args.cache_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.baseline_pairs and args.baseline_pairs < len(train_pairs):  # an evenly spread share, same mix
        step = len(train_pairs) / args.baseline_pairs
        train_pairs = [train_pairs[int(i * step)] for i in range(args.baseline_pairs)]
    texts = [tok.apply_chat_template(training_messages(q, a, system_prompt=SYSTEM), tokenize=False)
             for q, a in train_pairs]
    dataset = [{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    real_tokens = sum(len(d["input_ids"]) for d in dataset)

    class Timer(TrainerCallback):
        seconds, started, steps = 0.0, 0.0, 0

        def on_step_begin(self, *a, **k):
            Timer.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            Timer.seconds += time.perf_counter() - Timer.started
            Timer.steps += 1

    targs = TrainingArguments(output_dir=str(args.out / "baseline"), per_device_train_batch_size=BATCH,
                              num_train_epochs=args.epochs, learning_rate=LR, lr_scheduler_type="cosine",
                              warmup_steps=max(1, int(0.06 * args.epochs * -(-len(dataset) // BATCH))), logging_steps=10, save_strategy="no", report_to=[],
                              seed=0, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Timer()],
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    rows = val_rows(tok, val, batch_tokens=4096)
    device = next(model.parameters()).device
    return {"tokens_per_s": round(real_tokens * args.epochs / Timer.seconds, 1),
            "val_loss": round(evaluate_loss(model, rows, device), 5), "peak_rss_mb": peak_rss_mb(),
            "steps": Timer.steps, "real_tokens": real_tokens, "pairs": len(train_pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="append", help="base model (repeat for several; default: both bundled)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train", type=int, default=200, help="training pairs")
    parser.add_argument("--val", type=int, default=24, help="held-out pairs")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "test-models")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench-train")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    parser.add_argument("--baseline-pairs", type=int, default=0,
                        help="train the (slow) baseline on an evenly spread share of the pairs only (its tokens/s "
                             "is still measured over its own steps)")
    parser.add_argument("--only", choices=("tunebot", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        args.base = args.base[0]
        result = run_tunebot(args) if args.only == "tunebot" else run_baseline(args)
        print("RESULT " + json.dumps(result))
        return
    from tuning.models import materialize

    train_pairs, val = split(build_pairs(), args.train, args.val)
    out = {"bases": {}, "setup": {"lora_rank": RANK, "learning_rate": LR, "epochs": args.epochs,
                                  "train_pairs": len(train_pairs), "facts": len({q for q, _ in train_pairs[::5]}),
                                  "val_pairs": len(val), "baseline_batch": BATCH,
                                  "baseline_pairs": args.baseline_pairs or len(train_pairs),
                                  "torch_threads": __import__("torch").get_num_threads()}}
    for base in args.base or BASES:
        started = time.perf_counter()
        materialize(base, args.cache_dir)  # dequantize once, outside the timed runs
        results = {"materialize_s": round(time.perf_counter() - started, 1)}
        for name in ("baseline", "tunebot"):
            cmd = [sys.executable, __file__, "--only", name, "--base", base, "--epochs", str(args.epochs),
                   "--train", str(args.train), "--val", str(args.val), "--baseline-pairs", str(args.baseline_pairs), "--cache-dir", str(args.cache_dir),
                   "--out", str(args.out / base.replace(":", "_"))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{base}: {name} run failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(line[len("RESULT "):])
        results["ratio"] = round(results["tunebot"]["tokens_per_s"] / results["baseline"]["tokens_per_s"], 2)
        results["peak_ratio"] = round(results["tunebot"]["peak_rss_mb"] / results["baseline"]["peak_rss_mb"], 2)
        out["bases"][base] = results
        print(json.dumps({base: results}), file=sys.stderr)
    text = json.dumps(out, indent=2)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text + "\n")


if __name__ == "__main__":
    main()
