"""Automatic hyperparameters from the data size; every value can be overridden in TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass

# Defaults for small fact sets: many passes at a high LoRA rate, with early stopping on held-out
# variations guarding overfitting (the usual 2-3 epochs at 2e-4 are tuned for large instruction sets).
# Measured (bundled SmolLM2-135M, LoRA r=16 all linear, lr 1e-3, rows of ~300 tokens, first 20 facts
# of examples/acme_faq.jsonl + 1 mutation each, validation = 4 held-out mutations, test = their 20
# paraphrases in examples/acme_eval.jsonl, must_contain accuracy, greedy, 40 new tokens):
#   5 epochs: val loss 3.07 -> 1.58, 0.99, 0.54, 0.41, 0.27 (still falling: 5 epochs are too few);
#             accuracy base 0.00, few-shot (k=8) 0.05, tuned 0.20; tuned token F1 0.42 vs base 0.11.
#   10 epochs max: early stopping at epoch 8, best epoch 6 (val 0.18); accuracy base 0.00, few-shot 0.05,
#             tuned 0.30; tuned F1 0.49, every tuned answer ended by itself; 118 s at 167 tokens/s.
# On 48 mixed pairs for 1 epoch (bench/train_throughput.py) val loss went 2.84 -> 1.62.
# bench/learning_sweep.py (results/learning_sweep.json): all 40 ACME facts + 3 mutations each (160 items),
# 40 held-out paraphrases, must_contain accuracy (base 0.05, few-shot 0.075):
#   lr 1e-3:  6 epochs 0.125, 12 epochs 0.275 (best epoch 11)
#   lr 2e-3: 12 epochs 0.475 (best epoch 11, val 0.074)     <- the small-set default
#   lr 3e-3: 12 epochs max 0.375 (early stop at 9, best 7)
#   lr 5e-3: 12 epochs max 0.40 (early stop at 10);  lr 2e-3 x 8 epochs max: 0.325 (early stop at 7).
# One run each on 40 questions (±0.08): 2e-3..5e-3 all clearly beat 1e-3. Medium and large sets are not swept.
# Since issue 12 the values are keyed on FACTS (families: an example and its variations), never on augmented
# rows: a user adding variations gets the same learning rate and the same number of views of each fact, not
# fewer epochs (the old row thresholds put 40 facts x 6 variations into the "medium" bucket: 5 epochs at 5e-4,
# 4% on reworded questions). An epoch shows every row once, so epochs = views per fact / rows per fact.
LORA_LR_SMALL = 2e-3     # < 100 facts
LORA_LR_MEDIUM = 1e-3    # < 1000 facts
LORA_LR_LARGE = 5e-4
FULL_LR_SMALL = 5e-5
FULL_LR_LARGE = 2e-5
VIEWS_CLOSED = 48        # closed book: 12 epochs x 4 rows per fact was the best of the sweep above
VIEWS_GROUNDED = 16      # grounded rows teach picking and copying: far fewer views (bench/learning_sweep.py)
MAX_EPOCHS = 12


@dataclass(frozen=True)
class Hyperparameters:
    """The values a run actually uses."""

    epochs: int
    learning_rate: float
    lora_rank: int
    lora_alpha: int
    batch_tokens: int
    patience: int
    eval_every_steps: int | None


def choose(*, n_facts: int, n_items: int, n_tokens: int, method: str = "lora", recipe: str = "closed",
           epochs: int | None = None, learning_rate: float | None = None, lora_rank: int | None = None,
           batch_tokens: int | None = None, patience: int | None = None) -> Hyperparameters:
    """Defaults from the number of facts and tokens (rows only set how many epochs give the views); explicit
    values win."""
    n_facts = max(1, min(n_facts, n_items))
    if n_facts < 100:
        lora_lr, full_lr, rank = LORA_LR_SMALL, FULL_LR_SMALL, 16
    elif n_facts < 1000:
        lora_lr, full_lr, rank = LORA_LR_MEDIUM, FULL_LR_LARGE, 16
    else:
        lora_lr, full_lr, rank = LORA_LR_LARGE, FULL_LR_LARGE, 32
    views = VIEWS_GROUNDED if recipe == "grounded" else VIEWS_CLOSED
    if n_facts >= 1000:
        views //= 2  # many facts: each optimizer step already sees many of them; validation stops early anyway
    rows_per_fact = n_items / n_facts
    auto_epochs = max(1, min(MAX_EPOCHS, round(views / rows_per_fact)))
    per_item = max(1, n_tokens // max(1, n_items))
    # Few facts: small rows so an epoch still has ~8+ optimizer steps; many: rows of up to 2048 tokens.
    auto_batch = min(2048, max(256, n_tokens // 8, 2 * per_item))
    rank_value = lora_rank or rank
    lr = learning_rate or (full_lr if method == "full" else lora_lr)
    steps_per_epoch = max(1, n_tokens // (batch_tokens or auto_batch))
    # Big sets: validate a few times per epoch instead of only at its end.
    eval_every = steps_per_epoch // 4 if steps_per_epoch >= 400 else None
    return Hyperparameters(
        epochs=epochs or auto_epochs, learning_rate=lr, lora_rank=rank_value, lora_alpha=2 * rank_value,
        batch_tokens=batch_tokens or auto_batch, patience=patience if patience is not None else 2,
        eval_every_steps=eval_every,
    )


def plan_size(*, n_facts: int, n_items: int, n_tokens: int, recipe: str = "grounded", k: int = 3) -> tuple[int, int]:
    """(rows, tokens) of one epoch before tokenizing: grounded rows carry k examples more, plus one closed-book
    row per fact (tuning.grounding.grounded_items). For estimates shown before a run starts."""
    if recipe != "grounded" or n_items == 0:
        return n_items, n_tokens
    per_item = n_tokens / n_items
    return n_items + n_facts, round(n_tokens * (1 + k) + per_item * n_facts)
