"""The `llamacpp` answer backend: the base model's GGUF in llama.cpp (llama-cpp-python), each version's LoRA
converted once to a GGUF adapter and switched per request, with the same chat template, stop tokens and
Generation records (text pieces, token log-probabilities, early alternatives) as the torch Engine.

Prompts are encoded with the model's transformers tokenizer and chat template, exactly as in training and in
the torch engine; llama.cpp gets token ids. Like the torch engine, one thread decodes: the requests of one
adapter (or of the base model) together, up to MAX_BATCH, each in its own sequence of one shared KV cache, one
token per sequence per llama_decode call; a request for another adapter starts when that batch has drained.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from tuning.errors import ModelLoadError
from tuning.inference import (ALTERNATIVE_STEPS, ALTERNATIVES, MIN_TEMPERATURE, AdapterLoadError,
                              ContextLengthExceeded, Generation, InferenceError, SubmittingEngine, _Detokenizer)

log = logging.getLogger(__name__)
MAX_CONTEXT = 4096  # the longest prompt + answer of one request (the model's own window when that is smaller)
MAX_BATCH = 8  # requests decoded together, each in its own sequence of one KV cache
KV_CELLS = 8192  # the KV cache the sequences share (a request waits while the active ones have reserved it)
N_BATCH = 512  # prompt tokens per llama_decode call


@dataclass
class _Row:
    """A request being decoded: its sequence in the KV cache, the next position, the cells it reserved."""

    generation: Generation
    seq: int
    reserved: int
    detok: object
    pos: int = 0
    last: int = 0


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


class LlamaCppEngine(SubmittingEngine):
    """The Engine interface (submit, stream, answer, load, close) over llama.cpp."""

    def __init__(self, base_model: str, *, cache_dir: str | Path | None = None, adapter_cache_size: int = 8,
                 max_new_tokens: int = 256, temperature: float = 0.0, n_threads: int = 0,
                 n_ctx: int = MAX_CONTEXT, tokenizer_model: str | None = None):
        if adapter_cache_size < 1:
            raise InferenceError("adapter_cache_size must be at least 1")
        self.base_model = base_model
        self.tokenizer_model = tokenizer_model or base_model  # whose tokenizer and chat template (an exported
        # GGUF is checked with its base model's, the ones it was trained with)
        self.cache_dir = cache_dir
        self.adapter_cache_size = adapter_cache_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.n_threads = n_threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        self.model = None  # the llama_cpp.Llama once loaded
        self.tokenizer = None
        self.stop_ids: set[int] = set()
        self.context_length = 0
        self.top_k = 0
        self._adapters: OrderedDict[str, object] = OrderedDict()  # resolved folder -> llama_adapter_lora_p
        self._active: str | None = None  # the adapter set on the context (None: the base model)
        self._ctx = None  # our llama_context: MAX_BATCH sequences over one KV cache
        self._batch = None  # a reusable llama_batch
        self._n_cells = KV_CELLS
        self._n_vocab = 0
        self._rng = None
        self.largest_batch = 0
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.cancellations = 0
        self.last_switch_ms = 0.0
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._submitted: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._submitted_lock = threading.Lock()
        self._ids = itertools.count()

    # ---------------------------------------------------------------- setup
    def load(self) -> None:
        """Load the GGUF model and the transformers tokenizer (once)."""
        with self._load_lock:
            if self.model is not None:
                return
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise ModelLoadError("the llamacpp backend needs llama-cpp-python: run `make setup` (or pip "
                                     "install llama-cpp-python)") from exc
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
            import llama_cpp
            import numpy as np

            # The Llama object loads the model (its own one-sequence context stays unused and small); decoding
            # runs on a context of our own with MAX_BATCH sequences.
            llm = Llama(model_path=str(path), n_ctx=64, n_threads=self.n_threads, n_batch=64, logits_all=False,
                        verbose=False)
            trained = int(llm._model.n_ctx_train() or self.n_ctx)
            self.context_length = min(self.n_ctx, trained)
            params = llama_cpp.llama_context_default_params()
            for name in ("flash_attn_type", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow"):
                setattr(params, name, getattr(llm.context_params, name))  # as llama-cpp-python sets them (the
                # defaults, flash attention "auto" among them, made a decode step 3-100× slower here)
            params.n_ctx = self._n_cells = max(KV_CELLS, self.context_length)
            params.n_batch = params.n_ubatch = N_BATCH
            params.n_seq_max = MAX_BATCH
            params.kv_unified = True
            params.n_threads = params.n_threads_batch = self.n_threads
            params.no_perf = True
            ctx = llama_cpp.llama_init_from_model(llm.model, params)
            if not ctx:
                llm.close()
                raise ModelLoadError(f"llama.cpp could not make a context for {path.name}")
            self._ctx = ctx
            self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
            self._n_vocab = llm.n_vocab()
            self._rng = np.random.default_rng()
            self.tokenizer = tok
            self.model = llm

    def close(self) -> None:
        """Stop the decoding thread after the queued requests and free the model and its adapters."""
        with self._load_lock:
            if self._thread is not None:
                self._requests.put(None)
                self._thread.join()
                self._thread = None
            if self.model is not None:
                import llama_cpp

                llama_cpp.llama_batch_free(self._batch)
                llama_cpp.llama_free(self._ctx)
                self._ctx = self._batch = None
                for adapter in self._adapters.values():
                    llama_cpp.llama_adapter_lora_free(adapter)
                self._adapters.clear()
                self.model.close()
                self.model = None
                self._active = None

    # ------------------------------------------------------------- requests
    def submit(self, messages: list[dict], *, adapter_dir: str | Path | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None) -> Generation:
        """Queue a request; iterate the returned Generation for text pieces (as with the torch Engine)."""
        from tuning.generation import encode_prompt

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
        """Take queued requests; those of the active adapter (or the base model) decode together, one token per
        sequence per llama_decode call, each in its own sequence of the shared KV cache; the next adapter's
        requests start when the batch has drained. (Switching adapters between steps, as the torch engine does,
        is not done here: llama.cpp re-plans its compute graph after a change of adapters, which made every
        interleaved step seconds long in bench/llamacpp_speed.py.)"""
        pending: deque[Generation] = deque()
        rows: list[_Row] = []
        stopping = False
        while True:
            if not rows and not pending and not stopping:
                item = self._requests.get()
                stopping = item is None
                if item is not None:
                    pending.append(item)
            while True:  # whatever else has arrived
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                stopping = stopping or item is None
                if item is not None:
                    pending.append(item)
            if not rows and not pending:
                if stopping:
                    return
                continue
            if not rows:
                try:
                    self._switch(pending[0].adapter_dir)
                except Exception as exc:  # noqa: BLE001 - that request gets the error; others go on
                    pending.popleft()._finish(exc if isinstance(exc, InferenceError) else InferenceError(str(exc)))
                    continue
            self._admit(rows, pending)
            if rows:
                self._step(rows)

    def _admit(self, rows: list["_Row"], pending: deque) -> None:
        """Start the waiting requests of the active adapter while sequences and KV cells are free."""
        for generation in [g for g in pending if g.adapter_dir == self._active]:
            if len(rows) >= MAX_BATCH:
                return
            need = generation.prompt_tokens + generation.max_new_tokens
            if rows and sum(r.reserved for r in rows) + need > self._n_cells:
                return  # it waits for a sequence to finish
            pending.remove(generation)
            if generation.cancelled.is_set():
                self.cancellations += 1
                generation._finish()
                continue
            seq = min(set(range(MAX_BATCH)) - {r.seq for r in rows})
            row = _Row(generation, seq, need, _Detokenizer(self.tokenizer))
            try:
                self._prefill(row)
            except Exception as exc:  # noqa: BLE001
                self._free(row)
                generation._finish(exc if isinstance(exc, InferenceError) else InferenceError(str(exc)))
                continue
            if not self._accept(row, self._choose(self._logits(-1), generation)):
                rows.append(row)
            self.largest_batch = max(self.largest_batch, len(rows))

    def _prefill(self, row: "_Row") -> None:
        """The prompt into the row's sequence, in chunks; logits of its last token only."""
        import llama_cpp

        ids = list(row.generation.input_ids)
        for start in range(0, len(ids), N_BATCH):
            chunk = ids[start:start + N_BATCH]
            self._fill([(t, start + i, row.seq, start + i == len(ids) - 1) for i, t in enumerate(chunk)])
            if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
                raise InferenceError("llama.cpp could not take the prompt (its context is full)")
        row.pos = len(ids)

    def _step(self, rows: list["_Row"]) -> None:
        """One token for every row in one llama_decode call; finished rows leave the batch."""
        import llama_cpp

        self._fill([(row.last, row.pos, row.seq, True) for row in rows])
        if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
            for row in rows:
                self._free(row)
                row.generation._finish(InferenceError("llama.cpp ran out of context for this batch"))
            rows.clear()
            return
        done = []
        for i, row in enumerate(rows):
            row.pos += 1
            if self._accept(row, self._choose(self._logits(i), row.generation)):
                done.append(row)
        for row in done:
            rows.remove(row)

    def _fill(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) into the reusable llama_batch."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

    def _logits(self, i: int):
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _choose(self, logits, generation: Generation) -> int:
        """The next token (greedy, or sampled with the request's temperature), with its log-probability and,
        early on, the likeliest alternatives (a grounded answer's citation is read from them)."""
        import numpy as np

        top = float(logits.max())
        logprobs = logits - (top + float(np.log(np.exp(logits - top).sum())))
        token = int(logits.argmax())
        if generation.temperature >= MIN_TEMPERATURE:
            scores = logits.astype(np.float64) / generation.temperature
            if 0 < self.top_k < scores.shape[0]:
                kth = np.partition(scores, -self.top_k)[-self.top_k]
                scores = np.where(scores < kth, -np.inf, scores)
            probs = np.exp(scores - scores.max())
            token = int(self._rng.choice(scores.shape[0], p=probs / probs.sum()))
        generation._chosen_logprob = float(logprobs[token])
        if len(generation.alternatives) < ALTERNATIVE_STEPS:
            best = np.argpartition(-logprobs, ALTERNATIVES)[:ALTERNATIVES]
            best = best[np.argsort(-logprobs[best])]
            generation._step_alternatives = tuple((self.tokenizer.decode([int(t)]), float(logprobs[t])) for t in best)
        return token

    def _accept(self, row: "_Row", token: int) -> bool:
        """Stream a chosen token; True when the row is finished (end of turn, token limit, cancelled)."""
        generation = row.generation
        if token in self.stop_ids:
            generation.stopped = True
            return self._end(row)
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
            return self._end(row)
        return False

    def _end(self, row: "_Row") -> bool:
        if row.generation.cancelled.is_set():
            self.cancellations += 1
        piece = row.detok.flush()
        if piece:
            row.generation._emit(piece)
        self._free(row)
        row.generation._finish()
        return True

    def _free(self, row: "_Row") -> None:
        """Forget the row's sequence in the KV cache (its number is free again)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), row.seq, -1, -1)

    # -------------------------------------------------------------- adapters
    def _switch(self, adapter_dir: str | None, *, keep: set = frozenset()) -> None:
        """Set the adapter on the context (converting and loading it on first use, never evicting one in
        `keep`), between llama_decode calls: each sequence's KV cache stays its own adapter's."""
        if adapter_dir == self._active:
            if adapter_dir is not None:
                self._adapters.move_to_end(adapter_dir)
            return
        import llama_cpp

        started = time.perf_counter()
        if adapter_dir is None:
            code = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapter = self._adapters.get(adapter_dir) or self._load_adapter(adapter_dir, keep=keep)
            self._adapters.move_to_end(adapter_dir)
            code = llama_cpp.llama_set_adapters_lora(self._ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter),
                                                      1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise AdapterLoadError(f"llama.cpp could not apply the adapter (code {code})")
        self._active = adapter_dir
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

    def _load_adapter(self, adapter_dir: str, *, keep: set = frozenset()):
        import llama_cpp

        # A folder is a peft adapter (converted once); a .gguf file is a GGUF adapter already (an export's).
        path = Path(adapter_dir) if adapter_dir.endswith(".gguf") else self.adapter_gguf(adapter_dir)
        while len(self._adapters) >= self.adapter_cache_size:
            # Nothing on the context may point at an adapter being freed, nor a running request use it.
            old = next((a for a in self._adapters if a not in keep), None)
            if old is None:
                raise AdapterLoadError("too many adapters in use at once for TUNEBOT_ADAPTER_CACHE_SIZE")
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
            self._active = None
            llama_cpp.llama_adapter_lora_free(self._adapters.pop(old))
            self.adapter_evictions += 1
            log.debug("adapter %s evicted", old)
        adapter = llama_cpp.llama_adapter_lora_init(self.model.model, str(path).encode())
        if not adapter:
            raise AdapterLoadError("llama.cpp could not load the adapter (not made for this base model?)")
        self._adapters[adapter_dir] = adapter
        self.adapter_loads += 1
        return adapter
