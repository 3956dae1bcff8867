"""Helpers for inference tests: random (but deterministic) LoRA adapters that change a model's answers."""

from __future__ import annotations

from pathlib import Path


def make_random_adapter(model_dir: str, out_dir: str | Path, *, seed: int, rank: int = 4, alpha: int = 64) -> str:
    """Save a LoRA adapter with random non-zero weights for the model in model_dir; returns its folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.save_pretrained(out_dir)
    return str(out_dir)
