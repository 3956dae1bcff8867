"""Streaming text generation with a transformers model (greedy by default), plus timing."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

from tuning.errors import ModelLoadError


@dataclass(frozen=True)
class GeneratedAnswer:
    """A finished answer; `stopped` is True when the model ended it itself (end-of-turn token)."""

    text: str
    ttft_ms: float
    n_tokens: int
    tokens_per_s: float
    stopped: bool
    token_logprobs: tuple[float, ...] = ()  # per answer token, when the backend measures them
    alternatives: tuple = ()  # the first tokens' likeliest (text, log-probability) pairs, when measured


def encode_prompt(tokenizer, messages: list[dict]):
    """input_ids (1, n) of the chat template with the generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    found = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        found.add(end_of_turn)
    return found


class _Run:
    """One generate() call on a background thread, feeding a TextIteratorStreamer."""

    def __init__(self, model, tokenizer, messages, *, max_new_tokens: int, temperature: float, stop_event):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        self.cancel = threading.Event()
        outer = stop_event

        class _Stop(StoppingCriteria):
            def __call__(self_inner, input_ids, scores, **kwargs):
                stop = self.cancel.is_set() or (outer is not None and outer.is_set())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        device = next(model.parameters()).device
        self.input_ids = encode_prompt(tokenizer, messages).to(device)
        self.streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos = sorted(_eos_ids(model, tokenizer))
        self.eos = set(eos)
        self.kwargs = dict(
            input_ids=self.input_ids, attention_mask=torch.ones_like(self.input_ids),
            max_new_tokens=max_new_tokens, streamer=self.streamer, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
            stopping_criteria=StoppingCriteriaList([_Stop()]), do_sample=temperature > 0,
        )
        if temperature > 0:
            self.kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        else:
            self.kwargs.update(temperature=None, top_p=None, top_k=None)
        self.model = model
        self.output = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="tunebot-generate", daemon=True)

    def _work(self) -> None:
        try:
            self.output = self.model.generate(**self.kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            self.error = exc
            self.streamer.end()

    def pieces(self) -> Iterator[str]:
        self.thread.start()
        try:
            for piece in self.streamer:
                if piece:
                    yield piece
        finally:
            self.cancel.set()  # the caller stopped reading: let generate() finish early
            self.thread.join()
        if self.error is not None:
            raise ModelLoadError(f"generation failed: {self.error}") from self.error

    def new_tokens(self) -> list[int]:
        if self.output is None:
            return []
        return self.output[0, self.input_ids.shape[1]:].tolist()


def stream_generate(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, stop_event: threading.Event | None = None) -> Iterator[str]:
    """Text pieces as the model produces them; generation runs off the caller's thread."""
    run = _Run(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
               stop_event=stop_event)
    yield from run.pieces()


def generate_answer(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, stop_event: threading.Event | None = None) -> GeneratedAnswer:
    """The whole answer with time to first token, tokens/s and whether it ended by itself."""
    run = _Run(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
               stop_event=stop_event)
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    for piece in run.pieces():
        if first is None:
            first = time.perf_counter()
        parts.append(piece)
    end = time.perf_counter()
    tokens = run.new_tokens()
    # Trailing pad tokens can follow eos; the answer ended itself when an eos token appears at all.
    stopped = any(t in run.eos for t in tokens)
    n = len(tokens)
    if stopped:
        n = next(i for i, t in enumerate(tokens) if t in run.eos) + 1
    ttft = ((first or end) - start) * 1000
    gen_time = end - (first or start)
    rate = (n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0
    return GeneratedAnswer(text="".join(parts).strip(), ttft_ms=round(ttft, 1), n_tokens=n,
                           tokens_per_s=round(rate, 1), stopped=stopped)
