"""The `llamacpp` answer backend: the base model's GGUF in llama.cpp (llama-cpp-python), each version's LoRA
converted once to a GGUF adapter, with the same chat template, stop tokens and Generation records (text pieces,
token log-probabilities, early alternatives) as the torch Engine.

Prompts are encoded with the model's transformers tokenizer and chat template, exactly as in training and in
the torch engine; llama.cpp gets token ids. The model is loaded once and answered through up to `max_slots`
contexts (tuning/answering/llamacpp_context.py), each with its own adapter and KV cache, so that switching
adapters costs nothing while they stay set. One thread serves them all:

- a request goes to an idle context already on its adapter (the one whose KV cache shares the longest prefix
  with the prompt), else to a new context while fewer than max_slots exist, else to the least recently used
  idle context, which takes its adapter; a context new to an adapter copies the longest shared prompt prefix
  from another context on that adapter; one adapter never takes the last context while others may need it;
- with max_batch_size > 1, requests of one adapter also decode together in one context, one sequence each,
  in one llama_decode per step;
- new requests are prefilled as soon as they arrive, before the next decoding step, so that a client's first
  token never waits for another client's answer to end;
- the busy contexts take decoding steps in turn, so 8 clients on 8 adapters all advance together.

Measured on this 2-core machine: one context switching adapters between steps cost 20 ms a step against 14 ms
on a context that keeps its adapter, and 8 sequences of one adapter decoded together 166 tokens/s against 68
for one (bench/llamacpp_speed.py compares the engines).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from tuning.answering.llamacpp_context import Context, Model
from tuning.answering.requests import (ALTERNATIVE_STEPS, ALTERNATIVES, MIN_TEMPERATURE, AdapterLoadError,
                                       ContextLengthExceeded, Detokenizer, Generation, InferenceError,
                                       SubmittingEngine)
from tuning.errors import ModelLoadError, TuningError

log = logging.getLogger(__name__)
MAX_CONTEXT = 4096  # KV cells of each context (the model's own window when that is smaller)
MIN_PREFIX_COPY = 16  # tokens of prompt prefix worth copying from another context rather than evaluating


def base_gguf(spec: str) -> Path:
    """The GGUF file a base model spec names: bundled models and .gguf files are GGUF already."""
    from tuning.models import bundled_gguf, resolve

    if spec.startswith("bundled:"):
        return bundled_gguf(spec)
    folder, filename = resolve(spec)
    if filename is None:
        raise ModelLoadError(f"the llamacpp backend answers from a GGUF base model (bundled:… or a .gguf file); "
                             f"{spec} is a transformers model: use TUNEBOT_INFERENCE_BACKEND=local for it, or "
                             f"convert it with llama.cpp's convert_hf_to_gguf.py and name the .gguf file")
    return Path(folder) / filename


@dataclass(eq=False)
class _Row:
    """A request decoding in a context: its sequence there and the token it feeds next."""

    generation: Generation
    detok: Detokenizer
    context: Context
    seq: int
    last: int = 0
    rng: object = None  # numpy Generator, made on the first sampled token


class LlamaCppEngine(SubmittingEngine):
    """The Engine interface (submit, stream, answer, load, close) over llama.cpp."""

    def __init__(self, base_model: str, *, cache_dir: str | Path | None = None, adapter_cache_size: int = 8,
                 max_new_tokens: int = 256, temperature: float = 0.0, n_threads: int = 0,
                 n_ctx: int = MAX_CONTEXT, tokenizer_model: str | None = None, max_slots: int = 8,
                 max_batch_size: int = 1):
        if adapter_cache_size < 1:
            raise InferenceError("adapter_cache_size must be at least 1")
        if max_slots < 1 or max_batch_size < 1:
            raise InferenceError("max_slots and max_batch_size must be at least 1")
        self.base_model = base_model
        self.tokenizer_model = tokenizer_model or base_model  # whose tokenizer and chat template (an exported
        # GGUF is checked with its base model's, the ones it was trained with)
        self.cache_dir = cache_dir
        self.adapter_cache_size = adapter_cache_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.n_threads = n_threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        self.max_slots = max_slots  # contexts (each with its adapter and KV cache) decoding in turns
        # Requests decoding together in one context. 1 by default: llama.cpp's numerics depend on the batch
        # (measured: 2 of 6 greedy answers changed when decoded beside others), and an answer must not depend
        # on who else is asking; more than 1 trades that for throughput (166 against 68 tokens/s for 8).
        self.max_batch_size = max_batch_size
        self.model: Model | None = None
        self.tokenizer = None
        self.stop_ids: set[int] = set()
        self.context_length = 0
        self.top_k = 0
        self._contexts: list[Context] = []  # least recently used first
        self._rows: dict[Context, list[_Row]] = {}
        self._adapters: OrderedDict[str, object] = OrderedDict()  # resolved folder -> llama_adapter_lora_p
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.cancellations = 0
        self.prefix_copies = 0  # prompt prefixes a context took from another one on the same adapter
        self.largest_batch = 0
        self.last_switch_ms = 0.0
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._submitted: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._submitted_lock = threading.Lock()

    # ---------------------------------------------------------------- setup
    def load(self) -> None:
        """Load the GGUF model and the transformers tokenizer (once)."""
        with self._load_lock:
            if self.model is not None:
                return
            from transformers import GenerationConfig

            from tuning.models import load_tokenizer, materialize

            path = base_gguf(self.base_model)
            tok = load_tokenizer(self.tokenizer_model, cache_dir=self.cache_dir)
            try:
                config = GenerationConfig.from_pretrained(materialize(self.tokenizer_model, self.cache_dir))
            except Exception:  # noqa: BLE001 - a model without generation_config.json
                config = GenerationConfig()
            configured = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
            self.stop_ids = {i for i in (*configured, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
                             if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}
            self.top_k = int(config.top_k or 0)
            model = Model(path, n_threads=self.n_threads)
            self.context_length = min(self.n_ctx, model.n_ctx_train or self.n_ctx)
            self._contexts = [model.context(n_ctx=self.context_length, n_seq=self.max_batch_size)]
            self._rows = {self._contexts[0]: []}
            self.tokenizer = tok
            self.model = model

    def close(self) -> None:
        """Stop the decoding thread after the queued requests and free the model and its adapters."""
        with self._load_lock:
            if self._thread is not None:
                self._requests.put(None)
                self._thread.join()
                self._thread = None
            if self.model is not None:
                for context in self._contexts:  # nothing may point at an adapter being freed
                    context.close()
                for adapter in self._adapters.values():
                    self.model.free_adapter(adapter)
                self._contexts, self._rows = [], {}
                self._adapters.clear()
                self.model.close()
                self.model = None

    # ------------------------------------------------------------- requests
    def submit(self, messages: list[dict], *, adapter_dir: str | Path | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None) -> Generation:
        """Queue a request; iterate the returned Generation for text pieces (as with the torch Engine)."""
        from tuning.prompts import encode_prompt

        self.load()
        try:
            with self._encode_lock:
                ids = encode_prompt(self.tokenizer, messages)[0].tolist()
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template that refuses the roles' order
            raise InferenceError(f"cannot build the prompt: {exc}") from exc
        n = len(ids)
        if n >= self.context_length:
            raise ContextLengthExceeded(n, self.context_length)
        limit = min(max_new_tokens or self.max_new_tokens, 4096, self.context_length - n)
        generation = Generation(messages, adapter_dir=str(Path(adapter_dir).resolve()) if adapter_dir else None,
                                max_new_tokens=limit, input_ids=ids,
                                temperature=self.temperature if temperature is None else temperature)
        generation.prompt_tokens = n
        with self._submitted_lock:
            self._submitted.add(generation)
        with self._load_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tunebot-llamacpp", daemon=True)
                self._thread.start()
            self._requests.put(generation)
        return generation

    # ------------------------------------------------------ decoding thread
    def _serve(self) -> None:
        """Admit (and prefill) waiting requests, then one decoding step of the next busy context; again."""
        pending: deque[Generation] = deque()
        closing, turn = False, 0
        while True:
            busy = [c for c in self._contexts if self._rows[c]]
            closing = self._take_requests(pending, block=not busy and not pending and not closing) or closing
            self._admit(pending)
            busy = [c for c in self._contexts if self._rows[c]]
            if not busy:
                if closing and not pending:
                    return
                continue
            turn %= len(busy)
            context = busy[turn]
            try:
                self._step(context)
            except Exception as exc:  # noqa: BLE001 - its requests get the error; the thread serves the others
                log.exception("llama.cpp decoding failed")
                self._fail(context, exc)
            if self._rows[context]:
                turn += 1

    def _admit(self, pending: deque) -> None:
        """Start every waiting request that a context has room for, in arrival order; the others wait."""
        for generation in list(pending):
            if generation.cancelled.is_set():
                pending.remove(generation)
                self.cancellations += 1
                generation._finish()
                continue
            try:
                place = self._place(generation)
            except TuningError as exc:  # e.g. an adapter llama.cpp cannot load: this request only
                pending.remove(generation)
                log.warning("request failed: %s", exc)
                generation._finish(exc)
                continue
            if place is None:
                continue
            pending.remove(generation)
            context, seq = place
            row = _Row(generation, Detokenizer(self.tokenizer), context, seq)
            try:
                context.prefill(seq, list(generation.input_ids))
                if not self._accept(row, self._choose(context.logits(-1), row)):
                    self._rows[context].append(row)
                    self.largest_batch = max(self.largest_batch, len(self._rows[context]))
            except Exception as exc:  # noqa: BLE001 - this request fails; the thread keeps serving
                log.exception("llama.cpp prefill failed")
                generation._finish(exc if isinstance(exc, InferenceError) else InferenceError(str(exc)))

    def _place(self, generation: Generation) -> tuple[Context, int] | None:
        """A context and sequence for the request: one on its adapter with room, else an empty or new context,
        else an idle one (which takes the adapter); None: it waits (also while its adapter already decodes in
        all contexts but one)."""
        key = generation.adapter_dir
        need = len(generation.input_ids) + generation.max_new_tokens
        tokens = generation.input_ids

        def fit(c: Context):  # join running batches first, then reuse the longest cached prefix
            return len(self._rows[c]), max(c.common_prefix(s, tokens) for s in range(len(c.cached)))

        # One context stays for the other adapters: a burst on one never locks them out.
        capped = sum(1 for c in self._contexts if c.adapter == key and self._rows[c]) >= max(1, self.max_slots - 1)
        for context in sorted((c for c in self._contexts if c.adapter == key), key=fit, reverse=True):
            if len(self._rows[context]) < self.max_batch_size and (self._rows[context] or not capped):
                seq = self._sequence(context, tokens, need)
                if seq is not None:
                    return self._touch(context), seq
        if capped:
            return None
        # An empty context, else a new one while fewer than max_slots exist, else the least recently used idle
        # one: another adapter's warm cache is taken last (taking it first, 8 adapters on 7 contexts evicted
        # each other in turn and every request started cold).
        idle = [c for c in self._contexts if not self._rows[c]]
        empty = [c for c in idle if not c.used]
        if empty:
            context = empty[0]
        elif len(self._contexts) < self.max_slots:
            context = self.model.context(n_ctx=self.context_length, n_seq=self.max_batch_size)
            self._contexts.insert(0, context)
            self._rows[context] = []
        elif idle:
            context = idle[0]
        else:
            return None
        if context.adapter != key:
            self._switch(context, key)
        seq = self._sequence(context, tokens, need)
        if seq is None:  # the idle context's cache is in the way: start it afresh
            context.clear()
            seq = 0
        self._borrow_prefix(context, seq, tokens)
        return self._touch(context), seq

    def _borrow_prefix(self, context: Context, seq: int, tokens) -> None:
        """A context that takes a request with little of its prompt cached copies the longest prefix that
        another context on the same adapter holds (a 40-token prompt: 70 instead of 140 ms to its first token)."""
        if len(context.cached) != 1:  # with batching, the copy could need cells the other sequences hold
            return
        have = context.common_prefix(seq, tokens)
        source, source_seq, shared = max(
            ((c, s, c.common_prefix(s, tokens)) for c in self._contexts if c is not context
             and c.adapter == context.adapter for s in range(len(c.cached))), key=lambda t: t[2], default=(None, 0, 0))
        if source is not None and shared >= have + MIN_PREFIX_COPY:
            if context.adopt(seq, source, source_seq, min(shared, len(tokens) - 1)):
                self.prefix_copies += 1

    def _sequence(self, context: Context, tokens, need: int) -> int | None:
        """The free sequence whose cache shares the longest prefix with the prompt, other free sequences'
        caches dropped while the cells left are fewer than `need`; None when the running ones leave no room."""
        busy = {row.seq for row in self._rows[context]}
        free = [s for s in range(len(context.cached)) if s not in busy]
        if not free:
            return None
        seq = max(free, key=lambda s: context.common_prefix(s, tokens))
        reserved = sum(row.generation.max_new_tokens - row.generation.n_tokens for row in self._rows[context])

        def room() -> int:  # cells for this request once its sequence is cut to the shared prefix
            return context.n_ctx - context.used - reserved + len(context.cached[seq])

        for other in [s for s in free if s != seq and context.cached[s]]:
            if room() >= need:
                break
            context.truncate(other, 0)
        return seq if room() >= need else None

    def _touch(self, context: Context) -> Context:
        self._contexts.remove(context)
        self._contexts.append(context)
        if context.adapter is not None:
            self._adapters.move_to_end(context.adapter)
        return context

    def _step(self, context: Context) -> None:
        """One token for every request decoding in the context, in one llama_decode; finished ones leave."""
        rows = self._rows[context]
        for row in [r for r in rows if r.generation.cancelled.is_set()]:
            rows.remove(row)
            self._finish(row)
        if not rows:
            return
        context.step([(row.seq, row.last) for row in rows])
        done = [row for i, row in enumerate(rows) if self._accept(row, self._choose(context.logits(i), row))]
        self._rows[context] = [row for row in rows if row not in done]

    def _fail(self, context: Context, exc: BaseException) -> None:
        error = exc if isinstance(exc, InferenceError) else InferenceError(f"generation failed: {exc}")
        for row in self._rows[context]:
            if row.generation.finished_at is None:
                row.generation._finish(error)
        self._rows[context] = []
        context.clear()

    def _choose(self, logits, row: _Row) -> int:
        """The next token (greedy, or sampled with the request's temperature and the model's top_k), its
        log-probability and, for the first steps, the likeliest alternatives, kept on the generation."""
        import numpy as np

        generation = row.generation
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        token = int(logits.argmax())
        if generation.temperature >= MIN_TEMPERATURE:
            if row.rng is None:
                row.rng = np.random.default_rng()
            scores = logits / generation.temperature
            if 0 < self.top_k < scores.shape[0]:
                kth = np.partition(scores, -self.top_k)[-self.top_k]
                scores = np.where(scores < kth, -np.inf, scores)
            probs = np.exp(scores - scores.max())
            token = int(row.rng.choice(scores.shape[0], p=probs / probs.sum()))
        generation._chosen_logprob = float(logprobs[token])
        if len(generation.alternatives) < ALTERNATIVE_STEPS:
            top = np.argsort(-logprobs)[:ALTERNATIVES]
            generation._step_alternatives = tuple((self.tokenizer.decode([int(t)]), float(logprobs[t])) for t in top)
        return token

    # -------------------------------------------------------------- adapters
    def _switch(self, context: Context, key: str | None) -> None:
        """Set an adapter on an idle context (converting and loading it on first use)."""
        started = time.perf_counter()
        pointer = None if key is None else (self._adapters.get(key) or self._load_adapter(key))
        context.set_adapter(key, pointer)
        self.last_switch_ms = (time.perf_counter() - started) * 1000

    def adapter_gguf(self, adapter_dir: str) -> Path:
        """The adapter's GGUF (converted once, kept under the cache dir by folder and file time)."""
        from tuning.lora_gguf import GGUFConversionError, write_adapter_gguf

        weights = Path(adapter_dir) / "adapter_model.safetensors"
        try:
            stamp = f"{Path(adapter_dir).resolve()}:{weights.stat().st_mtime_ns}:{weights.stat().st_size}"
        except FileNotFoundError:
            raise AdapterLoadError("the model version's adapter files are missing") from None
        root = Path(self.cache_dir) if self.cache_dir else Path(adapter_dir)
        target = root / "llamacpp-adapters" / f"{hashlib.sha1(stamp.encode()).hexdigest()[:16]}.gguf"
        if not target.exists():
            try:
                write_adapter_gguf(adapter_dir, base_gguf(self.base_model), target)
            except GGUFConversionError as exc:
                raise AdapterLoadError(f"the adapter cannot be used by llama.cpp: {exc}") from exc
        return target

    def _load_adapter(self, adapter_dir: str):
        """Load an adapter, first freeing the least recently used ones that no busy context decodes with."""
        # A folder is a peft adapter (converted once); a .gguf file is a GGUF adapter already (an export's).
        path = Path(adapter_dir) if adapter_dir.endswith(".gguf") else self.adapter_gguf(adapter_dir)
        in_use = {c.adapter for c in self._contexts if self._rows[c]}
        for old in list(self._adapters):
            if len(self._adapters) < self.adapter_cache_size:
                break
            if old in in_use:
                continue
            for context in self._contexts:  # nothing may point at an adapter being freed
                if context.adapter == old:
                    context.set_adapter(None, None)
            self.model.free_adapter(self._adapters.pop(old))
            self.adapter_evictions += 1
            log.debug("adapter %s evicted", old)
        adapter = self.model.load_adapter(path)
        if adapter is None:
            raise AdapterLoadError("llama.cpp could not load the adapter (not made for this base model?)")
        self._adapters[adapter_dir] = adapter
        self.adapter_loads += 1
        return adapter
