"""Fine-tuning: LoRA / DoRA / QLoRA / full, packed batches, validation, early stopping, resume.

A hand-written loop (nanoGPT style) rather than transformers.Trainer: the packed rows need no
collator padding, no attention mask and a fixed per-(seed, epoch) order so a resumed run continues
mid-epoch exactly where the killed one stopped. bench/train_throughput.py compares it with Trainer.

`train_rank` reads top to bottom: prepare the data → build the model and optimizer → resume or start →
the epochs → write the results. tuning.training.run chooses one process or data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tuning.data.dataset import Encoded, Splits, TrainItem, data_hash, encode_items, epoch_rows, pack, split_items
from tuning.errors import TrainingError
from tuning.grounding import (Grounding, abstention, calibrate_no_answer, citation_distributions, grounded_items,
                              retrieval_scores, similarity_threshold, training_index, unanswerable_items)
from tuning.retrieval import Retriever
from tuning.training import hparams as hp
from tuning.training.checkpoints import TrainState, load_best, resume as resume_from, save_best, save_checkpoint
from tuning.training.config import RECIPES, TrainConfig, TrainingCancelled, TrainingReport
from tuning.training.model import default_device, evaluate_loss, load_for_training, peak_rss_mb, row_loss
from tuning.training.progress import TrainProgress, plot_loss_curve
from tuning.training.ranks import Ranks
from tuning.training.speed import fast_training

log = logging.getLogger(__name__)

ProgressCallback = Callable[[TrainProgress], None]


def train_rank(items: Sequence[TrainItem], *, out_dir, config: TrainConfig, system_prompt: str = "", cache_dir=None,
               on_progress: ProgressCallback | None = None, should_stop: Callable[[], bool] | None = None,
               resume: bool = True, ranks: Ranks = Ranks()) -> TrainingReport | None:
    """The training loop in one process: all of it, or one rank's share (rank 0 writes; others return None)."""
    import torch

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    data = prepare_data(items, config, system_prompt=system_prompt, cache_dir=cache_dir, world=ranks.world)
    if ranks.main:
        data.write_inputs(out)
    loop = _Loop(data, config, out=out, ranks=ranks, cache_dir=cache_dir, on_progress=on_progress)
    loop.resume_or_start(resume)
    loop.run_epochs(should_stop)
    if not ranks.main:
        return None
    return _write_results(loop, out, n_items=len(items), started=started)


# ------------------------------------------------------------------ 1. the data
@dataclass
class PreparedData:
    """The run's rows, encoded, and what was chosen from their size."""

    splits: Splits
    index: Retriever  # what answering retrieves from (the train split); saved beside the adapter
    val_items: list[TrainItem]  # the validation rows as trained (grounded: with their retrieved examples)
    train_enc: list[Encoded]
    val_enc: list[Encoded]
    hyper: hp.Hyperparameters
    batch_tokens: int
    digest: str
    snapshot: dict  # what a checkpoint must match to be resumed
    system_prompt: str

    @property
    def n_facts(self) -> int:
        return len({i.group for i in self.splits.train})

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train_enc)

    def write_inputs(self, out: Path) -> None:
        """train_config.json, and the trained examples (no variations) `tunebot eval` uses for few-shot."""
        (out / "train_config.json").write_text(json.dumps(self.snapshot, indent=2, ensure_ascii=False))
        with open(out / "fewshot_pool.jsonl", "w", encoding="utf-8") as fp:
            for item in self.splits.train:
                if not item.variation:
                    fp.write(json.dumps({"question": item.question, "answer": item.answer},
                                        ensure_ascii=False) + "\n")


def training_splits(items: Sequence[TrainItem], config: TrainConfig) -> Splits:
    splits = split_items(items, val_share=config.val_share, seed=config.seed)
    if not splits.train:
        raise TrainingError("no training examples: approve some examples (test examples are never trained on)",
                            code="no_training_data")
    return splits


def prepare_data(items: Sequence[TrainItem], config: TrainConfig, *, system_prompt: str, cache_dir,
                 world: int = 1) -> PreparedData:
    from tuning.models import load_tokenizer

    splits = training_splits(items, config)
    if config.recipe not in RECIPES:
        raise TrainingError(f"unknown recipe {config.recipe!r}; choose one of {', '.join(RECIPES)}")
    tokenizer = load_tokenizer(config.base_model, cache_dir=cache_dir)
    index = training_index(splits.train)
    train_items, val_items = splits.train, splits.val
    if config.recipe == "grounded":
        train_items, val_items = grounded_items(splits.train, splits.val, index, k=config.grounded_k,
                                                seed=config.seed)
    train_enc = encode_items(tokenizer, train_items, system_prompt=system_prompt, max_tokens=config.max_seq_tokens)
    val_enc = encode_items(tokenizer, val_items, system_prompt=system_prompt, max_tokens=config.max_seq_tokens)
    hyper = hp.choose(n_facts=len({i.group for i in splits.train}), n_items=len(train_enc),
                      n_tokens=sum(len(e.input_ids) for e in train_enc), method=config.method,
                      recipe=config.recipe, epochs=config.epochs, learning_rate=config.learning_rate,
                      lora_rank=config.lora_rank, batch_tokens=config.batch_tokens, patience=config.patience)
    digest = data_hash(items, system_prompt=system_prompt)
    # How often checkpoints are taken does not matter to resuming; another world size has other steps.
    snapshot = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_minutes"},
                "hyperparameters": dataclasses.asdict(hyper), "data_hash": digest, "system_prompt": system_prompt}
    if world > 1:
        snapshot["world_size"] = world
    return PreparedData(splits=splits, index=index, val_items=list(val_items), train_enc=train_enc, val_enc=val_enc,
                        hyper=hyper, batch_tokens=max(hyper.batch_tokens, max(len(e.input_ids) for e in train_enc)),
                        digest=digest, snapshot=snapshot, system_prompt=system_prompt)


# ------------------------------------------------------------------ 2.–4. model, optimizer, epochs
class _Loop:
    """The model, its optimizer and schedule, and the epochs over the packed rows.

    Each optimizer step takes `world * accumulate` packed rows; rank r computes rows r, r+world, … of
    them, the gradients (each row's mean loss / rows in the step) are summed over the ranks, so every
    rank takes the same step as one process accumulating all of those rows.
    """

    def __init__(self, data: PreparedData, config: TrainConfig, *, out: Path, ranks: Ranks, cache_dir,
                 on_progress: ProgressCallback | None) -> None:
        import torch

        self.data, self.config, self.hyper, self.ranks = data, config, data.hyper, ranks
        self.on_progress = on_progress if ranks.main else None
        self.device = ranks.device or default_device()
        self.model, self.tokenizer = load_for_training(config, data.hyper, cache_dir=cache_dir, device=self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.hyper.learning_rate,
                                           weight_decay=config.weight_decay, foreach=True)
        self.per_step = ranks.world * config.accumulate  # packed rows per optimizer step, over all ranks
        self.steps_per_epoch = [math.ceil(len(self.rows(e)) / self.per_step) for e in range(self.hyper.epochs)]
        self.total_steps = sum(self.steps_per_epoch)
        self.warmup = max(1, int(config.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule)
        self.val_rows = pack(data.val_enc, batch_tokens=data.batch_tokens)
        self.ckpt_dir = out / "checkpoints"
        self.state = TrainState(snapshot=data.snapshot, data_hash=data.digest)
        self.resumed_from = 0
        self._last_checkpoint = time.monotonic()
        self._scored: list | None = None  # P([0]) of each validation question at the last validation

    def rows(self, epoch: int):
        return epoch_rows(self.data.train_enc, batch_tokens=self.data.batch_tokens, seed=self.config.seed, epoch=epoch)

    def _schedule(self, step: int) -> float:
        """Linear warmup, cosine decay to 10%."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # -------------------------------------------------------------- 3. resume or start
    def resume_or_start(self, resume: bool) -> None:
        if resume:
            saved = resume_from(self.ckpt_dir, snapshot=self.data.snapshot, model=self.model,
                                optimizer=self.optimizer, scheduler=self.scheduler, ranks=self.ranks)
            if saved is not None:
                self.state, self.resumed_from = saved, saved.step
        elif self.ranks.main:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)

    def checkpoint(self) -> None:
        if self.ranks.main:  # a full model's checkpoint is three times its size: keep only one of those
            save_checkpoint(self.ckpt_dir / "last", model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, state=self.state, keep_previous=self.config.method != "full")
        self._last_checkpoint = time.monotonic()

    # -------------------------------------------------------------- 4. the epochs
    def run_epochs(self, should_stop: Callable[[], bool] | None) -> None:
        state = self.state
        speed = contextlib.ExitStack()  # exact fast path for the loop only (tuning.training.speed)
        if self.config.fast_path:
            speed.enter_context(fast_training(self.model))
        if state.step == 0:
            state.val_loss_before = evaluate_loss(self.model, self.val_rows, self.device, ranks=self.ranks)
        last_val = state.epochs[-1]["val_loss"] if state.epochs else state.val_loss_before
        while state.epoch < self.hyper.epochs and not state.stopped_early:
            last_val = self._epoch(should_stop, last_val)
        speed.close()

    def _epoch(self, should_stop, last_val: float | None) -> float | None:
        state, ranks, epoch = self.state, self.ranks, self.state.epoch
        rows, n_steps = self.rows(epoch), self.steps_per_epoch[epoch]
        epoch_started = time.perf_counter()
        for i in range(state.step_in_epoch, n_steps):
            # rank 0 decides (its should_stop is the job's); the others learn it here, before the step
            if ranks.any(bool(ranks.main and should_stop and should_stop())):
                self.checkpoint()
                raise TrainingCancelled(f"training cancelled at step {state.step}; run again to resume")
            loss = self._step(rows[i * self.per_step:(i + 1) * self.per_step], i)
            saved = False
            if i + 1 < n_steps and time.monotonic() - self._last_checkpoint >= self.config.checkpoint_minutes * 60:
                self.checkpoint()  # rank 0 only writes; the time is rank 0's, the others do not take part
                saved = True
            self._report(loss=round(loss, 4), val_loss=last_val, tokens_per_s=state.tokens_per_s, checkpoint=saved)
            every = self.hyper.eval_every_steps
            if every and state.step % every == 0 and i + 1 < n_steps:
                last_val = self._validate()
                if state.bad_evals >= self.hyper.patience:
                    state.stopped_early = True
                    break
        val_loss = self._validate()
        state.epochs.append({
            "epoch": epoch + 1, "step": state.step,
            "train_loss": round(state.epoch_loss_sum / max(1, state.epoch_loss_tokens), 5),
            "val_loss": None if val_loss is None else round(val_loss, 5),
            "seconds": round(time.perf_counter() - epoch_started, 2), "tokens_per_s": state.tokens_per_s,
        })
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sum, state.epoch_loss_tokens = 0.0, 0
        if val_loss is not None and state.bad_evals >= self.hyper.patience:
            state.stopped_early = True
        self.checkpoint()
        self._report(epoch=epoch + 1, loss=state.epochs[-1]["train_loss"], val_loss=val_loss,
                     tokens_per_s=state.epochs[-1]["tokens_per_s"], epoch_done=True,
                     stopped_early=state.stopped_early)
        return val_loss if val_loss is not None else last_val

    def _step(self, group: Sequence, i: int) -> float:
        """One optimizer step over `group`'s packed rows (this rank's share of them); the step's mean loss."""
        import torch

        state, ranks = self.state, self.ranks
        t0 = time.perf_counter()
        loss_sum_total, n_total, mean_total = 0.0, 0, 0.0
        for row in group[ranks.rank::ranks.world]:
            loss_sum, n = row_loss(self.model, row, self.device)
            (loss_sum / max(1, n) / len(group)).backward()
            loss_sum_total += loss_sum.item()
            n_total += n
            mean_total += loss_sum.item() / max(1, n)
        if ranks.world > 1:
            ranks.sum_gradients(self.params)
            loss_sum_total, n_total, mean_total = ranks.sum([loss_sum_total, n_total, mean_total])
            n_total = int(n_total)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = mean_total / len(group)
        state.step += 1
        state.step_in_epoch = i + 1
        state.tokens += sum(len(r.input_ids) for r in group)
        state.train_seconds += time.perf_counter() - t0
        state.epoch_loss_sum += loss_sum_total
        state.epoch_loss_tokens += n_total
        state.step_losses.append([state.step, round(loss, 5)])
        return loss

    def _report(self, **fields) -> None:
        if self.on_progress is None:
            return
        state = self.state
        eta = 0.0 if state.stopped_early else round((self.total_steps - state.step) * state.train_seconds
                                                    / max(1, state.step), 1)
        self.on_progress(TrainProgress(**{"step": state.step, "total_steps": self.total_steps,
                                          "epoch": state.epoch + 1, "epochs": self.hyper.epochs, "eta_s": eta,
                                          "processes": self.ranks.world, **fields}))

    def _validate(self) -> float | None:
        """Validation loss; keeps the best epoch's weights (by selection score) and counts epochs without gain."""
        state = self.state
        val_loss = evaluate_loss(self.model, self.val_rows, self.device, ranks=self.ranks)
        if val_loss is None:
            return None
        score = self._selection_score(val_loss)
        best = state.best_score if state.best_score is not None else state.best_val
        if best is None or score < best - self.config.min_delta:
            state.best_val, state.best_epoch, state.bad_evals = val_loss, state.epoch + 1, 0
            state.best_score, state.best_no_answer_p = score, self._scored
            if self.ranks.main:
                save_best(self.ckpt_dir / "best", self.model)
        else:
            state.bad_evals += 1
        return val_loss

    def _selection_score(self, val_loss: float) -> float:
        """What picks the best epoch: the validation loss, or for grounded runs how likely the model cites the
        right example (measured: the loss bottoms out an epoch or more before the citations are learned)."""
        if self.config.recipe != "grounded":
            return val_loss
        choices = self.citations(self.data.val_items)
        self._scored = [choice[0] for _, choice in choices]
        return 1.0 - sum(choice.get(right, 0.0) for right, choice in choices) / len(choices) if choices else val_loss

    def citations(self, items: Sequence[TrainItem]) -> list:
        return citation_distributions(self.model, self.tokenizer, items, system_prompt=self.data.system_prompt,
                                      device=self.device, k=self.config.grounded_k)


# ------------------------------------------------------------------ 5. the results
def _write_results(loop: _Loop, out: Path, *, n_items: int, started: float) -> TrainingReport:
    """Roll back to the best epoch, calibrate "I don't know", save the adapter, index, plot and report."""
    data, config, state, hyper = loop.data, loop.config, loop.state, loop.hyper
    splits = data.splits
    if state.best_epoch is not None:
        load_best(loop.ckpt_dir / "best", loop.model)
    no_answer, answerable, unanswerable = None, [], []
    if config.recipe == "grounded" and data.val_items:
        # P([0]) of each validation question shown its own fact (measured at the best epoch, whose weights the
        # model now has), and shown only other facts: the threshold that separates them decides "I don't know"
        answerable = state.best_no_answer_p
        if answerable is None:
            answerable = [c[0] for _, c in loop.citations(data.val_items)]
        unanswerable = [c[0] for _, c in loop.citations(
            unanswerable_items(splits.val, data.index, k=config.grounded_k, seed=config.seed + 1))]
        no_answer = calibrate_no_answer(answerable, unanswerable)
    loop.model.save_pretrained(out, safe_serialization=True)
    if config.method == "full":
        loop.tokenizer.save_pretrained(out)
    data.index.save(out / "retrieval")
    abstain_by, threshold = abstention(*retrieval_scores(data.index, splits.val), answerable, unanswerable, no_answer)
    grounding = Grounding(recipe=config.recipe, k=config.grounded_k, threshold=threshold,
                          similarity_threshold=similarity_threshold(data.index, splits.val),
                          no_answer_above=no_answer, calibrated_on=len(splits.val), abstain_by=abstain_by)
    grounding.save(out)
    plot_loss_curve(state.epochs, out / "loss_curve.png", step_losses=state.step_losses)
    note = {"recall": "validation = held-out variations of trained examples: it measures recall of the facts",
            "style": "no variations yet: validation = held-out examples, so it measures style, not recall",
            "none": "too few examples for a validation split: trained for the fixed number of epochs"}[splits.val_kind]
    report = TrainingReport(
        out_dir=str(out), method=config.method, base_model=config.base_model, data_hash=data.digest,
        counts={"items": n_items, "facts": data.n_facts, "train": len(splits.train), "train_rows": len(data.train_enc),
                "val": len(splits.val), "test": len(splits.test),
                "train_variations": sum(i.variation for i in splits.train), "train_tokens": data.n_tokens,
                "answer_tokens": sum(e.n_answer_tokens for e in data.train_enc)},
        hyperparameters={**dataclasses.asdict(hyper), "batch_tokens": data.batch_tokens, "seed": config.seed,
                         "method": config.method, "total_steps": loop.total_steps, "processes": loop.ranks.world,
                         "accumulate": config.accumulate, "recipe": config.recipe,
                         "grounded_k": config.grounded_k if config.recipe == "grounded" else 0,
                         "abstain_threshold": grounding.threshold,
                         "min_choice_probability": grounding.min_choice_probability,
                         "no_answer_above": grounding.no_answer_above},
        epochs=state.epochs, best_epoch=state.best_epoch or (state.epoch if state.epochs else None),
        best_val_loss=None if state.best_val is None else round(state.best_val, 5),
        val_kind=splits.val_kind, stopped_early=state.stopped_early, resumed_from_step=loop.resumed_from,
        steps=state.step, tokens_per_s=state.tokens_per_s, peak_rss_mb=peak_rss_mb(),
        duration_s=round(time.perf_counter() - started, 1), note=note,
        extra={"val_loss_before": state.val_loss_before},
    )
    (out / "training_report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report
