"""The larger model's client for a generation run: bounded concurrency, retries with backoff (Retry-After
wins), a budget of requests and tokens, and the usage of every call recorded on the run."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tuning.data.synthetic")


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the larger model and how patiently to talk to it."""

    base_url: str = ""
    api_key: str = field(default="", repr=False)  # kept out of logs and tracebacks
    model: str = "gpt-4o-mini"
    timeout_s: float = 60.0
    concurrency: int = 4
    max_retries: int = 4  # per request, on 429, 5xx, timeouts and connection errors
    backoff_s: float = 1.0  # first wait; doubles each retry, Retry-After wins when the server sends one
    max_backoff_s: float = 30.0
    temperature: float = 0.8
    max_completion_tokens: int = 700
    price_per_1k_tokens: float = 0.0006
    json_schema: bool = False  # also send a JSON schema (llama.cpp's server enforces it; OpenAI ignores json_object's)
    seed: int | None = None


@dataclass(frozen=True)
class Budget:
    """Per-run limits; reaching one stops the run cleanly (it can be resumed)."""

    max_requests: int = 200
    max_tokens: int = 200_000


class RunStopped(Exception):
    """The whole run must stop (budget spent, endpoint unusable)."""


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def _describe(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "the request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot connect to the endpoint ({exc.__cause__ or exc})"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} from the endpoint ({str(exc.message)[:120]})"
    return f"{type(exc).__name__}: {exc}"


class BudgetedClient:
    """The client of one generation run: bounded concurrency, retries, the budget, usage recorded on the run."""

    def __init__(self, store, run, *, config: ClientConfig, budget: Budget, client=None):
        from openai import AsyncOpenAI

        self.store, self.run, self.config, self.budget = store, run, config, budget
        self.client = client or AsyncOpenAI(base_url=config.base_url or None, api_key=config.api_key or "sk-no-key",
                                            timeout=config.timeout_s, max_retries=0)
        self.semaphore = asyncio.Semaphore(max(1, config.concurrency))
        self.requests = self.tokens = 0
        self.stop_reason: str | None = None
        self.stop_status = "stopped"
        self.problems: list[str] = []

    def _halt(self, reason: str, status: str) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_status = reason, status
        raise RunStopped(reason)

    async def call(self, messages: list[dict], *, schema: dict | None, seed_offset: int = 0) -> str:
        """One chat completion with retries and backoff; returns the message text (may be empty)."""
        import openai

        cfg = self.config
        response_format: dict[str, Any] = {"type": "json_object"}
        if cfg.json_schema and schema is not None:
            response_format["schema"] = schema
        extra: dict[str, Any] = {}
        if cfg.seed is not None:
            extra["seed"] = cfg.seed + seed_offset
        last = ""
        for attempt in range(cfg.max_retries + 1):
            async with self.semaphore:
                if self.stop_reason is not None:
                    raise RunStopped(self.stop_reason)
                if self.requests >= self.budget.max_requests:
                    self._halt(f"budget spent: {self.requests} requests (the limit is {self.budget.max_requests})"
                               + (f"; last error: {last}" if last else ""), "stopped")
                if self.tokens >= self.budget.max_tokens:
                    self._halt(f"budget spent: {self.tokens} tokens (the limit is {self.budget.max_tokens})", "stopped")
                self.requests += 1
                try:
                    response = await self.client.chat.completions.create(
                        model=cfg.model, messages=messages, temperature=cfg.temperature,
                        max_tokens=cfg.max_completion_tokens, response_format=response_format, **extra)
                except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                        openai.APIConnectionError) as exc:
                    error = exc
                except openai.APIStatusError as exc:
                    if exc.status_code >= 500 or exc.status_code in (408, 409):
                        error = exc
                    else:
                        self.store.add_generation_usage(self.run.id, requests=1)
                        hint = {401: "check OPENAI_API_KEY", 403: "check OPENAI_API_KEY",
                                404: "check OPENAI_BASE_URL and the model name"}.get(exc.status_code, "")
                        self._halt(_describe(exc) + (f"; {hint}" if hint else ""), "failed")
                else:
                    return self._record(response)
            self.store.add_generation_usage(self.run.id, requests=1)
            last = _describe(error)
            if attempt == cfg.max_retries:
                self._halt(f"{last} (after {cfg.max_retries + 1} tries)", "failed")
            wait = _retry_after(error)
            if wait is None:
                wait = cfg.backoff_s * 2 ** attempt
            log.info("generation request failed (%s); retrying in %.2fs", last, wait)
            await asyncio.sleep(min(wait, cfg.max_backoff_s))
        raise AssertionError("unreachable")

    def _record(self, response) -> str:
        usage = getattr(response, "usage", None)
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        self.tokens += prompt + completion
        cost = (prompt + completion) / 1000 * self.config.price_per_1k_tokens
        self.store.add_generation_usage(self.run.id, requests=1, prompt_tokens=prompt,
                                        completion_tokens=completion, cost_usd=cost)
        choices = getattr(response, "choices", None) or []
        return (choices[0].message.content or "") if choices else ""
