"""The model being trained: loaded with its adapters (or all weights trainable), and the loss of a packed row."""

from __future__ import annotations

from typing import Sequence

from tuning.data.dataset import IGNORE, PackedRow
from tuning.errors import TrainingError
from tuning.training import hparams as hp
from tuning.training.config import FULL_MAX_PARAMS, METHODS, TrainConfig
from tuning.training.loss import DEFAULT_CHUNK, chunked_cross_entropy, output_projection
from tuning.training.speed import segment_bounds, uses_packed_attention


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def default_device():
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
        model.to(device or default_device())
    return model, tokenizer


def row_loss(model, row: PackedRow, device, *, chunk: int = DEFAULT_CHUNK) -> tuple:
    """(summed token loss, number of answer tokens) of one packed row.

    The decoder's last hidden states at the answer positions go through the output projection `chunk` at a time
    (tuning.training.loss): the (answer tokens x vocabulary) logits never exist at once, nor are they kept for
    the backward pass. A model whose head this cannot split falls back to its own logits at those positions.
    """
    import torch
    import torch.nn.functional as F

    t = row.tensors(device)
    targets = t["labels"][0, 1:]
    keep = (targets != IGNORE).nonzero().squeeze(1)  # positions whose next token is an answer token
    # use_cache=False and no attention_mask: transformers then detects the packed examples from the
    # position ids and keeps them from attending to each other (with a cache it silently does not).
    inputs = {"input_ids": t["input_ids"], "position_ids": t["position_ids"], "use_cache": False}
    if uses_packed_attention(model):  # tuning.training.speed.fast_training: attention per example of the row
        inputs["cu_seq_lens_q"] = torch.tensor(segment_bounds(row.position_ids), dtype=torch.int32)
    split = output_projection(model)
    if split is not None:
        _, decoder, head, softcap = split
        hidden = decoder(**inputs).last_hidden_state[0, keep]
        loss = chunked_cross_entropy(hidden, head.weight, targets[keep], bias=head.bias, chunk=chunk,
                                     softcap=softcap)
        return loss, int(keep.numel())
    # logits_to_keep: the vocabulary projection runs only where the loss needs it (answer tokens).
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep: project every position, keep the needed ones
        logits = model(**inputs).logits[:, keep]
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
