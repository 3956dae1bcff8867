"""Answers: one base model, many LoRA adapters in an LRU, one inference thread, and the answer service."""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tuning.errors import ModelLoadError, TuningError

log = logging.getLogger(__name__)

MODES = ("auto", "tuned", "version", "base", "fewshot")
_END = object()


class InferenceError(TuningError):
    """An answer could not be produced (no trained version, unknown mode, backend down)."""


class NoActiveVersion(InferenceError):
    """The assistant has no active tuned version yet."""


@dataclass(frozen=True)
class AnswerResult:
    """A generated answer with its timings; `stopped` means it ended on end-of-turn, not the token limit."""

    text: str
    ttft_ms: float
    n_tokens: int
    tokens_per_s: float
    stopped: bool
    prompt_tokens: int = 0


def _generated_answer(result: AnswerResult):
    """The answer as tuning.generation's GeneratedAnswer, the type evaluation and the bot read."""
    from tuning.generation import GeneratedAnswer

    return GeneratedAnswer(text=result.text, ttft_ms=result.ttft_ms, n_tokens=result.n_tokens,
                           tokens_per_s=result.tokens_per_s, stopped=result.stopped)


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

    def __init__(self, messages: list[dict], *, adapter_dir: str | None, max_new_tokens: int, temperature: float):
        self.messages = messages
        self.adapter_dir = adapter_dir
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.text = ""
        self.n_tokens = 0
        self.prompt_tokens = 0
        self.stopped = False
        self._pieces: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        """Stop generating at the next token (e.g. the client went away)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
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
            stopped=self.stopped, prompt_tokens=self.prompt_tokens)

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


class _TokenStreamer:
    """A transformers streamer that emits text per generated token (holding back half UTF-8 characters)."""

    def __init__(self, tokenizer, generation: Generation, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.generation = generation
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if token in self.stop_ids:
                self.generation.stopped = True
                continue
            self.ids.append(token)
            self.generation.n_tokens += 1
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if len(text) > self.sent:
                self.generation._emit(text[self.sent:])
                self.sent = len(text)
            elif self.generation.first_token_at is None:
                self.generation.first_token_at = time.perf_counter()

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.generation._emit(text[self.sent:])
            self.sent = len(text)


class Engine:
    """The base model loaded once, LoRA adapters in an LRU on one PeftModel, requests served FIFO by one thread."""

    def __init__(self, base_model: str, *, cache_dir: str | Path | None = None, adapter_cache_size: int = 8,
                 max_new_tokens: int = 256, temperature: float = 0.0, device: str | None = None, dtype=None):
        if adapter_cache_size < 1:
            raise InferenceError("adapter_cache_size must be at least 1")
        self.base_model = base_model
        self.cache_dir = cache_dir
        self.adapter_cache_size = adapter_cache_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device
        self.dtype = dtype
        self.model = None  # the base model, later wrapped in place by the PeftModel
        self.tokenizer = None
        self._peft = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # resolved folder -> peft adapter name
        self._names = itertools.count()
        self._active: str | None = None
        self._lora_layers: list | None = None  # peft's LoRA layers, found once per set of loaded adapters
        self._aux = False  # some adapter has modules_to_save: switch with peft's own set_adapter
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.last_switch_ms = 0.0
        self._load_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- setup
    def load(self) -> None:
        """Load the base model and tokenizer (once; later calls return at once)."""
        with self._load_lock:
            if self.model is not None:
                return
            from tuning.models import load_base_model

            model, tokenizer = load_base_model(self.base_model, cache_dir=self.cache_dir, dtype=self.dtype,
                                               device=self.device)
            model.eval()
            self.tokenizer = tokenizer
            self.model = model

    def _ensure_thread(self) -> None:
        with self._load_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tunebot-inference", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the inference thread after the requests already queued (a later request starts it again)."""
        with self._load_lock:  # held until the old thread ends, so two threads never share the model
            if self._thread is not None:
                self._requests.put(None)
                self._thread.join()
                self._thread = None

    @property
    def resident_adapters(self) -> list[str]:
        """Adapter folders in memory, least recently used first."""
        return list(self._adapters)

    # ------------------------------------------------------------- requests
    def submit(self, messages: list[dict], *, adapter_dir: str | Path | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None) -> Generation:
        """Queue a request for chat messages; iterate the returned Generation for text pieces."""
        self.load()
        self._ensure_thread()
        generation = Generation(messages, adapter_dir=str(adapter_dir) if adapter_dir else None,
                                max_new_tokens=min(max_new_tokens or self.max_new_tokens, 4096),
                                temperature=self.temperature if temperature is None else temperature)
        self._requests.put(generation)
        return generation

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

    # ----------------------------------------------------- inference thread
    def _serve(self) -> None:
        while True:
            generation = self._requests.get()
            if generation is None:
                return
            if generation.cancelled.is_set():
                generation._finish()
                continue
            try:
                self._generate(generation)
                generation._finish()
            except TuningError as exc:  # reported to the waiting caller, the thread keeps serving
                log.warning("request failed: %s", exc)
                generation._finish(exc)
            except Exception as exc:
                log.exception("generation failed")
                generation._finish(InferenceError(f"generation failed: {exc}"))

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
                raise ModelLoadError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
            name = f"adapter{next(self._names)}"
            try:
                if self._peft is None:
                    from peft import PeftModel

                    # low_cpu_mem_usage: the weights are created empty and filled from the file, not initialised.
                    self._peft = PeftModel.from_pretrained(self.model, key, adapter_name=name, low_cpu_mem_usage=True)
                    self._peft.eval()
                else:
                    self._peft.load_adapter(key, adapter_name=name, low_cpu_mem_usage=True)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise ModelLoadError(f"cannot load the adapter in {adapter_dir}: {exc}") from exc
            config = self._peft.peft_config[name]
            self._aux = self._aux or bool(getattr(config, "modules_to_save", None) or
                                          getattr(config, "trainable_token_indices", None))
            self._lora_layers = None
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

    def _switch(self, name: str) -> None:
        """Activate a resident adapter by pointing each LoRA layer at it.

        peft's set_adapter also walks every module and toggles requires_grad on every resident adapter, which
        grows with the number of adapters (~250 ms with 20 on this CPU); inference needs only the pointer.
        """
        if self._aux:  # modules_to_save / trainable tokens have their own switching: use peft's full walk
            self._peft.set_adapter(name)
        else:
            if self._lora_layers is None:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._lora_layers = [m for m in self._peft.modules() if isinstance(m, BaseTunerLayer)]
            for layer in self._lora_layers:
                layer._active_adapter = [name]
            self._peft.base_model.active_adapter = name
        self._active = name

    def _generate(self, generation: Generation) -> None:
        import contextlib

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from tuning.generation import encode_prompt

        tok = self.tokenizer
        input_ids = encode_prompt(tok, generation.messages).to(self.model.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        generation.prompt_tokens = int(input_ids.shape[1])
        configured = self.model.generation_config.eos_token_id
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        stop_ids = {i for i in (*configured, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
                    if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), generation.cancelled.is_set(), dtype=torch.bool)

        if generation.adapter_dir:
            self._use_adapter(generation.adapter_dir)
            model, context = self._peft, contextlib.nullcontext()
        elif self._peft is not None:
            model, context = self._peft, self._peft.disable_adapter()
        else:
            model, context = self.model, contextlib.nullcontext()
        sample = generation.temperature > 0
        kwargs = {"do_sample": sample, "temperature": generation.temperature} if sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with context, torch.inference_mode():
            model.generate(**inputs, max_new_tokens=generation.max_new_tokens, eos_token_id=sorted(stop_ids),
                           pad_token_id=tok.pad_token_id, streamer=_TokenStreamer(tok, generation, stop_ids),
                           stopping_criteria=StoppingCriteriaList([Cancelled()]), **kwargs)


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


# ------------------------------------------------------------------ service

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def select_fewshot(question: str, examples: Sequence[tuple[str, str]], *, k: int = 4) -> list[tuple[str, str]]:
    """Up to k (question, answer) pairs most similar to the question by word overlap (Jaccard), best last."""
    asked = _words(question)
    scored = []
    for index, (q, a) in enumerate(examples):
        words = _words(q)
        union = asked | words
        scored.append((len(asked & words) / len(union) if union else 0.0, -index, (q, a)))
    scored.sort(reverse=True)
    chosen, seen = [], set()
    for _, _, pair in scored:
        if pair[1] in seen:  # variations share their answer: one of them is enough
            continue
        seen.add(pair[1])
        chosen.append(pair)
        if len(chosen) == k:
            break
    return chosen[::-1]  # the most similar example sits next to the question


@dataclass(frozen=True)
class AnswerPlan:
    """How to answer: the resolved mode, the adapter (if any) and the prompt context."""

    assistant_id: int
    mode: str
    version_id: int | None = None
    adapter_dir: str | None = None
    adapter_name: str | None = None
    system_prompt: str = ""
    fewshot: tuple[tuple[str, str], ...] = ()

    def engine_kwargs(self) -> dict:
        return {"adapter_dir": self.adapter_dir, "adapter_name": self.adapter_name,
                "system_prompt": self.system_prompt, "fewshot": self.fewshot}


@dataclass(frozen=True)
class Answer:
    """An answer shown to a user, with the ids of the stored messages (for feedback)."""

    text: str
    mode: str
    version_id: int | None
    ttft_ms: float
    latency_ms: float
    n_tokens: int
    tokens_per_s: float
    conversation_id: int | None = None
    message_id: int | None = None


def plan_answer(store, assistant_id: int, question: str, *, mode: str = "auto", version_id: int | None = None,
                fewshot_k: int = 4) -> AnswerPlan:
    """Resolve a mode (auto: the active version, else few-shot) into an adapter and prompt context."""
    if mode not in MODES:
        raise InferenceError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    assistant = store.get_assistant(assistant_id)
    if mode == "auto":
        mode = "tuned" if assistant.active_version_id else "fewshot"
    if mode in ("tuned", "version"):
        if mode == "tuned":
            if not assistant.active_version_id:
                raise NoActiveVersion(f"assistant {assistant.name!r} has no trained version yet: "
                                      "train it first, or ask in base or few-shot mode")
            version_id = assistant.active_version_id
        elif version_id is None:
            raise InferenceError("mode 'version' needs a version id")
        version = store.get_model_version(version_id)
        if version.assistant_id != assistant_id:
            raise InferenceError(f"model version #{version_id} belongs to another assistant")
        return AnswerPlan(assistant_id=assistant_id, mode=mode, version_id=version.id,
                          adapter_dir=version.adapter_path, adapter_name=f"{assistant.name}-v{version.id}",
                          system_prompt=assistant.system_prompt)
    fewshot: tuple = ()
    if mode == "fewshot":
        pairs = [(e.question, e.answer) for e in store.list_examples(assistant_id, status="approved", split="train")]
        fewshot = tuple(select_fewshot(question, pairs, k=fewshot_k))
    return AnswerPlan(assistant_id=assistant_id, mode=mode, system_prompt=assistant.system_prompt, fewshot=fewshot)


def record_answer(store, plan: AnswerPlan, question: str, answer: str, *, user_id: int | None = None,
                  conversation_id: int | None = None, latency_ms: float | None = None) -> tuple[int, int]:
    """Store the question and the answer; returns (conversation id, answer message id)."""
    if conversation_id is None:
        conversation_id = store.start_conversation(plan.assistant_id, user_id, mode=plan.mode)
    store.add_message(conversation_id, "user", question, mode=plan.mode)
    message_id = store.add_message(conversation_id, "assistant", answer, model_version_id=plan.version_id,
                                   mode=plan.mode, latency_ms=latency_ms)
    return conversation_id, message_id


def answer_question(store, engine, assistant_id: int, question: str, *, mode: str = "auto",
                    version_id: int | None = None, user_id: int | None = None, conversation_id: int | None = None,
                    on_piece=None, record: bool = True) -> Answer:
    """Answer one question in a mode, calling on_piece(text) per streamed piece, and record the exchange."""
    plan = plan_answer(store, assistant_id, question, mode=mode, version_id=version_id)
    start = time.perf_counter()
    first, pieces = None, []
    for piece in engine.stream(question, **plan.engine_kwargs()):
        first = first or time.perf_counter()
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
    end = time.perf_counter()
    text = "".join(pieces).strip()
    latency_ms = (end - start) * 1000
    ids: tuple = (None, None)
    if record:
        ids = record_answer(store, plan, question, text, user_id=user_id, conversation_id=conversation_id,
                            latency_ms=latency_ms)
    n = len(pieces)
    return Answer(text=text, mode=plan.mode, version_id=plan.version_id,
                  ttft_ms=((first or end) - start) * 1000, latency_ms=latency_ms, n_tokens=n,
                  tokens_per_s=(n - 1) / max(end - (first or end), 1e-9) if n > 1 else 0.0,
                  conversation_id=ids[0], message_id=ids[1])


def compare_answers(store, engine, assistant_id: int, question: str, *, modes: Sequence[str] = ("base", "fewshot", "tuned"),
                    user_id: int | None = None, on_piece=None, record: bool = True) -> list[Answer]:
    """One question answered in several modes (tuned is skipped while there is no trained version)."""
    assistant = store.get_assistant(assistant_id)
    answers = []
    for mode in modes:
        if mode == "tuned" and not assistant.active_version_id:
            continue
        callback = (lambda piece, _mode=mode: on_piece(_mode, piece)) if on_piece else None
        answers.append(answer_question(store, engine, assistant_id, question, mode=mode, user_id=user_id,
                                       on_piece=callback, record=record))
    return answers
