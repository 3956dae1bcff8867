"""Answers: one base model, many LoRA adapters in an LRU, one inference thread, and the answer service."""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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
class AnswerResult:
    """A generated answer with its timings; `stopped` means it ended on end-of-turn, not the token limit."""

    text: str
    ttft_ms: float
    n_tokens: int
    tokens_per_s: float
    stopped: bool
    prompt_tokens: int = 0
    token_logprobs: tuple[float, ...] = ()  # of each answer token when it was chosen: how sure the model was
    alternatives: tuple = ()  # of the first ALTERNATIVE_STEPS tokens: the likeliest (text, log-probability) pairs


def _generated_answer(result: AnswerResult):
    """The answer as tuning.generation's GeneratedAnswer, the type evaluation and the bot read."""
    from tuning.generation import GeneratedAnswer

    return GeneratedAnswer(text=result.text, ttft_ms=result.ttft_ms, n_tokens=result.n_tokens,
                           tokens_per_s=result.tokens_per_s, stopped=result.stopped,
                           token_logprobs=result.token_logprobs, alternatives=result.alternatives)


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

    def result(self) -> AnswerResult:
        """Wait for the end and return the whole answer with its timings."""
        for _ in self:
            pass
        end = self.finished_at or time.perf_counter()
        first = self.first_token_at or end
        decode_s = max(end - first, 1e-9)
        return AnswerResult(
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


class _Detokenizer:
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


def _lean_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward with one plain adapter, as the same operations without peft's per-call checks.

    `_tunebot_lora` is (A, B, scaling) of the active adapter, None for the base model (or a layer the adapter
    does not touch), False to fall back to peft's own forward (DoRA and other variants, biases).
    """
    import torch.nn.functional as F

    lora = self._tunebot_lora
    if lora is False or args or kwargs or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if lora is None:
        return result
    a, b, scaling = lora
    return result + F.linear(F.linear(x, a), b) * scaling  # peft: result + lora_B(lora_A(dropout(x))) * scaling


def _lean_lora_state(layer, name: str | None):
    """What _lean_lora_forward needs for this layer and adapter (see there)."""
    import torch

    if name is None or name not in layer.lora_A:
        return None
    a, b = layer.lora_A[name], layer.lora_B[name]
    if (name in getattr(layer, "lora_variant", {}) or a.bias is not None or b.bias is not None
            or not isinstance(layer.lora_dropout[name], (torch.nn.Identity, torch.nn.Dropout))):
        return False
    return (a.weight, b.weight, layer.scaling[name])


def _stackable_cache(model) -> bool:
    """Whether the model's KV cache is plain growing tensors (no sliding window), so rows can be padded and stacked."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a model whose cache transformers builds differently: serve its requests one at a time
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _remove_injected_layers(model) -> None:
    """Put back the original layers wherever peft wrapped one (LoRA and other tuner layers, modules_to_save)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, wrappers)]
    for name in wrapped:
        if any(name.startswith(outer + ".") for outer in wrapped):
            continue  # inside another wrapper: goes with it
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        original = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module.get_base_layer()
        setattr(parent, child, original)
    if hasattr(model, "peft_config"):
        del model.peft_config


@dataclass
class _Row:
    """A request inside the running batch: the token it feeds next and at which position."""

    generation: Generation
    detok: _Detokenizer
    last: int = 0
    position: int = 0


class _Batch:
    """Requests decoded together on one adapter: one KV cache, left-padded, with a mask of the real tokens."""

    def __init__(self, adapter_dir: str | None):
        self.adapter_dir = adapter_dir
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None  # (rows, cache length) long: 1 where a row has a real token
        self.context = contextlib.ExitStack()


class SubmittingEngine:
    """stream() and answer() of an engine whose submit(messages, ...) returns a Generation (torch, llama.cpp),
    which keeps its adapters in `_adapters` (LRU first) and its requests in `_submitted`."""

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
        return _generated_answer(self.submit(messages, **kw).result())


class Engine(SubmittingEngine):
    """The base model loaded once, LoRA adapters in an LRU on one PeftModel, and one inference thread that decodes
    queued requests of the same adapter (or of the base model) together in one batch."""

    def __init__(self, base_model: str, *, cache_dir: str | Path | None = None, adapter_cache_size: int = 8,
                 max_new_tokens: int = 256, temperature: float = 0.0, device: str | None = None, dtype=None,
                 max_batch_size: int = 8):
        if adapter_cache_size < 1:
            raise InferenceError("adapter_cache_size must be at least 1")
        if max_batch_size < 1:
            raise InferenceError("max_batch_size must be at least 1")
        self.base_model = base_model
        self.cache_dir = cache_dir
        self.adapter_cache_size = adapter_cache_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.model = None  # the base model; peft injects the LoRA layers into it in place
        self.tokenizer = None
        self._peft = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # resolved folder -> peft adapter name
        self._names = itertools.count()
        self._active: str | None = None  # None: the base model
        self._current: _Batch | None = None  # the batch whose adapter the LoRA layers point at
        self._lora_layers: list | None = None  # peft's LoRA layers, found once per set of loaded adapters
        self._aux = False  # some adapter has modules_to_save: switch with peft's own set_adapter
        self.stop_ids: set[int] = set()
        self._logits_to_keep = False
        self._batchable = False  # whether the model's KV cache can be padded and stacked (found at load)
        self.context_length = 0  # the model's context window in tokens (0: unknown, not checked)
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.cancellations = 0  # requests that ended early because their caller cancelled them
        self.last_switch_ms = 0.0
        self.largest_batch = 0
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()  # prompts are encoded by the callers' threads, one at a time
        self._submitted: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._submitted_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- setup
    def load(self) -> None:
        """Load the base model and tokenizer (once; later calls return at once)."""
        with self._load_lock:
            if self.model is not None:
                return
            import inspect

            from tuning.models import load_base_model

            model, tok = load_base_model(self.base_model, cache_dir=self.cache_dir, dtype=self.dtype,
                                         device=self.device)
            model.eval()
            configured = model.generation_config.eos_token_id
            configured = configured if isinstance(configured, (list, tuple)) else [configured]
            self.stop_ids = {i for i in (*configured, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
                              if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}
            self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
            self._batchable = _stackable_cache(model)
            self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
            self.tokenizer = tok
            self.model = model

    def _enqueue(self, generation: Generation) -> None:
        """Queue a request, starting the inference thread if needed.

        Under the same lock as close(): a request is queued either before close()'s stop marker (and
        served before the thread ends) or after the thread ended (and a new thread serves it), never
        behind the marker with no thread left to take it.
        """
        with self._load_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tunebot-inference", daemon=True)
                self._thread.start()
            self._requests.put(generation)

    def close(self) -> None:
        """Stop the inference thread after the requests already queued (a later request starts it again)."""
        with self._load_lock:  # held until the old thread ends, so two threads never share the model
            if self._thread is not None:
                self._requests.put(None)
                self._thread.join()
                self._thread = None

    # ------------------------------------------------------------- requests
    def submit(self, messages: list[dict], *, adapter_dir: str | Path | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None) -> Generation:
        """Queue a request for chat messages; iterate the returned Generation for text pieces.

        The prompt is encoded here, so a prompt longer than the context window is refused at once
        (ContextLengthExceeded), and the answer is cut where the window ends.
        """
        self.load()
        input_ids = self._encode(messages)
        n = int(input_ids.shape[1])
        limit = min(max_new_tokens or self.max_new_tokens, 4096)
        if self.context_length:
            if n >= self.context_length:
                raise ContextLengthExceeded(n, self.context_length)
            limit = min(limit, self.context_length - n)
        generation = Generation(messages, adapter_dir=str(adapter_dir) if adapter_dir else None,
                                max_new_tokens=limit, input_ids=input_ids,
                                temperature=self.temperature if temperature is None else temperature)
        generation.prompt_tokens = n
        with self._submitted_lock:
            self._submitted.add(generation)
        self._enqueue(generation)
        return generation

    def _encode(self, messages: list[dict]):
        from tuning.generation import encode_prompt

        try:
            with self._encode_lock:
                return encode_prompt(self.tokenizer, messages).to(self.model.device)
        except Exception as exc:  # e.g. a chat template that refuses the roles' order
            raise InferenceError(f"cannot build the prompt: {exc}") from exc

    # ----------------------------------------------------- inference thread
    def _serve(self) -> None:
        """Take queued requests into batches, one per adapter (or the base model), and decode them in turns: one
        step of each batch in round-robin, switching adapters between steps, so that 8 clients on 8 adapters
        all get their first tokens at once instead of waiting for each other's batch to run to its end."""
        import torch

        pending: deque[Generation] = deque()
        closing, batches, turn = False, [], 0
        with torch.inference_mode():
            while True:
                # Once close() asked to stop, never block again: finish what is queued, then return.
                block = not batches and not pending and not closing
                closing = self._take_requests(pending, block=block) or closing
                if not batches and not pending:
                    if closing:
                        return
                    continue
                self._admit(batches, pending)
                if not batches:
                    continue
                turn %= len(batches)
                batch = batches[turn]
                try:
                    self._activate(batch)
                    if batch.rows:
                        self._step(batch)
                except Exception as exc:
                    log.exception("generation failed")
                    for row in batch.rows:
                        if row.generation.finished_at is None:
                            row.generation._finish(InferenceError(f"generation failed: {exc}"))
                    batch.rows = []
                if batch.rows:
                    turn += 1
                else:
                    with torch.inference_mode(False):
                        batch.context.close()
                    batches.pop(turn)

    @property
    def _max_batches(self) -> int:
        """Adapters decoded in turns at once: all resident (none evicted under a running batch); one when an
        adapter has modules_to_save (peft's own context switches those, and it cannot be interleaved)."""
        return 1 if self._aux else max(1, min(self.adapter_cache_size, 8))

    def _take_requests(self, pending: deque, *, block: bool) -> bool:
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

    def _activate(self, batch: _Batch) -> None:
        """Point the LoRA layers at the batch's adapter (a resident one: a few ms), unless they already are."""
        if self._current is batch:
            return
        import torch

        with torch.inference_mode(False):  # adapter weights stay ordinary tensors (peft toggles their grads)
            if batch.adapter_dir:
                self._use_adapter(batch.adapter_dir)
            else:
                self._use_base(batch)
        self._current = batch

    def _start_batch(self, generation: Generation) -> _Batch | None:
        """A batch on the request's adapter with the request in it (None when it was cancelled or failed)."""
        if generation.cancelled.is_set():
            self.cancellations += 1
            generation._finish()
            return None
        batch = _Batch(generation.adapter_dir)
        try:
            self._activate(batch)
        except TuningError as exc:  # reported to the waiting caller, the thread keeps serving
            log.warning("request failed: %s", exc)
            generation._finish(exc)
            return None
        except Exception as exc:
            log.exception("adapter switch failed")
            generation._finish(InferenceError(f"generation failed: {exc}"))
            return None
        self._join(batch, generation)
        return batch

    def _admit(self, batches: list[_Batch], pending: deque) -> None:
        """Waiting requests join the batch of their adapter while it has room, or start one while fewer than
        _max_batches run; the others wait for a batch to finish."""
        for generation in list(pending):
            if generation.cancelled.is_set():
                pending.remove(generation)
                self.cancellations += 1
                generation._finish()
                continue
            batch = next((b for b in batches if b.adapter_dir == generation.adapter_dir and b.rows
                          and self._batchable and len(b.rows) < self.max_batch_size), None)
            if batch is not None:
                pending.remove(generation)
                try:
                    self._activate(batch)
                except Exception as exc:  # noqa: BLE001 - this request fails; the thread keeps serving
                    log.exception("adapter switch failed")
                    generation._finish(exc if isinstance(exc, TuningError) else InferenceError(str(exc)))
                    continue
                self._join(batch, generation)
            elif len(batches) < self._max_batches:
                pending.remove(generation)
                batch = self._start_batch(generation)
                if batch is not None:
                    batches.append(batch)

    def _forward(self, **inputs):
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1
        return self.model(**inputs, use_cache=True).logits[:, -1].float()

    def _join(self, batch: _Batch, generation: Generation) -> None:
        """Prefill the request alone (exactly as an unbatched generate would), then stack its cache onto the batch's."""
        import torch
        from transformers import DynamicCache

        row = _Row(generation, _Detokenizer(self.tokenizer))
        try:
            input_ids = generation.input_ids
            n = int(input_ids.shape[1])
            generation.prompt_tokens = n
            cache = DynamicCache(config=self.model.config)
            logits = self._forward(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   position_ids=torch.arange(n, device=input_ids.device)[None],
                                   past_key_values=cache)
            row.position = n
            if self._accept(row, self._choose(logits, [row])[0]):
                return
            self._stack(batch, cache, n)
        except Exception as exc:
            if not isinstance(exc, TuningError):
                log.exception("generation failed")
                exc = InferenceError(f"generation failed: {exc}")
            generation._finish(exc)
            return
        batch.rows.append(row)
        self.largest_batch = max(self.largest_batch, len(batch.rows))

    def _stack(self, batch: _Batch, cache, n: int) -> None:
        """Add a prefilled cache of n tokens to the batch: both left-padded with zeros to the longer length."""
        import torch
        import torch.nn.functional as F
        mask = torch.ones(1, n, dtype=torch.long, device=self.model.device)
        if batch.cache is None:
            batch.cache, batch.mask = cache, mask
            return
        length = max(batch.mask.shape[1], n)

        def pad(t, size):  # (rows, heads, time, dim) or (rows, time): zeros on the left of time
            extra = length - size
            if not extra:
                return t
            return F.pad(t, (0, 0, extra, 0)) if t.dim() == 4 else F.pad(t, (extra, 0))

        old = batch.mask.shape[1]
        for mine, new in zip(batch.cache.layers, cache.layers):
            mine.keys = torch.cat([pad(mine.keys, old), pad(new.keys, n)])
            mine.values = torch.cat([pad(mine.values, old), pad(new.values, n)])
        batch.mask = torch.cat([pad(batch.mask, old), pad(mask, n)])

    def _step(self, batch: _Batch) -> None:
        """One decoding step for every row of the batch; finished rows leave it."""
        import torch

        device = self.model.device
        self._drop(batch, [i for i, row in enumerate(batch.rows) if row.generation.cancelled.is_set()])
        if not batch.rows:
            return
        rows = batch.rows
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(input_ids=torch.tensor([[r.last] for r in rows], device=device),
                               position_ids=torch.tensor([[r.position] for r in rows], device=device),
                               attention_mask=batch.mask, past_key_values=batch.cache)
        done = []
        for i, (row, token) in enumerate(zip(rows, self._choose(logits, rows))):
            row.position += 1
            if self._accept(row, token):
                done.append(i)
        self._drop(batch, done)

    def _drop(self, batch: _Batch, indices: list[int]) -> None:
        """Remove finished rows from the batch, and the cache columns that only they used."""
        if not indices:
            return
        import torch

        for i in indices:
            row = batch.rows[i]
            if not row.generation.finished_at:
                self._finish(row)
        keep = [i for i in range(len(batch.rows)) if i not in set(indices)]
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])  # leading columns that are padding in every remaining row
        batch.mask = mask[:, start:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _choose(self, logits, rows: list[_Row]) -> list[int]:
        """The next token of each row: the most likely one, or a sample for rows with a temperature."""
        import torch

        tokens = logits.argmax(dim=-1).tolist()
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i, row in enumerate(rows):
            temperature = row.generation.temperature
            if temperature >= MIN_TEMPERATURE:  # below it logits / temperature overflow: greedy, its limit
                scores = logits[i] / temperature
                top_k = self.model.generation_config.top_k or 0
                if 0 < top_k < scores.shape[-1]:
                    kth = torch.topk(scores, top_k).values[-1]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                tokens[i] = int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
            row.generation._chosen_logprob = float(logprobs[i, tokens[i]])
            if len(row.generation.token_logprobs) < ALTERNATIVE_STEPS:  # e.g. the citation of a grounded answer
                top = torch.topk(logprobs[i], ALTERNATIVES)
                row.generation._step_alternatives = tuple(
                    (self.tokenizer.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices))
        return tokens

    def _accept(self, row: _Row, token: int) -> bool:
        """Stream a chosen token; True when the row is finished (end of turn, token limit or cancelled)."""
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

    def _finish(self, row: _Row) -> None:
        if row.generation.cancelled.is_set():
            self.cancellations += 1
        piece = row.detok.flush()
        if piece:
            row.generation._emit(piece)
        row.generation._finish()

    # -------------------------------------------------------------- adapters
    def _use_base(self, batch: _Batch) -> None:
        """Answer with the base model: LoRA layers point at no adapter (peft's disable_adapter walks every module)."""
        if self._peft is None:
            return
        start = time.perf_counter()
        if self._aux:  # modules_to_save are switched off by peft's own context
            batch.context.enter_context(self._peft.disable_adapter())
        self._switch(None)
        self.last_switch_ms = (time.perf_counter() - start) * 1000

    def _use_adapter(self, adapter_dir: str) -> None:
        """Make this adapter the active one, loading it (and evicting the least recently used) if needed."""
        start = time.perf_counter()
        from tuning.artifacts import is_remote, local_dir

        if is_remote(adapter_dir):  # an adapter in a shared store (s3://, memory://, …): a cached local copy
            adapter_dir = str(local_dir(adapter_dir, cache_dir=self.cache_dir))
        key = str(Path(adapter_dir).expanduser().resolve())
        name = self._adapters.get(key)
        if name is None:
            if not (Path(key) / "adapter_config.json").exists():
                log.warning("no adapter_config.json in %s", key)
                raise AdapterLoadError(f"the adapter {Path(key).name!r} is not a LoRA adapter folder "
                                       "(no adapter_config.json)", code="adapter_unavailable")
            name = f"adapter{next(self._names)}"
            self._load_adapter(key, name)
            config = self._peft.peft_config[name]
            self._aux = self._aux or bool(getattr(config, "modules_to_save", None) or
                                          getattr(config, "trainable_token_indices", None))
            self._lora_layers = None
            self._active = ""  # the new adapter's layers were just added: point every layer again
            self.adapter_loads += 1
            self._adapters[key] = name
        self._adapters.move_to_end(key)
        if name != self._active:
            self._switch(name)
        self.last_switch_ms = (time.perf_counter() - start) * 1000
        while len(self._adapters) > self.adapter_cache_size:
            _, old = self._adapters.popitem(last=False)
            self._peft.delete_adapter(old)
            self._lora_layers = None
            self.adapter_evictions += 1

    def _load_adapter(self, folder: str, name: str) -> None:
        """Load an adapter under `name`; when that fails, take out what peft had already injected (raising
        AdapterLoadError), so the base model and the other adapters answer exactly as before."""
        grads = [(p, p.requires_grad) for p in self.model.parameters()] if self._peft is None else []
        try:
            if self._peft is None:
                from peft import PeftModel

                # low_cpu_mem_usage: the weights are created empty and filled from the file, not initialised.
                self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name, low_cpu_mem_usage=True)
                self._peft.eval()
            else:
                self._peft.load_adapter(folder, adapter_name=name, low_cpu_mem_usage=True)
        except Exception as exc:  # safetensors, peft and torch raise many types for a missing or damaged file
            log.warning("cannot load the adapter in %s: %s: %s", folder, type(exc).__name__, exc)
            if self._peft is None:  # from_pretrained wraps the shared model's layers before it reads the weights
                _remove_injected_layers(self.model)
                for param, requires_grad in grads:
                    param.requires_grad_(requires_grad)
            elif name in self._peft.peft_config:
                try:
                    self._peft.delete_adapter(name)
                except Exception:
                    log.exception("cannot remove the half-loaded adapter %s", name)
            self._lora_layers = None
            self._active = ""  # every layer is pointed again by the next request, whichever model it asks for
            raise AdapterLoadError(f"the adapter {Path(folder).name!r} cannot be loaded: its files are missing or "
                                   "damaged (the server log has the details)", code="adapter_unavailable") from exc

    def _switch(self, name: str | None) -> None:
        """Activate a resident adapter (None: no adapter) by pointing each LoRA layer at it.

        peft's set_adapter also walks every module and toggles requires_grad on every resident adapter, which
        grows with the number of adapters (~250 ms with 20 on this CPU); inference needs only the pointer.
        Plain LoRA linears also get a lean forward (the same operations as peft's, without its per-call checks).
        """
        if self._lora_layers is None:
            import types

            from peft.tuners.lora.layer import Linear as LoraLinear
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in self._peft.modules() if isinstance(m, BaseTunerLayer)]
            for layer in self._lora_layers:
                if type(layer) is LoraLinear and not layer.fan_in_fan_out and "forward" not in vars(layer):
                    layer.forward = types.MethodType(_lean_lora_forward, layer)
        if self._aux and name is not None:  # modules_to_save / trainable tokens: peft's full walk
            self._peft.set_adapter(name)
        elif not self._aux:
            if name is not None:
                self._peft.base_model.active_adapter = name
        for layer in self._lora_layers:
            if not self._aux:
                layer._active_adapter = [name] if name is not None else []
            if "forward" in vars(layer):
                layer._tunebot_lora = _lean_lora_state(layer, name)
        self._active = name


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
        return _generated_answer(AnswerResult(
            text="".join(pieces), ttft_ms=(first - start) * 1000, n_tokens=n,
            tokens_per_s=(n - 1) / max(end - first, 1e-9) if n > 1 else 0.0,
            stopped=n < (kw.get("max_new_tokens") or self.max_new_tokens)))


# The answer service (plans, modes, recording) lives in tuning.answer_service; its names stay importable here.
_SERVICE_NAMES = {"ABSTAIN_TEXT", "Answer", "AnswerPlan", "answer_question", "compare_answers", "plan_answer",
                  "record_answer", "select_fewshot"}


def __getattr__(name: str):
    if name in _SERVICE_NAMES:
        from tuning import answer_service

        return getattr(answer_service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
