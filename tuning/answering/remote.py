"""Answers from an OpenAI-compatible endpoint (vLLM, llama.cpp server, a hosted model) instead of a local model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

from tuning.answering.requests import GeneratedAnswer, InferenceError, prepare_messages

log = logging.getLogger(__name__)

class RemoteEngine:
    """The Engine interface over an OpenAI-compatible server (vLLM with LoRA adapters served by name, or any endpoint)."""

    def __init__(self, base_url: str, *, api_key: str = "", model: str = "", max_new_tokens: int = 256,
                 temperature: float = 0.0, timeout: float = 120.0):
        if not base_url:
            raise InferenceError("inference_backend=openai needs TUNEBOT_INFERENCE_BASE_URL")
        from openai import OpenAI

        self.base_model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.client = OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout, max_retries=1)

    def load(self) -> None:
        """Nothing to load: the server holds the models."""

    def close(self) -> None:
        self.client.close()

    def model_name(self, *, adapter_dir: str | Path | None = None, adapter_name: str | None = None) -> str:
        """The server's model name: the adapter's name, else its folder name, else the base model."""
        if adapter_name:
            return adapter_name
        if adapter_dir:
            return Path(adapter_dir).name
        if not self.base_model:
            raise InferenceError("the remote backend needs a model name for base answers (TUNEBOT_BASE_MODEL)")
        return self.base_model

    def stream(self, question_or_messages, *, adapter_dir: str | Path | None = None, adapter_name: str | None = None,
               system_prompt: str = "", fewshot: Sequence[tuple[str, str]] = (), max_new_tokens: int | None = None,
               temperature: float | None = None) -> Iterator[str]:
        """Text pieces as the server streams them."""
        import openai

        messages = prepare_messages(question_or_messages, system_prompt=system_prompt, fewshot=fewshot)
        try:
            chunks = self.client.chat.completions.create(
                model=self.model_name(adapter_dir=adapter_dir, adapter_name=adapter_name), messages=messages,
                stream=True, max_tokens=max_new_tokens or self.max_new_tokens,
                temperature=self.temperature if temperature is None else temperature)
            with chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.APIError as exc:
            raise InferenceError(f"the inference server refused the request: {exc}") from exc

    def answer(self, question_or_messages, **kw):
        """The whole answer with timings measured on the client (one streamed chunk counts as one token)."""
        start = time.perf_counter()
        first, pieces = None, []
        for piece in self.stream(question_or_messages, **kw):
            first = first or time.perf_counter()
            pieces.append(piece)
        end = time.perf_counter()
        first = first or end
        n = len(pieces)
        return GeneratedAnswer(
            text="".join(pieces), ttft_ms=(first - start) * 1000, n_tokens=n,
            tokens_per_s=(n - 1) / max(end - first, 1e-9) if n > 1 else 0.0,
            stopped=n < (kw.get("max_new_tokens") or self.max_new_tokens))
