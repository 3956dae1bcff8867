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


def make_random_model_like(model_dir: str, out_dir: str | Path, *, seed: int) -> str:
    """Another model with the tokenizer of model_dir but other random weights and an untied output layer.

    (A tiny random model with tied embeddings mostly repeats the prompt's last token, whatever its seed.)
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return str(out_dir)


def plain_generate(model, tokenizer, messages: list[dict], *, max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy answer tokens of transformers' own generate() (end-of-turn token left out), the reference for the Engine."""
    import torch

    from tuning.prompts import encode_prompt

    ids = encode_prompt(tokenizer, messages)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
    return [t for t in out[0, ids.shape[1]:].tolist() if t not in stop_ids]


class ServerThread:
    """A uvicorn server for an ASGI app on a free loopback port, in a thread (a context manager)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = None

    def __enter__(self) -> "ServerThread":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
