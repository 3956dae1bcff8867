"""The torch engine: one base model, many LoRA adapters in an LRU, one inference thread decoding queued
requests in batches per adapter, the batches taking decode steps in turn."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import weakref
from collections import OrderedDict, deque
from pathlib import Path

from tuning.answering.batch import Batch, Row, stackable_cache
from tuning.answering.lora import AdapterSlots
from tuning.answering.requests import (ALTERNATIVE_STEPS, ALTERNATIVES, MIN_TEMPERATURE, ContextLengthExceeded,
                                       Detokenizer, Generation, InferenceError, SubmittingEngine)
from tuning.errors import TuningError

log = logging.getLogger(__name__)


class Engine(AdapterSlots, SubmittingEngine):
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
        self._current: Batch | None = None  # the batch whose adapter the LoRA layers point at
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
            self._batchable = stackable_cache(model)
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
        from tuning.prompts import encode_prompt

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

    def _activate(self, batch: Batch) -> None:
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

    def _start_batch(self, generation: Generation) -> Batch | None:
        """A batch on the request's adapter with the request in it (None when it was cancelled or failed)."""
        if generation.cancelled.is_set():
            self.cancellations += 1
            generation._finish()
            return None
        batch = Batch(generation.adapter_dir)
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

    def _admit(self, batches: list[Batch], pending: deque) -> None:
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

    def _join(self, batch: Batch, generation: Generation) -> None:
        """Prefill the request alone (exactly as an unbatched generate would), then stack its cache onto the batch's."""
        import torch
        from transformers import DynamicCache

        row = Row(generation, Detokenizer(self.tokenizer))
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
            batch.stack(cache, n, self.model.device)
        except Exception as exc:
            if not isinstance(exc, TuningError):
                log.exception("generation failed")
                exc = InferenceError(f"generation failed: {exc}")
            generation._finish(exc)
            return
        batch.rows.append(row)
        self.largest_batch = max(self.largest_batch, len(batch.rows))

    def _step(self, batch: Batch) -> None:
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

    def _drop(self, batch: Batch, indices: list[int]) -> None:
        """Remove finished rows from the batch, and the cache columns that only they used."""
        if not indices:
            return
        for i in indices:
            row = batch.rows[i]
            if not row.generation.finished_at:
                self._finish(row)
        batch.keep([i for i in range(len(batch.rows)) if i not in set(indices)])

    def _choose(self, logits, rows: list[Row]) -> list[int]:
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
