"""The `llamacpp` answer backend: the base model's GGUF in llama.cpp (llama-cpp-python), each version's LoRA
converted once to a GGUF adapter and switched per request, with the same chat template, stop tokens and
Generation records (text pieces, token log-probabilities, early alternatives) as the torch Engine.

Prompts are encoded with the model's transformers tokenizer and chat template, exactly as in training and in
the torch engine; llama.cpp gets token ids. One llama.cpp context decodes one request at a time on its own
thread, reusing the KV cache of the previous prompt's common prefix (the system prompt) while the adapter stays
the same. Measured against decoding up to 8 requests together in 8 sequences of one KV cache
(bench/llamacpp_speed.py, this machine): that version was slower for one client (40 against 56 tokens/s, first
token 174 against 17 ms, no prefix reuse) and barely faster for 8 (58 against 53 tokens/s), so it was not kept;
interleaving adapters per step was worse still (llama.cpp re-plans its graph after every change of adapters).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

from tuning.answering.requests import (ALTERNATIVE_STEPS, ALTERNATIVES, MIN_TEMPERATURE, AdapterLoadError,
                                       ContextLengthExceeded, Detokenizer, Generation, InferenceError,
                                       SubmittingEngine)
from tuning.errors import ModelLoadError

log = logging.getLogger(__name__)
MAX_CONTEXT = 4096  # the KV cache llama.cpp allocates (the model's own window when that is smaller)


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
        self._cached: list[int] = []  # tokens whose KV the context holds, under the active adapter
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
            llm = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=512,
                        logits_all=False, verbose=False)
            self.context_length = min(int(llm.n_ctx()), int(llm._model.n_ctx_train() or llm.n_ctx()))
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

                llama_cpp.llama_set_adapters_lora(self.model.ctx, None, 0, None)
                for adapter in self._adapters.values():
                    llama_cpp.llama_adapter_lora_free(adapter)
                self._adapters.clear()
                self.model.close()
                self.model = None
                self._active, self._cached = None, []

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
        while True:
            generation = self._requests.get()
            if generation is None:
                return
            if generation.cancelled.is_set():
                self.cancellations += 1
                generation._finish()
                continue
            try:
                self._switch(generation.adapter_dir)
                self._decode(generation)
            except Exception as exc:  # noqa: BLE001 - the request gets the error; the thread serves the next
                self._cached = []
                generation._finish(exc if isinstance(exc, InferenceError) else InferenceError(str(exc)))

    def _logits(self):
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self.model.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab(),)).astype(np.float64)

    def _eval(self, tokens: list[int]) -> None:
        """Feed tokens after the cached prefix they share (at least one is evaluated, for fresh logits)."""
        llm = self.model
        common = 0
        for a, b in zip(self._cached, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)
        llm.n_tokens = common
        self._cached = self._cached[:common]
        llm.eval(tokens[common:])
        self._cached += tokens[common:]

    def _decode(self, generation: Generation) -> None:
        import numpy as np

        rng = np.random.default_rng()
        detok = Detokenizer(self.tokenizer)
        self._eval(list(generation.input_ids))
        while True:
            logits = self._logits()
            shifted = logits - logits.max()
            logprobs = shifted - np.log(np.exp(shifted).sum())
            token = int(logits.argmax())
            if generation.temperature >= MIN_TEMPERATURE:
                scores = logits / generation.temperature
                if 0 < self.top_k < scores.shape[0]:
                    kth = np.partition(scores, -self.top_k)[-self.top_k]
                    scores = np.where(scores < kth, -np.inf, scores)
                probs = np.exp(scores - scores.max())
                token = int(rng.choice(scores.shape[0], p=probs / probs.sum()))
            if token in self.stop_ids:
                generation.stopped = True
                break
            if len(generation.alternatives) < ALTERNATIVE_STEPS:
                top = np.argsort(-logprobs)[:ALTERNATIVES]
                generation.alternatives.append(tuple((self.tokenizer.decode([int(t)]), float(logprobs[t])) for t in top))
            generation.n_tokens += 1
            generation.token_ids.append(token)
            generation.token_logprobs.append(float(logprobs[token]))
            piece = detok.push(token)
            if piece:
                generation._emit(piece)
            elif generation.first_token_at is None:
                generation.first_token_at = time.perf_counter()
            if generation.n_tokens >= generation.max_new_tokens or generation.cancelled.is_set():
                break
            self.model.eval([token])
            self._cached.append(token)
        if generation.cancelled.is_set():
            self.cancellations += 1
        piece = detok.flush()
        if piece:
            generation._emit(piece)
        generation._finish()

    # -------------------------------------------------------------- adapters
    def _switch(self, adapter_dir: str | None) -> None:
        """Set the request's adapter on the context (converting and loading it on first use); the KV cache of
        another adapter's prompt is not reused."""
        if adapter_dir == self._active:
            if adapter_dir is not None:
                self._adapters.move_to_end(adapter_dir)
            return
        import llama_cpp

        started = time.perf_counter()
        if adapter_dir is None:
            code = llama_cpp.llama_set_adapters_lora(self.model.ctx, None, 0, None)
        else:
            adapter = self._adapters.get(adapter_dir) or self._load_adapter(adapter_dir)
            self._adapters.move_to_end(adapter_dir)
            code = llama_cpp.llama_set_adapters_lora(self.model.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter),
                                                      1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise AdapterLoadError(f"llama.cpp could not apply the adapter (code {code})")
        self._active, self._cached = adapter_dir, []
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
        import llama_cpp

        # A folder is a peft adapter (converted once); a .gguf file is a GGUF adapter already (an export's).
        path = Path(adapter_dir) if adapter_dir.endswith(".gguf") else self.adapter_gguf(adapter_dir)
        while len(self._adapters) >= self.adapter_cache_size:
            # Nothing on the context may point at an adapter being freed.
            llama_cpp.llama_set_adapters_lora(self.model.ctx, None, 0, None)
            self._active, self._cached = None, []
            old, pointer = self._adapters.popitem(last=False)
            llama_cpp.llama_adapter_lora_free(pointer)
            self.adapter_evictions += 1
            log.debug("adapter %s evicted", old)
        adapter = llama_cpp.llama_adapter_lora_init(self.model.model, str(path).encode())
        if not adapter:
            raise AdapterLoadError("llama.cpp could not load the adapter (not made for this base model?)")
        self._adapters[adapter_dir] = adapter
        self.adapter_loads += 1
        return adapter
