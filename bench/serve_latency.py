"""Serving latency on the bundled model: first token, tokens/s, adapter switches, 8 clients vs 1, adapter overhead.

Prints JSON and writes bench/results/serve_latency.json. Ratios (adapter vs base, 8 clients vs 1) hold on a
noisy machine; absolute times are for this machine only. 8 clients on one adapter are decoded as one batch;
8 clients on 8 adapters are served one adapter batch at a time. `batched_equals_unbatched` checks that the
batched greedy answers are the same text as the one-at-a-time ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ["How much does a small parcel cost?", "Do you deliver on Sundays?", "Where is my parcel?",
             "Can I send a parcel to Belgium?", "What is the maximum weight?", "How do I return a parcel?"]
TARGETS = {"ttft_ms": 300, "switch_ms": 50}


def make_adapters(model_dir: str, out: Path, n: int, *, rank: int) -> list[str]:
    """n random LoRA adapters (all linear layers) for the model, saved quickly by re-initialising one PeftModel."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        folder = out / f"adapter{i:02d}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def timed(engine, question: str, *, adapter_dir=None, max_new_tokens: int):
    return engine.answer(question, adapter_dir=adapter_dir, max_new_tokens=max_new_tokens)


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def median(values) -> float:
    return round(statistics.median(values), 1)


def clients(engine, n_clients: int, per_client: int, *, adapters, max_new_tokens: int) -> dict:
    """n_clients threads each asking per_client questions in turn; tokens/s over the wall time."""
    results, texts, lock = [], {}, threading.Lock()

    def client(c: int) -> None:
        for j in range(per_client):
            question, adapter = QUESTIONS[(c + j) % len(QUESTIONS)], adapters[(c + j) % len(adapters)]
            a = engine.answer(question, adapter_dir=adapter, max_new_tokens=max_new_tokens)
            with lock:
                results.append(a)
                texts[question, adapter] = a.text

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": n_clients, "requests": len(results), "tokens": sum(a.n_tokens for a in results),
            "wall_s": round(wall, 2), "tokens_per_s": round(sum(a.n_tokens for a in results) / wall, 1),
            "ttft_ms_p50": median([a.ttft_ms for a in results]),
            "ttft_ms_max": round(max(a.ttft_ms for a in results), 1), "texts": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="bundled:smollm2-135m")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "test-models"))
    parser.add_argument("--adapters", type=int, default=20, help="resident adapters for the switch test")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a machine shared with other jobs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_latency.json"))
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tuning.answering.engine import Engine
    from tuning.models import materialize

    model_dir = materialize(args.base_model, args.cache_dir)
    engine = Engine(args.base_model, cache_dir=args.cache_dir, adapter_cache_size=args.adapters,
                    max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        adapters = make_adapters(model_dir, Path(tmp), args.adapters, rank=args.rank)
        make_s = time.perf_counter() - t0
        n_tok = args.max_new_tokens
        note(f"base loaded in {load_s:.1f} s, {len(adapters)} adapters made in {make_s:.1f} s")
        timed(engine, "Hello", max_new_tokens=4)  # warm-up
        # Cold loads of every adapter (they all stay resident: cache size = number of adapters).
        load_ms = []
        for folder in adapters:
            timed(engine, "Hi", adapter_dir=folder, max_new_tokens=1)
            load_ms.append(engine.last_switch_ms)
        assert len(engine.resident_adapters) == len(adapters)
        note(f"adapters loaded: median {median(load_ms)} ms each")
        question = QUESTIONS[0]
        base = [timed(engine, question, max_new_tokens=n_tok) for _ in range(args.repeats)]
        same = [timed(engine, question, adapter_dir=adapters[0], max_new_tokens=n_tok) for _ in range(args.repeats)]
        switched, switch_ms = [], []
        for i in range(args.repeats * 2):
            switched.append(timed(engine, question, adapter_dir=adapters[1 + i % (len(adapters) - 1)],
                                  max_new_tokens=n_tok))
            switch_ms.append(engine.last_switch_ms)
        note("latency measured; concurrency next")
        one = clients(engine, 1, 8, adapters=adapters[:1], max_new_tokens=n_tok)
        eight = clients(engine, 8, 1, adapters=adapters[:1], max_new_tokens=n_tok)
        largest_batch = getattr(engine, "largest_batch", 1)  # engines before batching had none
        one_many = clients(engine, 1, 8, adapters=adapters[:8], max_new_tokens=n_tok)
        eight_many = clients(engine, 8, 1, adapters=adapters[:8], max_new_tokens=n_tok)
        alone = {**one["texts"], **one_many["texts"]}
        batched_same = all(text == alone[k] for k, text in {**eight["texts"], **eight_many["texts"]}.items())
        for run in (one, eight, one_many, eight_many):
            del run["texts"]
        # The baseline for switching: peft's own set_adapter (walks all modules, toggles grads of every adapter).
        names = list(engine._adapters.values())
        peft_ms = []
        for i in range(6):
            t0 = time.perf_counter()
            engine._peft.set_adapter(names[i % len(names)])
            peft_ms.append((time.perf_counter() - t0) * 1000)
    engine.close()
    result = {
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "base_model": args.base_model, "question": question, "max_new_tokens": n_tok,
        "ttft_ms": median([a.ttft_ms for a in same]),
        "tokens_per_s": median([a.tokens_per_s for a in same]),
        "switch_ms": median(switch_ms),
        "switch_ms_max": round(max(switch_ms), 1),
        "switch_ms_peft_set_adapter": median(peft_ms),
        "switch_added_ttft_ms": round(median([a.ttft_ms for a in switched]) - median([a.ttft_ms for a in same]), 1),
        "resident_adapters": args.adapters,
        "adapter_load_ms": median(load_ms),
        "base": {"ttft_ms": median([a.ttft_ms for a in base]), "tokens_per_s": median([a.tokens_per_s for a in base])},
        "adapter_overhead": {
            "ttft_ratio": round(median([a.ttft_ms for a in same]) / median([a.ttft_ms for a in base]), 3),
            "tokens_per_s_ratio": round(median([a.tokens_per_s for a in same]) /
                                        median([a.tokens_per_s for a in base]), 3)},
        "concurrency": {"one_client": one, "eight_clients": eight,
                        "throughput_ratio_8_vs_1": round(eight["tokens_per_s"] / one["tokens_per_s"], 3),
                        "largest_batch": largest_batch, "batched_equals_unbatched": batched_same,
                        "eight_adapters": {
                            "one_client": one_many, "eight_clients": eight_many,
                            "throughput_ratio_8_vs_1": round(eight_many["tokens_per_s"] / one_many["tokens_per_s"], 3)}},
        "setup_s": {"load_base": round(load_s, 1), "make_adapters": round(make_s, 1)},
        "targets": TARGETS,
    }
    result["meets_targets"] = {k: result[k] < v for k, v in TARGETS.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
