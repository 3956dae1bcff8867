"""Learning quality per training setting and data set: every answer mode beside the model-free lookup baseline.

Each setting trains a LoRA adapter on a FAQ plus N local mutations per question (validation = held-out
mutations, as `tunebot train --data X --augment mutate` does), then answers held-out customer-style questions
greedily in every mode, and an out-of-scope file for the abstain rates. Data sets:

- `acme` (examples/acme_faq.jsonl + acme_eval.jsonl): the set hyperparameters were chosen on;
- `harbor` (en) and `ru` (examples/harbor_*.jsonl, ru_*.jsonl): written separately, the report sets;
- `harbor_ru`: Russian customers asking the English Harbor Line FAQ (cross-lingual; examples/harbor_ru_*.jsonl);
- `gen:N[:LANG[:SEED]]`: N invented facts from bench/faqgen.py (names and numbers no model knows).

    python bench/learning_sweep.py --data acme "recipe=grounded" "recipe=closed,epochs=12" [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SYSTEMS = {"acme": "You answer customer questions for ACME Parcel, a parcel delivery company.",
           "harbor": "You answer customer questions for Harbor Line, a ferry and marina company.",
           "ru": "Ты отвечаешь на вопросы пациентов клиники «Здоровье+»."}
MODES = ("base", "fewshot", "lookup", "tuned", "grounded")
FAQ_OF = {"harbor_ru": "harbor", "acme_ru": "acme"}  # Russian questions asked of an English FAQ
SYSTEMS.update({name: SYSTEMS[faq] for name, faq in FAQ_OF.items()})


def parse_setting(text: str) -> dict:
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        out[key.strip()] = json.loads(value) if value.strip()[0] in "0123456789-[{tf" else value
    return out


def load_data(name: str):
    """(train pairs, held-out items, out-of-scope questions, system prompt) of a data set."""
    from tuning.data.formats import read_examples

    def jsonl(path):
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

    if name.startswith("gen:"):
        from faqgen import generate_faq

        parts = name.split(":")
        n, language = int(parts[1]), parts[2] if len(parts) > 2 else "en"
        seed = int(parts[3]) if len(parts) > 3 else 0
        pairs, test = generate_faq(n + 20, language=language, seed=seed)
        known = {p["answer"] for p in pairs[:n]}
        # out of scope: the same kinds of question about 20 invented entities the FAQ does not have
        oos = [t["question"] for t in test if t["answer"] not in known][::2]
        return [(p["question"], p["answer"]) for p in pairs[:n]], [t for t in test if t["answer"] in known], oos, ""
    faq = read_examples(ROOT / "examples" / f"{FAQ_OF.get(name, name)}_faq.jsonl").records
    held_out = jsonl(ROOT / "examples" / f"{name}_eval.jsonl")
    oos_path = ROOT / "examples" / f"{name}_out_of_scope.jsonl"
    oos = [r["question"] for r in jsonl(oos_path)] if oos_path.exists() else []
    return [(r.question, r.answer) for r in faq], held_out, oos, SYSTEMS.get(name, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--data", default="acme")
    parser.add_argument("--per-example", type=int, default=3)
    parser.add_argument("--base", default="bundled:smollm2-135m")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "test-models"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--answers", action="store_true", help="keep every answer, confidence and log-probability")
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", default=None, help="copy each trained adapter to KEEP/<n> (to re-evaluate it)")
    args = parser.parse_args()

    from tuning.data.dataset import TrainItem, add_mutations
    from tuning.evaluate import evaluate
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    pairs, held_out, oos, system = load_data(args.data)
    items = add_mutations([TrainItem(q, a, group=str(i)) for i, (q, a) in enumerate(pairs)],
                          n=args.per_example, seed=0)
    result: dict = {"data": args.data, "base_model": args.base, "facts": len(pairs), "items": len(items),
                    "held_out": len(held_out), "out_of_scope": len(oos), "settings": []}
    modes = tuple(args.modes.split(","))
    for text in args.settings:
        given = parse_setting(text)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = train(items, out_dir=tmp, config=TrainConfig(base_model=args.base, **given),
                           system_prompt=system, cache_dir=args.cache_dir)
            trained_s = time.perf_counter() - started
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training is the first thing run
            started = time.perf_counter()
            ev = evaluate(held_out, base_model=args.base, adapter_dir=tmp, modes=modes, system_prompt=system,
                          cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens, out_of_scope=oos,
                          include_answers=args.answers)
            eval_s = time.perf_counter() - started
            if args.keep:
                import shutil

                shutil.copytree(tmp, Path(args.keep) / str(len(result["settings"])), dirs_exist_ok=True)
        row = {"setting": given, "modes": {m: {"accuracy": v["accuracy"], "f1": v["f1"],
                                               "answered_correctly": v["answered_correctly"],
                                               "abstain_rate": v["abstain_rate"]} for m, v in ev["modes"].items()},
               "out_of_scope": ev.get("out_of_scope"), "retrieval": ev.get("retrieval"),
               "abstain_threshold": ev["abstain_threshold"], "no_answer_above": ev.get("no_answer_above"),
               "epochs_run": len(report.epochs),
               "epochs_planned": report.hyperparameters["epochs"], "best_epoch": report.best_epoch,
               "best_val_loss": report.best_val_loss, "train_s": round(trained_s, 1),
               "train_peak_rss_mb": round(peak_mb), "eval_s": round(eval_s, 1),
               "tokens_per_s": report.tokens_per_s, "train_rows": report.counts.get("train_rows"),
               "learning_rate": report.hyperparameters["learning_rate"]}
        if args.answers:
            row["answers"], row["out_of_scope_answers"] = ev["answers"], ev.get("out_of_scope_answers")
        result["settings"].append(row)
        print(json.dumps({k: v for k, v in row.items() if "answers" not in k}), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
