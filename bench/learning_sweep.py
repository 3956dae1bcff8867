"""Learning quality per training setting: the demo's data, held-out paraphrases, must_contain accuracy.

Each setting trains a LoRA adapter on the ACME FAQ (examples/acme_faq.jsonl) plus N local mutations per
question (validation = held-out mutations, as in `tunebot demo`), then answers the 40 paraphrased
questions of examples/acme_eval.jsonl greedily. Base and few-shot are measured once, as the baselines
of the same run. Settings are `key=value,...` over TrainConfig fields.

    python bench/learning_sweep.py "epochs=6" "epochs=12" "epochs=12,learning_rate=2e-3" [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEM = "You answer customer questions for ACME Parcel, a parcel delivery company."  # as in `tunebot demo`


def parse_setting(text: str) -> dict:
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        out[key.strip()] = json.loads(value) if value.strip()[0] in "0123456789-[{tf" else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--per-example", type=int, default=3)
    parser.add_argument("--base", default="bundled:smollm2-135m")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "test-models"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--baselines", action="store_true", help="also measure base and few-shot")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from tuning.dataset import TrainItem, add_mutations
    from tuning.evaluate import evaluate
    from tuning.formats import read_examples
    from tuning.train import TrainConfig, train

    faq = read_examples(ROOT / "examples" / "acme_faq.jsonl").records
    held_out = read_examples(ROOT / "examples" / "acme_eval.jsonl").records
    items = add_mutations([TrainItem(r.question, r.answer, group=str(i)) for i, r in enumerate(faq)],
                          n=args.per_example, seed=0)
    result: dict = {"base_model": args.base, "facts": len(faq), "items": len(items), "held_out": len(held_out),
                    "settings": []}
    if args.baselines:
        started = time.perf_counter()
        base = evaluate(held_out, base_model=args.base, modes=("base", "fewshot"),
                        fewshot=[(r.question, r.answer) for r in faq], system_prompt=SYSTEM,
                        cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens)
        result["baselines"] = {m: {k: v[k] for k in ("accuracy", "f1")} for m, v in base["modes"].items()}
        result["baselines"]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result["baselines"]), file=sys.stderr)
    for text in args.settings:
        given = parse_setting(text)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = train(items, out_dir=tmp, config=TrainConfig(base_model=args.base, **given),
                           system_prompt=SYSTEM, cache_dir=args.cache_dir)
            trained_s = time.perf_counter() - started
            tuned = evaluate(held_out, base_model=args.base, adapter_dir=tmp, modes=("tuned",),
                             system_prompt=SYSTEM, cache_dir=args.cache_dir,
                             max_new_tokens=args.max_new_tokens)["modes"]["tuned"]
        row = {"setting": given, "accuracy": tuned["accuracy"], "f1": tuned["f1"],
               "stop_rate": tuned.get("stop_rate"), "epochs_run": len(report.epochs),
               "best_epoch": report.best_epoch, "best_val_loss": report.best_val_loss,
               "train_s": round(trained_s, 1), "tokens_per_s": report.tokens_per_s,
               "learning_rate": report.hyperparameters["learning_rate"],
               "lora_rank": report.hyperparameters["lora_rank"]}
        result["settings"].append(row)
        print(json.dumps(row), file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
