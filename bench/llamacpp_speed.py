"""The llama.cpp backend against the torch engine, same run, same machine, same threads: first token, decode
tokens/s with 1 and 8 clients, adapter switches with 20 resident, equivalence of greedy answers on 40 probe
questions, and the time to export a version as GGUF + Ollama folder.

Prints JSON and writes bench/results/llamacpp_speed.json. The version is trained here on ACME's FAQ as
`tunebot train --data` trains one (mutations, the grounded recipe, hyperparameters from the data size), or
given with --version DIR (a folder `train --out` wrote). The probes are ACME's 40 held-out questions asked as
the version answers them (the nearest FAQ examples in the prompt, as in grounded answers), so that
must_contain accuracy means something for both. The other adapters (switches, 8 adapters at once) are random
LoRAs on every linear layer (A and B ~ N(0, 0.02), rank 16, as in serve_latency.py).
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
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = {"decode_ratio_1_client": 4.0, "decode_ratio_8_clients": 4.0, "ttft_ms": 100, "switch_ms": 10,
           "identical_share": 0.95, "accuracy_gap_points": 2, "export_s": 60,
           "torch_eight_adapters_ttft_ratio": 3.0, "llamacpp_eight_adapters_ttft_ratio": 3.0}


SYSTEM = "You answer for ACME Parcel."


def tuned_version(faq, out: Path, *, base_model: str, cache_dir: str) -> str:
    """A version trained on the FAQ as `tunebot train --data` trains one (mutations, default recipe)."""
    from tuning.data.dataset import TrainItem, add_mutations
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    items = add_mutations([TrainItem(r.question, r.answer, group=f"line{r.line}") for r in faq], n=2, seed=0)
    t0 = time.perf_counter()
    report = train(items, out_dir=out, config=TrainConfig(base_model=base_model), system_prompt=SYSTEM,
                   cache_dir=cache_dir)
    note(f"version trained in {time.perf_counter() - t0:.0f} s (best val loss {report.best_val_loss})")
    return str(out)


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def median(values) -> float:
    return round(statistics.median(values), 1)


def clients(engine, n: int, questions, *, adapter, max_new_tokens: int) -> dict:
    """n threads, each asking one question; tokens/s over the wall time."""
    results, lock = [], threading.Lock()

    def ask(q: str) -> None:
        a = engine.answer(q, adapter_dir=adapter, max_new_tokens=max_new_tokens)
        with lock:
            results.append(a)

    start = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(questions[i % len(questions)],)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(a.n_tokens for a in results)
    return {"clients": n, "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}


def first_tokens(engine, questions, adapters, *, max_new_tokens: int) -> dict:
    """8 clients at once, each on its own adapter (resident: each answered once before), each with a question
    not asked before: p50 time to first token, beside one client's alone, also on new questions (the same
    messages as answer() builds, so that both reuse the same cached prompt prefix)."""
    from tuning.answering.requests import prepare_messages

    n = len(adapters)
    for q, a in zip(questions, adapters):
        engine.answer(q, adapter_dir=a, max_new_tokens=1)
    alone = median([engine.answer(q, adapter_dir=adapters[0], max_new_tokens=max_new_tokens).ttft_ms
                    for q in questions[n:n + 3]])
    pending = [engine.submit(prepare_messages(q), adapter_dir=a, max_new_tokens=max_new_tokens)
               for q, a in zip(questions[n + 3:], adapters)]
    ttfts = sorted(round(g.result().ttft_ms, 1) for g in pending)
    return {"alone": alone, "p50": median(ttfts), "ttfts": ttfts}


def probe_answers(engine, probes, *, adapter, max_new_tokens: int) -> list[str]:
    pending = [engine.submit(messages, adapter_dir=adapter, max_new_tokens=max_new_tokens, temperature=0.0)
               for messages in probes]
    return [g.result().text.strip() for g in pending]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="bundled:smollm2-135m")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "test-models"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each backend (default 2)")
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--version", help="a trained folder (train --out) to probe; default: train one on ACME")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp_speed.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from serve_latency import make_adapters

    from tuning.evaluate import contains_all
    from tuning.export import export_model
    from tuning.data.formats import read_examples
    from tuning.answering.engine import Engine
    from tuning.answering.llamacpp import LlamaCppEngine
    from tuning.models import materialize
    from tuning.prompts import build_messages
    from tuning.grounding import Grounding, render_question
    from tuning.retrieval import Retriever, docs_from_pairs

    faq = read_examples(ROOT / "examples" / "acme_faq.jsonl").records
    held_out = read_examples(ROOT / "examples" / "acme_eval.jsonl").records[:40]
    index = Retriever(docs_from_pairs((r.question, r.answer) for r in faq))
    model_dir = materialize(args.base_model, args.cache_dir)
    n_tok = args.max_new_tokens
    short = "Do you deliver on Sundays?"
    result: dict = {"base_model": args.base_model, "threads": args.threads, "max_new_tokens": n_tok,
                    "version": args.version or "trained on examples/acme_faq.jsonl", "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        version = args.version or tuned_version(faq, Path(tmp) / "version", base_model=args.base_model,
                                                cache_dir=args.cache_dir)
        k = Grounding.load(version).k
        probes = [build_messages(render_question(r.question, index.search(r.question, k)), system_prompt=SYSTEM)
                  for r in held_out]
        result["probes"] = len(probes)
        adapters = [version] + make_adapters(model_dir, Path(tmp), args.adapters - 1, rank=16)
        answers = {}
        for name, make in (("torch", lambda: Engine(args.base_model, cache_dir=args.cache_dir,
                                                    adapter_cache_size=args.adapters, max_new_tokens=n_tok)),
                           ("llamacpp", lambda: LlamaCppEngine(args.base_model, cache_dir=Path(tmp) / "cache",
                                                               adapter_cache_size=args.adapters,
                                                               max_new_tokens=n_tok, n_threads=args.threads))):
            engine = make()
            t0 = time.perf_counter()
            engine.load()
            load_s = time.perf_counter() - t0
            engine.answer("Hello", max_new_tokens=4)  # warm-up
            first_ms = []
            for folder in adapters:  # first use of each: load (llama.cpp: convert to GGUF, then load)
                engine.answer("Hi", adapter_dir=folder, max_new_tokens=1)
                first_ms.append(engine.last_switch_ms)
            ttft = [engine.answer(short, adapter_dir=version, max_new_tokens=n_tok) for _ in range(args.repeats)]
            switch_ms = []
            for i in range(args.repeats * 2):  # between resident adapters
                engine.answer(short, adapter_dir=adapters[1 + i % (len(adapters) - 1)], max_new_tokens=2)
                switch_ms.append(engine.last_switch_ms)
            note(f"{name}: latency measured; concurrency next")
            questions = [r.question for r in held_out]  # each asked once per measurement (no cached prompt)
            one = [clients(engine, 1, [q], adapter=version, max_new_tokens=n_tok) for q in questions[:4]]
            eight = clients(engine, 8, questions[4:12], adapter=version, max_new_tokens=n_tok)
            many = first_tokens(engine, questions[12:31], adapters[:8], max_new_tokens=n_tok)
            note(f"{name}: probes next")
            t0 = time.perf_counter()
            answers[name] = probe_answers(engine, probes, adapter=version, max_new_tokens=n_tok)
            probes_s = time.perf_counter() - t0
            engine.close()
            result["backends"][name] = {
                "load_s": round(load_s, 1), "ttft_ms": median([a.ttft_ms for a in ttft]),
                "decode_tokens_per_s": median([a.tokens_per_s for a in ttft]),
                "one_client_tokens_per_s": median([r["tokens_per_s"] for r in one]),
                "eight_clients_tokens_per_s": eight["tokens_per_s"],
                "eight_adapters_ttft_ms_p50": many["p50"], "one_client_ttft_ms": many["alone"],
                "eight_adapters_ttft_ratio": round(many["p50"] / many["alone"], 1),
                "eight_adapters_ttfts_ms": many["ttfts"],
                "adapter_first_use_ms": median(first_ms), "switch_ms": median(switch_ms),
                "switch_ms_max": round(max(switch_ms), 1), "resident_adapters": args.adapters,
                "probes_s": round(probes_s, 1),
                "must_contain_accuracy": round(sum(contains_all(a, r.must_contain) for a, r in zip(answers[name], held_out))
                                               / len(held_out), 4)}
        note("export next")
        t0 = time.perf_counter()
        export_model(version, base_model=args.base_model, out_dir=Path(tmp) / "ollama", fmt="ollama",
                     cache_dir=args.cache_dir)
        export_s = time.perf_counter() - t0
    t, c = result["backends"]["torch"], result["backends"]["llamacpp"]
    same = sum(a == b for a, b in zip(answers["torch"], answers["llamacpp"]))
    result.update({
        "decode_ratio_1_client": round(c["one_client_tokens_per_s"] / t["one_client_tokens_per_s"], 2),
        "decode_ratio_8_clients": round(c["eight_clients_tokens_per_s"] / t["eight_clients_tokens_per_s"], 2),
        "ttft_ms": c["ttft_ms"], "switch_ms": c["switch_ms"],
        "identical_share": round(same / len(probes), 4), "identical": same,
        "accuracy_gap_points": round(100 * abs(c["must_contain_accuracy"] - t["must_contain_accuracy"]), 1),
        "export_s": round(export_s, 1), "targets": TARGETS,
        "torch_eight_adapters_ttft_ratio": t["eight_adapters_ttft_ratio"],
        "llamacpp_eight_adapters_ttft_ratio": c["eight_adapters_ttft_ratio"],
        # Where the answers part: a grounded answer's first word is its citation ("[2]"), the choice whose top
        # two candidates are closest; an answer that parts there cites (or abstains) otherwise.
        "differing_at_first_word": sum(a != b and a.split()[:1] != b.split()[:1]
                                       for a, b in zip(answers["torch"], answers["llamacpp"])),
        "differing_examples": [{"question": r.question, "torch": a, "llamacpp": b}
                               for r, a, b in zip(held_out, answers["torch"], answers["llamacpp"]) if a != b][:5]})
    higher = {"decode_ratio_1_client", "decode_ratio_8_clients", "identical_share"}
    result["meets_targets"] = {k: (result[k] >= v if k in higher else result[k] <= v) for k, v in TARGETS.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
