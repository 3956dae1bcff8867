"""First-answer latency after a start, with and without preloading the base model (TUNEBOT_PRELOAD_MODELS).

Each case runs in a fresh process, as `tunebot run` would: the App is built, `App.preload()` is called (or not),
a question comes `--delay` seconds later and the time until its whole answer is measured. Prints JSON and writes
bench/results/first_answer.json. Without preloading the first answer pays for importing torch and loading the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("TUNEBOT_TEST_CACHE", ROOT / ".cache" / "test-models"))


def child(preload: bool, delay: float, model: str, max_new_tokens: int) -> dict:
    from bot.app import App, configure_threads
    from bot.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").symlink_to(CACHE.resolve())  # the dequantized weights, made once
        started = time.monotonic()
        settings = Settings(data_dir=Path(tmp), base_model=model, preload_models=preload,
                            max_new_tokens=max_new_tokens, torch_threads=1)
        configure_threads(settings)  # as the CLI does
        app = App(settings)
        assistant = app.store.create_assistant("acme", owner_id=1)
        app.preload()
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        ready = app.engine_ready(assistant.base_model)  # what the chat handler checks (the loading note)
        asked = time.monotonic()
        answer = app.engine_for(assistant.base_model).answer("How much does a small parcel cost?",
                                                             max_new_tokens=max_new_tokens)
        took = time.monotonic() - asked
        second = time.monotonic()
        app.engine_for(assistant.base_model).answer("Do you deliver on Sundays?", max_new_tokens=max_new_tokens)
        warm = time.monotonic() - second
        app.close_engines()
    return {"preload": preload, "delay_s": delay, "ready_when_asked": ready, "first_answer_s": round(took, 2),
            "warm_answer_s": round(warm, 2), "tokens": answer.n_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="bundled:smollm2-135m")
    p.add_argument("--delay", type=float, action="append", help="seconds from start to the question (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="runs of each case; the median is reported")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    delays = args.delay or [1.0, 15.0]
    if args.child:
        print(json.dumps(child(args.child == "on", delays[0], args.model, args.max_new_tokens)))
        return
    cases = []
    for delay in delays:
        for mode in ("off", "on"):
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--delay", str(delay), "--model",
                                      args.model, "--max-new-tokens", str(args.max_new_tokens)],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            cases.append({"preload": mode == "on", "delay_s": delay,
                          "ready_when_asked": [r["ready_when_asked"] for r in runs],
                          "first_answer_s": statistics.median(r["first_answer_s"] for r in runs),
                          "warm_answer_s": statistics.median(r["warm_answer_s"] for r in runs),
                          "first_answer_s_runs": [r["first_answer_s"] for r in runs]})
    by = {(c["delay_s"], c["preload"]): c["first_answer_s"] for c in cases}
    result = {"model": args.model, "cases": cases,
              "speedup": {f"delay_{d}s": round(by[(d, False)] / max(by[(d, True)], 1e-9), 1) for d in delays}}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "first_answer.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
