"""Evaluate an adapter the learning sweep kept (--keep DIR) again, in every mode, on a data set's held-out and
out-of-scope questions: to measure a change of the answer rules without training again.

    python bench/reevaluate.py --data ru --model KEEP/0 [--modes lookup,grounded] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    from learning_sweep import MODES, load_data

    from tuning.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True, help="an adapter folder the sweep kept")
    parser.add_argument("--base", default="bundled:smollm2-135m")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "test-models"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    _, held_out, oos, system = load_data(args.data)
    started = time.perf_counter()
    ev = evaluate(held_out, base_model=args.base, adapter_dir=args.model, modes=tuple(args.modes.split(",")),
                  system_prompt=system, cache_dir=args.cache_dir, max_new_tokens=args.max_new_tokens,
                  out_of_scope=oos, include_answers=True)
    row = {"data": args.data, "model": args.model, "eval_s": round(time.perf_counter() - started, 1),
           "modes": {m: {k: v[k] for k in ("accuracy", "answered_correctly", "abstain_rate")}
                     for m, v in ev["modes"].items()},
           "out_of_scope": ev.get("out_of_scope"), "retrieval": ev.get("retrieval"),
           "abstain_threshold": ev["abstain_threshold"], "no_answer_above": ev["no_answer_above"],
           "answers": ev["answers"], "out_of_scope_answers": ev.get("out_of_scope_answers")}
    print(json.dumps({k: v for k, v in row.items() if "answers" not in k}), file=sys.stderr, flush=True)
    text = json.dumps(row, indent=1, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
