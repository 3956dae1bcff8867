"""Data-parallel training: N rank processes vs one process accumulating the same rows per step.

Both runs train the same adapter with the same optimizer steps (each step = N packed rows), so the
adapters must agree to float precision; the ratio of real tokens/s is the data-parallel speedup. On
a CPU machine the ranks share the cores (gloo over loopback), so the ratio shows the overhead of the
processes and the all-reduce rather than a speedup; on a node with N GPUs it is the multi-GPU gain.

    python bench/data_parallel.py [--processes 2] [--train 64] [--epochs 1] [--base bundled:smollm2-135m]
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
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--train", type=int, default=64, help="training pairs")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--base", default="bundled:smollm2-135m")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from train_throughput import SYSTEM, build_pairs
    from tuning.data.dataset import TrainItem
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    pairs = build_pairs()[:args.train]
    items = [TrainItem(q, a, group=str(i)) for i, (q, a) in enumerate(pairs)]
    items += [TrainItem(q, a, group=str(i), split="val") for i, (q, a) in enumerate(build_pairs()[-8:])]
    common = dict(base_model=args.base, epochs=args.epochs, learning_rate=1e-3, lora_rank=16, patience=100)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in (("one_process", TrainConfig(**common, processes=1, accumulate=args.processes)),
                          ("data_parallel", TrainConfig(**common, processes=args.processes))):
            started = time.perf_counter()
            report = train(items, out_dir=Path(tmp) / name, config=cfg, system_prompt=SYSTEM, resume=False)
            results[name] = {"tokens_per_s": report.tokens_per_s, "steps": report.steps,
                             "val_loss": report.best_val_loss, "wall_s": round(time.perf_counter() - started, 1),
                             "peak_rss_mb_rank0": report.peak_rss_mb}
        a = load_file(Path(tmp) / "one_process" / "adapter_model.safetensors")
        b = load_file(Path(tmp) / "data_parallel" / "adapter_model.safetensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    out = {"device": "cuda" if torch.cuda.is_available() else "cpu", "cuda_devices": torch.cuda.device_count(),
           "cpu_threads": torch.get_num_threads(), "processes": args.processes, "base_model": args.base,
           "train_pairs": len(pairs), "epochs": args.epochs, **results,
           "speedup_tokens_per_s": round(results["data_parallel"]["tokens_per_s"]
                                         / max(1e-9, results["one_process"]["tokens_per_s"]), 3),
           "adapter_max_abs_diff": diff}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
