"""A request to answer, as every engine sees it: the messages, the Generation handle that streams its tokens
and its result (GeneratedAnswer), the errors answering raises, and stream()/answer() over an engine's submit()."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Iterator, Sequence

from tuning.errors import ModelLoadError, TuningError

log = logging.getLogger(__name__)


MODES = ("auto", "grounded", "tuned", "version", "base", "fewshot")  # lookup is an evaluation baseline only
_END = object()
ALTERNATIVE_STEPS = 4  # the first tokens whose likeliest alternatives are kept (a grounded answer's "[i]")
ALTERNATIVES = 8
MIN_TEMPERATURE = 1e-3  # a sampling temperature below this answers greedily (3.7e-100 made the scores inf)


class InferenceError(TuningError):
    """An answer could not be produced (no trained version, unknown mode, backend down)."""


class NoActiveVersion(InferenceError):
    """The assistant has no active tuned version yet."""


class AdapterLoadError(InferenceError, ModelLoadError):
    """A version's adapter files are missing or damaged; the engine goes on serving every other model."""


class ContextLengthExceeded(InferenceError):
    """The prompt leaves no room for an answer in the model's context window."""

    def __init__(self, prompt_tokens: int, context_length: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens long; this model's context window is "
                         f"{context_length} tokens: shorten the messages", code="context_length_exceeded",
                         params={"prompt_tokens": prompt_tokens, "context_length": context_length})
        self.prompt_tokens, self.context_length = prompt_tokens, context_length


@dataclass(frozen=True)
class GeneratedAnswer:
    """A generated answer with its timings (every engine's, and what evaluation scores); `stopped` means it ended
    on end-of-turn, not the token limit."""

    text: str
    ttft_ms: float
    n_tokens: int
    tokens_per_s: float
    stopped: bool
    prompt_tokens: int = 0
    token_logprobs: tuple[float, ...] = ()  # of each answer token when it was chosen: how sure the model was
    alternatives: tuple = ()  # of the first ALTERNATIVE_STEPS tokens: the likeliest (text, log-probability) pairs


def _build_messages(question: str, *, system_prompt: str, fewshot: Sequence[tuple[str, str]]) -> list[dict]:
    from tuning.prompts import build_messages

    return build_messages(question, system_prompt=system_prompt, fewshot=fewshot)


def prepare_messages(question_or_messages, *, system_prompt: str = "",
                     fewshot: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """Chat messages for a question (or a conversation): the system prompt and few-shot pairs applied as in training."""
    if isinstance(question_or_messages, str):
        return _build_messages(question_or_messages, system_prompt=system_prompt, fewshot=fewshot)
    messages = [dict(m) for m in question_or_messages]
    if not messages or messages[-1].get("role") != "user":
        raise InferenceError("the last message must come from the user")
    system = next((m["content"] for m in messages if m.get("role") == "system"), system_prompt)
    history = [m for m in messages[:-1] if m.get("role") in ("user", "assistant")]
    built = _build_messages(str(messages[-1]["content"]), system_prompt=system, fewshot=fewshot)
    return built[:-1] + history + built[-1:]


class Generation:
    """One queued request: iterate it for text pieces; its timings are filled in as it runs."""

    def __init__(self, messages: list[dict], *, adapter_dir: str | None, max_new_tokens: int, temperature: float,
                 input_ids=None):
        self.messages = messages
        self.input_ids = input_ids  # the prompt's tokens (1, n), encoded by Engine.submit in the caller's thread
        self.adapter_dir = adapter_dir
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.text = ""
        self.n_tokens = 0
        self.token_ids: list[int] = []  # the answer's tokens (without the end-of-turn token)
        self.token_logprobs: list[float] = []  # log-probability of each of them when it was chosen
        self._chosen_logprob = 0.0
        self.alternatives: list[tuple[tuple[str, float], ...]] = []  # per early step: the likeliest tokens
        self._step_alternatives: tuple = ()
        self.prompt_tokens = 0
        self.stopped = False
        self._pieces: queue.Queue = queue.Queue()
        self._ended = False  # the end (or an error) was taken from the queue: iterating again returns at once

    def cancel(self) -> None:
        """Stop generating at the next token (e.g. the client went away)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        while not self._ended:
            item = self._pieces.get()
            if item is _END:
                self._ended = True
                return
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            yield item

    def result(self) -> GeneratedAnswer:
        """Wait for the end and return the whole answer with its timings."""
        for _ in self:
            pass
        end = self.finished_at or time.perf_counter()
        first = self.first_token_at or end
        decode_s = max(end - first, 1e-9)
        return GeneratedAnswer(
            text=self.text, ttft_ms=(first - self.submitted) * 1000, n_tokens=self.n_tokens,
            tokens_per_s=(self.n_tokens - 1) / decode_s if self.n_tokens > 1 else 0.0,
            stopped=self.stopped, prompt_tokens=self.prompt_tokens,
            token_logprobs=tuple(self.token_logprobs), alternatives=tuple(self.alternatives))

    # Called from the inference thread.
    def _emit(self, piece: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text += piece
        self._pieces.put(piece)

    def _finish(self, error: BaseException | None = None) -> None:
        self.finished_at = time.perf_counter()
        if error is not None:
            self._pieces.put(error)
        self._pieces.put(_END)


class Detokenizer:
    """Text pieces of a growing answer, decoding a short window of tokens (not the whole answer) per token.

    The window starts at the last piece sent, so tokenizers that drop a word's leading space at the start of
    a decode see the same start in both decodes; a piece ending in half a UTF-8 character is held back.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window's first token
        self.sent = 0  # ids[start:sent] were already sent as text

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.start:self.sent])
        text = self._decode(self.ids[self.start:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.start, self.sent = self.sent, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        before = self._decode(self.ids[self.start:self.sent])
        text = self._decode(self.ids[self.start:])
        self.start = self.sent = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


class SubmittingEngine:
    """stream() and answer() of an engine whose submit(messages, ...) returns a Generation (torch, llama.cpp),
    which keeps its adapters in `_adapters` (LRU first), its requests in `_submitted` and its queue in
    `_requests`; and what both decoding loops do with the queue and each chosen token."""

    @property
    def resident_adapters(self) -> list[str]:
        """Adapter folders in memory, least recently used first."""
        return list(self._adapters)

    @property
    def in_flight(self) -> int:
        """Requests queued or being decoded and not finished yet (0: the engine is idle)."""
        with self._submitted_lock:
            return sum(1 for g in list(self._submitted) if g.finished_at is None)

    def stream(self, question_or_messages, *, adapter_dir: str | Path | None = None, adapter_name: str | None = None,
               system_prompt: str = "", fewshot: Sequence[tuple[str, str]] = (), max_new_tokens: int | None = None,
               temperature: float | None = None) -> Iterator[str]:
        """Text pieces of the answer, token by token; closing the iterator cancels the request."""
        generation = self.submit(prepare_messages(question_or_messages, system_prompt=system_prompt, fewshot=fewshot),
                                 adapter_dir=adapter_dir, max_new_tokens=max_new_tokens, temperature=temperature)
        try:
            yield from generation
        finally:
            generation.cancel()

    def answer(self, question_or_messages, **kw):
        """The whole answer (GeneratedAnswer) with ttft_ms, n_tokens, tokens_per_s, stopped."""
        kw.pop("adapter_name", None)
        messages = prepare_messages(question_or_messages, system_prompt=kw.pop("system_prompt", ""),
                                    fewshot=kw.pop("fewshot", ()))
        return self.submit(messages, **kw).result()

    # ------------------------------------------- shared by the decoding loops
    def _take_requests(self, pending: Deque, *, block: bool) -> bool:
        """Move queued requests to pending (waiting for one if block); True when close() asked to stop."""
        closing = False
        try:
            item = self._requests.get() if block else self._requests.get_nowait()
            while True:
                if item is None:
                    closing = True
                else:
                    pending.append(item)
                item = self._requests.get_nowait()
        except queue.Empty:
            return closing

    def _accept(self, row, token: int) -> bool:
        """Stream a chosen token of a row (its generation, detok and last token); True when it is finished (end of turn, token limit or cancelled)."""
        generation = row.generation
        if token in self.stop_ids:
            generation.stopped = True
            self._finish(row)
            return True
        generation.n_tokens += 1
        generation.token_ids.append(token)
        generation.token_logprobs.append(generation._chosen_logprob)
        if len(generation.alternatives) < ALTERNATIVE_STEPS:
            generation.alternatives.append(generation._step_alternatives)
        piece = row.detok.push(token)
        if piece:
            generation._emit(piece)
        elif generation.first_token_at is None:
            generation.first_token_at = time.perf_counter()
        row.last = token
        if generation.n_tokens >= generation.max_new_tokens or generation.cancelled.is_set():
            self._finish(row)
            return True
        return False

    def _finish(self, row) -> None:
        if row.generation.cancelled.is_set():
            self.cancellations += 1
        piece = row.detok.flush()
        if piece:
            row.generation._emit(piece)
        row.generation._finish()
