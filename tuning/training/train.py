"""Fine-tuning: LoRA / DoRA / QLoRA / full, packed batches, validation, early stopping, resume.

A hand-written loop (nanoGPT style) rather than transformers.Trainer: the packed rows need no
collator padding, no attention mask and a fixed per-(seed, epoch) order so a resumed run continues
mid-epoch exactly where the killed one stopped. bench/train_throughput.py compares it with Trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tuning.data.dataset import (IGNORE, PackedRow, Splits, TrainItem, data_hash, encode_items, epoch_rows, pack,
                                 split_items)
from tuning.errors import TrainingError
from tuning.grounding import (Grounding, calibrate_no_answer, calibrate_threshold, citation_distributions,
                              confidence, grounded_items, training_index, unanswerable_items)
from tuning.training import hparams as hp
from tuning.training.speed import fast_training, segment_bounds, uses_packed_attention

log = logging.getLogger(__name__)

METHODS = ("lora", "dora", "qlora", "full")
RECIPES = ("grounded", "closed")
FULL_MAX_PARAMS = 1_500_000_000


class TrainingCancelled(TrainingError):
    """should_stop() asked to stop; the last checkpoint lets the run resume."""


@dataclass(frozen=True)
class TrainConfig:
    """What to train; None values are chosen by tuning.training.hparams from the data size."""

    base_model: str = "bundled:smollm2-135m"
    method: str = "lora"
    epochs: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    batch_tokens: int | None = None
    seed: int = 0
    patience: int | None = None
    val_share: float = 0.2
    max_seq_tokens: int = 1024
    lora_dropout: float = 0.0
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_delta: float = 1e-3
    fast_path: bool = True  # per-example attention in packed rows, fused LoRA linears (same math, faster)
    accumulate: int = 1  # packed rows per process per optimizer step
    checkpoint_minutes: float = 10.0  # also checkpoint mid-epoch this often: a killed long epoch resumes near its end
    processes: int | None = None  # data-parallel processes; None = one per visible CUDA GPU (tuning.training.distributed)
    recipe: str = "grounded"  # "grounded": rows carry retrieved examples (tuning.grounding); "closed": closed book
    grounded_k: int = 3  # retrieved examples per grounded row (and per answer)


@dataclass(frozen=True)
class TrainingReport:
    """What a finished run produced; also written as training_report.json."""

    out_dir: str
    method: str
    base_model: str
    data_hash: str
    counts: dict
    hyperparameters: dict
    epochs: list[dict]
    best_epoch: int | None
    best_val_loss: float | None
    val_kind: str
    stopped_early: bool
    resumed_from_step: int
    steps: int
    tokens_per_s: float
    peak_rss_mb: float
    duration_s: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_training(config: TrainConfig, hyper: hp.Hyperparameters, *, cache_dir=None, device=None):
    """(model with trainable parameters, tokenizer) for the chosen method, on `device` (default: GPU 0 or CPU)."""
    import torch

    from tuning.models import load_base_model

    if config.method not in METHODS:
        raise TrainingError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    cuda = torch.cuda.is_available()
    if config.method == "qlora" and not cuda:
        raise TrainingError("QLoRA (4-bit) needs a CUDA GPU; use --method lora (or dora) on this machine",
                            code="qlora_needs_cuda")
    dtype = torch.bfloat16 if cuda and config.method != "full" else torch.float32
    model, tokenizer = load_base_model(config.base_model, cache_dir=cache_dir, dtype=dtype,
                                       quantize_4bit=config.method == "qlora",
                                       device=str(device) if device is not None and config.method == "qlora" else None)
    model.config.use_cache = False
    if config.method == "full":
        n = sum(p.numel() for p in model.parameters())
        if n > FULL_MAX_PARAMS:
            raise TrainingError(f"full fine-tuning of a {n / 1e9:.1f}B-parameter model is too big here; use --method lora",
                                code="full_too_big", params={"billions": f"{n / 1e9:.1f}"})
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        if config.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=hyper.lora_rank, lora_alpha=hyper.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules="all-linear", use_dora=config.method == "dora", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cuda:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # adapters train in fp32 on a bf16 base
    if config.method != "qlora":
        model.to(device or _device())
    return model, tokenizer


def row_loss(model, row: PackedRow, device) -> tuple:
    """(summed token loss, number of answer tokens) of one packed row."""
    import torch
    import torch.nn.functional as F

    t = row.tensors(device)
    targets = t["labels"][0, 1:]
    keep = (targets != IGNORE).nonzero().squeeze(1)  # positions whose next token is an answer token
    extra = {}
    if uses_packed_attention(model):  # tuning.training.speed.fast_training: attention per example of the row
        extra["cu_seq_lens_q"] = torch.tensor(segment_bounds(row.position_ids), dtype=torch.int32)
    # use_cache=False and no attention_mask: transformers then detects the packed examples from the
    # position ids and keeps them from attending to each other (with a cache it silently does not).
    # logits_to_keep: the vocabulary projection runs only where the loss needs it (answer tokens).
    try:
        logits = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False,
                       logits_to_keep=keep, **extra).logits
    except TypeError:  # an architecture without logits_to_keep: project every position, keep the needed ones
        logits = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False,
                       **extra).logits[:, keep]
    loss = F.cross_entropy(logits[0].float(), targets[keep], reduction="sum")
    return loss, int(keep.numel())


def evaluate_loss(model, rows: Sequence[PackedRow], device, *, ranks=None) -> float | None:
    """Mean loss per answer token over rows (no gradients); with ranks, each rank takes its share."""
    import torch

    if not rows:
        return None
    mine = rows if ranks is None else rows[ranks.rank::ranks.world]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in mine:
            loss, n = row_loss(model, row, device)
            total += float(loss)
            count += n
    model.train(was_training)
    if ranks is not None:
        total, count = ranks.sum([total, count])
    return total / max(1, count)


def _trainable_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_trainable(model, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def _rng_state() -> dict:
    import torch

    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FILES = ("trainable.pt", "optimizer.pt")


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def _load_tensors(path: Path):
    """torch.load that builds only tensors and plain containers (no pickled code), on the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _save_checkpoint(folder: Path, *, model, optimizer, scheduler, state: dict, keep_previous: bool = True) -> None:
    """Write atomically (a killed process leaves the previous checkpoint intact), tensors and plain values only.

    state.json, written last, holds the files' checksums: a truncated, damaged or half-synced checkpoint is
    recognized on resume. With keep_previous the checkpoint it replaces stays as `previous`, to fall back to.
    """
    import torch

    from tuning.artifacts import atomic_dir

    with atomic_dir(folder, keep_as=folder.with_name("previous") if keep_previous else None) as tmp:
        torch.save(_trainable_state(model), tmp / "trainable.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "optimizer.pt")
        sums = {name: _sha256(tmp / name) for name in CHECKPOINT_FILES}
        (tmp / "state.json").write_text(json.dumps({**state, "checksums": sums}, indent=1))


def _read_checkpoint(folder: Path, *, fresh_state: dict, model, optimizer) -> tuple[dict, dict, dict]:
    """(state, trainable weights, optimizer/scheduler/RNG states) of one checkpoint, checked against this run.

    Raises ValueError (or whatever the damaged file makes json/torch raise) when it cannot be resumed from.
    """
    saved = json.loads((folder / "state.json").read_text())
    if not isinstance(saved, dict) or set(fresh_state) - set(saved):
        raise ValueError("state.json lacks some of the run's state")
    sums = saved.pop("checksums", None)  # absent in checkpoints written before checksums were
    for name in CHECKPOINT_FILES:
        if sums is not None and _sha256(folder / name) != sums.get(name):
            raise ValueError(f"{name} does not match its checksum")
    trainable, extra = _load_tensors(folder / "trainable.pt"), _load_tensors(folder / "optimizer.pt")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params) or any(trainable[k].shape != p.shape for k, p in params.items()):
        raise ValueError("its weights are not this model's")
    groups, mine = extra["optimizer"]["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise ValueError("its optimizer state is for other parameters")
    flat = [p for g in mine for p in g["params"]]
    for index, values in extra["optimizer"]["state"].items():
        if any(hasattr(v, "shape") and v.dim() and v.shape != flat[index].shape for v in values.values()):
            raise ValueError("its optimizer state is for other parameters")
    if not {"scheduler", "rng"} <= set(extra):
        raise ValueError("optimizer.pt lacks the scheduler or RNG state")
    return saved, trainable, extra


def _resume(ckpt_dir: Path, *, snapshot: dict, fresh_state: dict, model, optimizer, scheduler, ranks) -> dict | None:
    """Load the newest usable checkpoint into the model, optimizer, scheduler and RNGs; its state, or None.

    A damaged checkpoint is skipped for the previous one, then for a fresh start, and the log (the job's log)
    says so: retrying a job must not fail the same way every time. A checkpoint of other data or settings
    means a fresh start too. What cannot be used is removed once every rank has read the checkpoints.
    """
    chosen, unusable = None, []
    candidates = [d for d in (ckpt_dir / "last", ckpt_dir / "previous") if d.is_dir()]
    for i, folder in enumerate(candidates):
        try:
            loaded = _read_checkpoint(folder, fresh_state=fresh_state, model=model, optimizer=optimizer)
        except Exception as exc:  # noqa: BLE001 - a damaged file makes json, zipfile and torch raise many types
            rest = "trying the previous one" if i + 1 < len(candidates) else "starting over"
            log.warning("checkpoint %s cannot be resumed from (%s: %s); %s", folder, type(exc).__name__, exc, rest)
            unusable.append(folder)
            continue
        if loaded[0].get("snapshot") != json.loads(json.dumps(snapshot)):
            log.warning("ignoring the checkpoint in %s: data or config changed", ckpt_dir)
            unusable = [ckpt_dir]
            break
        chosen = folder, loaded
        break
    ranks.barrier()  # every rank has read the checkpoints before rank 0 removes any
    if ranks.main:
        for folder in unusable:
            shutil.rmtree(folder, ignore_errors=True)
    if chosen is None:
        return None
    folder, (saved, trainable, extra) = chosen
    _load_trainable(model, trainable)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    log.info("resuming %s from step %d (epoch %d) of checkpoint %s", ckpt_dir.parent, saved["step"],
             saved["epoch"] + 1, folder.name)
    return saved


def _save_result(model, tokenizer, out: Path, method: str) -> None:
    if method == "full":
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    else:
        model.save_pretrained(out, safe_serialization=True)


def plot_loss_curve(epochs: Sequence[dict], path: Path, *, step_losses: Sequence[tuple[int, float]] = ()) -> None:
    """loss_curve.png: training loss per step and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if step_losses:
        ax.plot([s for s, _ in step_losses], [v for _, v in step_losses], lw=0.8, alpha=0.6, label="train (step)")
    ax.plot([e["step"] for e in epochs], [e["train_loss"] for e in epochs], "o-", label="train (epoch mean)")
    val = [(e["step"], e["val_loss"]) for e in epochs if e.get("val_loss") is not None]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "s-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _training_splits(items: Sequence[TrainItem], config: TrainConfig) -> Splits:
    splits = split_items(items, val_share=config.val_share, seed=config.seed)
    if not splits.train:
        raise TrainingError("no training examples: approve some examples (test examples are never trained on)",
                            code="no_training_data")
    return splits


def train(items: Sequence[TrainItem], *, out_dir, config: TrainConfig = TrainConfig(), system_prompt: str = "",
          cache_dir=None, on_progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, resume: bool = True) -> TrainingReport:
    """Train on the train split, validate every epoch, keep the best epoch; write everything to out_dir.

    With several processes (config.processes, or one per visible GPU) the run is data-parallel:
    tuning.training.distributed starts the ranks and relays their progress; the result is the same files.
    """
    from tuning.training.distributed import Ranks, launch, processes_for

    if config.accumulate < 1:
        raise TrainingError("accumulate must be at least 1")
    world = processes_for(config)
    if world > 1:
        _training_splits(items, config)  # fail here, before starting any process
        return launch(items, out_dir=out_dir, config=config, world_size=world, system_prompt=system_prompt,
                      cache_dir=cache_dir, on_progress=on_progress, should_stop=should_stop, resume=resume)
    return train_rank(items, out_dir=out_dir, config=config, system_prompt=system_prompt, cache_dir=cache_dir,
                      on_progress=on_progress, should_stop=should_stop, resume=resume, ranks=Ranks())


def train_rank(items: Sequence[TrainItem], *, out_dir, config: TrainConfig, system_prompt: str, cache_dir,
               on_progress: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None, resume: bool,
               ranks) -> TrainingReport | None:
    """The training loop in one process: all of it, or one rank's share (rank 0 writes; others return None).

    Each optimizer step takes `world * accumulate` packed rows; rank r computes rows r, r+world, … of
    them, the gradients (each row's mean loss / rows in the step) are summed over the ranks, so every
    rank takes the same step as one process accumulating all of those rows.
    """
    import torch

    started = time.perf_counter()
    main = ranks.main
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = _training_splits(items, config)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    from tuning.models import load_tokenizer

    if config.recipe not in RECIPES:
        raise TrainingError(f"unknown recipe {config.recipe!r}; choose one of {', '.join(RECIPES)}")
    tokenizer = load_tokenizer(config.base_model, cache_dir=cache_dir)
    index = training_index(splits.train)  # what answering retrieves from; saved beside the adapter
    train_rows, val_rows_items = splits.train, splits.val
    if config.recipe == "grounded":
        train_rows, val_rows_items = grounded_items(splits.train, splits.val, index, k=config.grounded_k,
                                                    seed=config.seed)
    train_enc = encode_items(tokenizer, train_rows, system_prompt=system_prompt, max_tokens=config.max_seq_tokens)
    val_enc = encode_items(tokenizer, val_rows_items, system_prompt=system_prompt, max_tokens=config.max_seq_tokens)
    n_tokens = sum(len(e.input_ids) for e in train_enc)
    n_facts = len({i.group for i in splits.train})
    hyper = hp.choose(n_facts=n_facts, n_items=len(train_enc), n_tokens=n_tokens, method=config.method,
                      recipe=config.recipe, epochs=config.epochs, learning_rate=config.learning_rate,
                      lora_rank=config.lora_rank, batch_tokens=config.batch_tokens, patience=config.patience)
    batch_tokens = max(hyper.batch_tokens, max(len(e.input_ids) for e in train_enc))
    digest = data_hash(items, system_prompt=system_prompt)
    # What a checkpoint must match to be resumed (how often checkpoints are taken does not matter).
    snapshot = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_minutes"},
                "hyperparameters": dataclasses.asdict(hyper),
                "data_hash": digest, "system_prompt": system_prompt}
    if ranks.world > 1:  # a checkpoint of another world size has other steps: it cannot be resumed here
        snapshot["world_size"] = ranks.world
    if main:
        (out / "train_config.json").write_text(json.dumps(snapshot, indent=2, ensure_ascii=False))
        # The trained examples themselves (no variations): `tunebot eval` uses them for the few-shot mode.
        with open(out / "fewshot_pool.jsonl", "w", encoding="utf-8") as fp:
            for item in splits.train:
                if not item.variation:
                    fp.write(json.dumps({"question": item.question, "answer": item.answer},
                                        ensure_ascii=False) + "\n")

    device = ranks.device or _device()
    model, tokenizer = load_for_training(config, hyper, cache_dir=cache_dir, device=device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hyper.learning_rate, weight_decay=config.weight_decay, foreach=True)
    per_step = ranks.world * config.accumulate  # packed rows per optimizer step, over all ranks
    steps_per_epoch = [math.ceil(len(epoch_rows(train_enc, batch_tokens=batch_tokens, seed=config.seed, epoch=e))
                                 / per_step) for e in range(hyper.epochs)]
    total_steps = sum(steps_per_epoch)
    warmup = max(1, int(config.warmup_ratio * total_steps))

    def schedule(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    val_rows = pack(val_enc, batch_tokens=batch_tokens)

    ckpt_dir = out / "checkpoints"
    last_dir, best_dir = ckpt_dir / "last", ckpt_dir / "best"
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val": None, "best_epoch": None, "bad_evals": 0,
             "epochs": [], "step_losses": [], "tokens": 0, "train_seconds": 0.0, "data_hash": digest,
             "snapshot": snapshot, "epoch_loss_sum": 0.0, "epoch_loss_tokens": 0, "stopped_early": False}
    resumed_from = 0
    if resume:
        saved = _resume(ckpt_dir, snapshot=snapshot, fresh_state=state, model=model, optimizer=optimizer,
                        scheduler=scheduler, ranks=ranks)
        if saved is not None:
            state = saved
            resumed_from = state["step"]
    elif main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    last_checkpoint = time.monotonic()

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if main:  # a full model's checkpoint is three times its size: keep only one of those
            _save_checkpoint(last_dir, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                             keep_previous=config.method != "full")
        last_checkpoint = time.monotonic()

    scored: list = [None]  # P([0]) of each validation question at the last validation (grounded runs)

    def selection_score(val_loss: float) -> float:
        """What picks the best epoch: the validation loss, or for grounded runs how likely the model cites the
        right example (measured: the loss bottoms out an epoch or more before the citations are learned)."""
        if config.recipe != "grounded":
            return val_loss
        choices = citation_distributions(model, tokenizer, val_rows_items, system_prompt=system_prompt,
                                         device=device, k=config.grounded_k)
        scored[0] = [choice[0] for _, choice in choices]
        return 1.0 - sum(choice.get(right, 0.0) for right, choice in choices) / len(choices) if choices else val_loss

    def run_validation() -> float | None:
        val_loss = evaluate_loss(model, val_rows, device, ranks=ranks)
        if val_loss is None:
            return None
        score = selection_score(val_loss)
        best = state.get("best_score", state["best_val"])
        if best is None or score < best - config.min_delta:
            state["best_val"], state["best_epoch"], state["bad_evals"] = val_loss, state["epoch"] + 1, 0
            state["best_score"], state["best_no_answer_p"] = score, scored[0]
            if main:
                best_dir.mkdir(parents=True, exist_ok=True)
                torch.save(_trainable_state(model), best_dir / "trainable.pt.tmp")
                os.replace(best_dir / "trainable.pt.tmp", best_dir / "trainable.pt")
        else:
            state["bad_evals"] += 1
        return val_loss

    speed = contextlib.ExitStack()  # exact fast path for the loop only (tuning.training.speed)
    if config.fast_path:
        speed.enter_context(fast_training(model))
    base_val = evaluate_loss(model, val_rows, device, ranks=ranks) if state["step"] == 0 else None
    if base_val is not None:
        state["val_loss_before"] = base_val

    last_val = state["epochs"][-1]["val_loss"] if state["epochs"] else base_val
    while state["epoch"] < hyper.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        rows = epoch_rows(train_enc, batch_tokens=batch_tokens, seed=config.seed, epoch=epoch)
        n_steps = steps_per_epoch[epoch]
        epoch_started = time.perf_counter()
        for i in range(state["step_in_epoch"], n_steps):
            # rank 0 decides (its should_stop is the job's); the others learn it here, before the step
            if ranks.any(bool(main and should_stop and should_stop())):
                checkpoint()
                raise TrainingCancelled(f"training cancelled at step {state['step']}; run again to resume")
            t0 = time.perf_counter()
            group = rows[i * per_step:(i + 1) * per_step]
            loss_sum_total, n_total, mean_total = 0.0, 0, 0.0
            for row in group[ranks.rank::ranks.world]:
                loss_sum, n = row_loss(model, row, device)
                (loss_sum / max(1, n) / len(group)).backward()
                loss_sum_total += loss_sum.item()
                n_total += n
                mean_total += loss_sum.item() / max(1, n)
            if ranks.world > 1:
                ranks.sum_gradients(params)
                loss_sum_total, n_total, mean_total = ranks.sum([loss_sum_total, n_total, mean_total])
                n_total = int(n_total)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            loss = mean_total / len(group)
            state["step"] += 1
            state["step_in_epoch"] = i + 1
            state["tokens"] += sum(len(r.input_ids) for r in group)
            state["train_seconds"] += dt
            state["epoch_loss_sum"] += loss_sum_total
            state["epoch_loss_tokens"] += n_total
            state["step_losses"].append([state["step"], round(loss, 5)])
            rate = state["tokens"] / max(1e-9, state["train_seconds"])
            steps_left = total_steps - state["step"]
            saved = False
            if i + 1 < n_steps and time.monotonic() - last_checkpoint >= config.checkpoint_minutes * 60:
                checkpoint()  # rank 0 only writes; the time is rank 0's, the others do not take part
                saved = True
            if on_progress and main:
                on_progress({"step": state["step"], "total_steps": total_steps, "epoch": epoch + 1,
                             "epochs": hyper.epochs, "loss": round(loss, 4), "val_loss": last_val,
                             "tokens_per_s": round(rate, 1), "processes": ranks.world,
                             "eta_s": round(steps_left * state["train_seconds"] / state["step"], 1),
                             **({"checkpoint": True} if saved else {})})
            if hyper.eval_every_steps and state["step"] % hyper.eval_every_steps == 0 and i + 1 < n_steps:
                last_val = run_validation()
                if state["bad_evals"] >= hyper.patience:
                    state["stopped_early"] = True
                    break
        val_loss = run_validation()
        last_val = val_loss if val_loss is not None else last_val
        state["epochs"].append({
            "epoch": epoch + 1, "step": state["step"],
            "train_loss": round(state["epoch_loss_sum"] / max(1, state["epoch_loss_tokens"]), 5),
            "val_loss": None if val_loss is None else round(val_loss, 5),
            "seconds": round(time.perf_counter() - epoch_started, 2),
            "tokens_per_s": round(state["tokens"] / max(1e-9, state["train_seconds"]), 1),
        })
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        state["epoch_loss_sum"], state["epoch_loss_tokens"] = 0.0, 0
        if val_loss is not None and state["bad_evals"] >= hyper.patience:
            state["stopped_early"] = True
        checkpoint()
        if on_progress and main:
            on_progress({"step": state["step"], "total_steps": total_steps, "epoch": epoch + 1,
                         "epochs": hyper.epochs, "loss": state["epochs"][-1]["train_loss"], "val_loss": val_loss,
                         "tokens_per_s": state["epochs"][-1]["tokens_per_s"], "epoch_done": True,
                         "stopped_early": state["stopped_early"],
                         "eta_s": round((total_steps - state["step"]) * state["train_seconds"] / state["step"], 1)
                         if not state["stopped_early"] else 0.0})

    speed.close()
    if not main:
        return None
    if state["best_epoch"] is not None and (best_dir / "trainable.pt").exists():
        _load_trainable(model, _load_tensors(best_dir / "trainable.pt"))  # roll back to the best epoch
    no_answer = None
    if config.recipe == "grounded" and val_rows_items:
        # P([0]) of each validation question shown its own fact (measured at the best epoch, whose weights the
        # model now has), and shown only other facts: the threshold that separates them decides "I don't know"
        answerable = state.get("best_no_answer_p")
        if answerable is None:
            answerable = [c[0] for _, c in citation_distributions(model, tokenizer, val_rows_items,
                                                                  k=config.grounded_k, system_prompt=system_prompt,
                                                                  device=device)]
        unanswerable = [c[0] for _, c in citation_distributions(
            model, tokenizer, unanswerable_items(splits.val, index, k=config.grounded_k, seed=config.seed + 1),
            k=config.grounded_k, system_prompt=system_prompt, device=device)]
        no_answer = calibrate_no_answer(answerable, unanswerable)
    _save_result(model, tokenizer, out, config.method)
    index.save(out / "retrieval")
    grounding = Grounding(recipe=config.recipe, k=config.grounded_k,
                          threshold=calibrate_threshold([confidence(index.search(i.question, 1)) for i in splits.val]),
                          no_answer_above=no_answer,
                          calibrated_on=len(splits.val))
    grounding.save(out)
    plot_loss_curve(state["epochs"], out / "loss_curve.png", step_losses=state["step_losses"])
    note = {"recall": "validation = held-out variations of trained examples: it measures recall of the facts",
            "style": "no variations yet: validation = held-out examples, so it measures style, not recall",
            "none": "too few examples for a validation split: trained for the fixed number of epochs"}[splits.val_kind]
    report = TrainingReport(
        out_dir=str(out), method=config.method, base_model=config.base_model, data_hash=digest,
        counts={"items": len(items), "facts": n_facts, "train": len(splits.train), "train_rows": len(train_enc),
                "val": len(splits.val), "test": len(splits.test),
                "train_variations": sum(i.variation for i in splits.train), "train_tokens": n_tokens,
                "answer_tokens": sum(e.n_answer_tokens for e in train_enc)},
        hyperparameters={**dataclasses.asdict(hyper), "batch_tokens": batch_tokens, "seed": config.seed,
                         "method": config.method, "total_steps": total_steps, "processes": ranks.world,
                         "accumulate": config.accumulate, "recipe": config.recipe,
                         "grounded_k": config.grounded_k if config.recipe == "grounded" else 0,
                         "abstain_threshold": grounding.threshold,
                         "min_choice_probability": grounding.min_choice_probability,
                         "no_answer_above": grounding.no_answer_above},
        epochs=state["epochs"], best_epoch=state["best_epoch"] or (state["epoch"] if state["epochs"] else None),
        best_val_loss=None if state["best_val"] is None else round(state["best_val"], 5),
        val_kind=splits.val_kind, stopped_early=state["stopped_early"], resumed_from_step=resumed_from,
        steps=state["step"], tokens_per_s=round(state["tokens"] / max(1e-9, state["train_seconds"]), 1),
        peak_rss_mb=peak_rss_mb(), duration_s=round(time.perf_counter() - started, 1), note=note,
        extra={"val_loss_before": state.get("val_loss_before")},
    )
    (out / "training_report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report
