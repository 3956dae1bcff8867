"""Variations from a larger model over any OpenAI-compatible endpoint: paraphrases, new pairs, pairs from documents."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from storage.errors import DuplicateExample
from tuning.data.dedup import DEFAULT_THRESHOLD, detect_language, filter_candidates, index_for_assistant
from tuning.errors import GenerationError

log = logging.getLogger(__name__)

METHODS = ("paraphrase", "new", "document")
STOP_POLL_S = 0.2  # how often generate() checks should_stop
LANGUAGE_NAMES = {"en": "English", "ru": "Russian"}


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


class BadOutput(Exception):
    """The model answered, but not with usable JSON (or with nothing)."""


class _Stop(Exception):
    """The whole run must stop (budget spent, endpoint unusable)."""


# ------------------------------------------------------------------ parsing
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_json_payload(text: str | None) -> Any:
    """The first JSON object or array in a model's answer, tolerating code fences and text around it."""
    if text is None or not text.strip():
        raise BadOutput("the model returned an empty answer")
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(body) if ch in "{["][:50]
    for i in starts:
        try:
            return decoder.raw_decode(body, i)[0]
        except json.JSONDecodeError:
            continue
    preview = " ".join(text.split())[:80]
    raise BadOutput(f"the model did not return JSON (it said: {preview!r})")


def _first_list(obj: Any, keys: tuple[str, ...]) -> list:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in keys:
            if isinstance(obj.get(key), list):
                return obj[key]
        for value in obj.values():
            if isinstance(value, list):
                return value
        if any(k in obj for k in ("question", "q")):
            return [obj]
    return []


def extract_questions(obj: Any) -> list[str]:
    """Question strings from {"questions": [...]}, a bare list, or a list of {"question": ...} objects."""
    out = []
    for item in _first_list(obj, ("questions", "paraphrases", "variations", "items")):
        if isinstance(item, dict):
            item = item.get("question") or item.get("text") or ""
        if isinstance(item, str) and item.strip():
            out.append(item.strip())
    return out


def extract_pairs(obj: Any) -> list[tuple[str, str]]:
    """(question, answer) pairs from {"pairs": [{"question","answer"}, ...]} and similar shapes."""
    out = []
    for item in _first_list(obj, ("pairs", "qa", "examples", "items")):
        if not isinstance(item, dict):
            continue
        q = item.get("question") or item.get("q") or item.get("prompt") or ""
        a = item.get("answer") or item.get("a") or item.get("completion") or ""
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            out.append((q.strip(), a.strip()))
    return out


def extract_score(obj: Any) -> float | None:
    """A judge's score in [0, 1] from {"score": x}; None when missing."""
    value = obj.get("score") if isinstance(obj, dict) else obj
    try:
        return min(1.0, max(0.0, float(value)))
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------ prompts
def _questions_schema(k: int) -> dict:
    """At most k short strings: a grammar-constrained server cannot then ramble until max_tokens cuts the JSON."""
    items = {"type": "string", "minLength": 3, "maxLength": 300}
    return {"type": "object", "properties": {"questions": {"type": "array", "items": items, "minItems": 1,
                                                           "maxItems": k}}, "required": ["questions"]}


def _pairs_schema(k: int) -> dict:
    text = {"type": "string", "minLength": 2, "maxLength": 1000}
    pair = {"type": "object", "properties": {"question": text, "answer": text}, "required": ["question", "answer"]}
    return {"type": "object", "properties": {"pairs": {"type": "array", "items": pair, "minItems": 1,
                                                       "maxItems": k}}, "required": ["pairs"]}


_SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]}


def paraphrase_messages(question: str, answer: str, *, k: int, language: str) -> list[dict]:
    """Ask for k rewordings of a question as different customers would ask it."""
    return [
        {"role": "system", "content": 'You rewrite customer questions. Reply with JSON only: {"questions": ["..."]}.'},
        {"role": "user", "content": (
            f"Write {k} different ways a customer could ask the question below: formal, casual, short, and long "
            f"with some context. Keep the meaning exactly, so that the same answer still fits. Write in "
            f"{LANGUAGE_NAMES.get(language, language)}. Do not repeat the original question.\n\n"
            f"Question: {question}\nAnswer (context only, do not change it): {answer}")},
    ]


def new_pairs_messages(shots: list[tuple[str, str]], *, k: int, language: str, description: str = "") -> list[dict]:
    """Ask for k new question-answer pairs in the domain and style of a few approved ones (self-instruct)."""
    examples = "\n".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in shots)
    about = f" The assistant: {description}." if description else ""
    return [
        {"role": "system", "content": 'You write training data for a customer assistant. Reply with JSON only: '
                                      '{"pairs": [{"question": "...", "answer": "..."}]}.'},
        {"role": "user", "content": (
            f"Here are question-answer pairs of an assistant.{about}\n{examples}\n\nWrite {k} NEW pairs about other "
            f"things its customers ask, in the same style and in {LANGUAGE_NAMES.get(language, language)}. "
            f"Do not copy or reword the examples; do not contradict them.")},
    ]


def document_messages(chunk: str, *, k: int, language: str) -> list[dict]:
    """Ask for up to k pairs whose answers come only from the given text."""
    return [
        {"role": "system", "content": 'You write question-answer pairs from a document. Reply with JSON only: '
                                      '{"pairs": [{"question": "...", "answer": "..."}]}.'},
        {"role": "user", "content": (
            f"Write up to {k} questions a customer could ask that the text below answers, each with its answer. "
            f"Answers must use only facts from the text. Write in {LANGUAGE_NAMES.get(language, language)}.\n\n"
            f"Text:\n<<<\n{chunk}\n>>>")},
    ]


def judge_messages(original: str, variation: str, *, answer: str) -> list[dict]:
    """Ask for a score in [0, 1] that a variation asks the same thing as the original."""
    return [
        {"role": "system", "content": 'You check rewritten questions. Reply with JSON only: {"score": 0.0}.'},
        {"role": "user", "content": (
            f"Original question: {original}\nRewritten question: {variation}\nAnswer to the original: {answer}\n\n"
            "Score from 0 to 1 how surely the rewritten question asks exactly the same thing, so that the same "
            "answer is right for it (1: same meaning, 0: different or contradicting).")},
    ]


# ------------------------------------------------------------------- client
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


class _Runner:
    """One generation run: a client, a budget, bounded concurrency, and items saved as they arrive."""

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
        raise _Stop(reason)

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
                    raise _Stop(self.stop_reason)
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


# --------------------------------------------------------------- the run
@dataclass(frozen=True)
class _Unit:
    key: str  # what a resumed run matches already generated items by
    label: str
    need: int
    language: str
    parent: Any = None  # paraphrase: the source Example
    shots: tuple = ()  # new: (question, answer) examples
    chunk: Any = None  # document: a tuning.data.documents.Chunk


def _item_key(method: str, example) -> str:
    return f"parent:{example.parent_id}" if method == "paraphrase" else (example.chunk_ref or "")


def _majority_language(texts) -> str:
    found = [detect_language(t) for t in texts]
    found = [f for f in found if f]
    return max(set(found), key=found.count) if found else "en"


def _plan_units(store, assistant, *, method: str, per_example: int, document_id: int | None,
                chunk_chars: int, shots: int) -> list[_Unit]:
    roots = store.list_examples(assistant.id, status="approved", roots_only=True)
    if method == "paraphrase":
        if not roots:
            raise GenerationError("no approved examples to paraphrase yet: add or approve some first")
        return [_Unit(f"parent:{ex.id}", f"example #{ex.id}", per_example, detect_language(ex.question) or "en",
                      parent=ex) for ex in roots]
    if method == "new":
        if not roots:
            raise GenerationError("no approved examples to learn the style from yet: add or approve some first")
        batches = math.ceil(len(roots) / shots)
        out = []
        for b in range(batches):
            group = tuple((ex.question, ex.answer) for ex in roots[b * shots:(b + 1) * shots])
            out.append(_Unit(f"new: batch {b + 1}", f"new batch {b + 1}", per_example,
                             _majority_language(q for q, _ in group), shots=group))
        return out
    if method == "document":
        from tuning.data.documents import chunk_spans

        if document_id is None:
            raise GenerationError("method document needs a document: import one first (tunebot import-document)")
        document = store.get_document(document_id)
        if document.assistant_id != assistant.id:
            raise GenerationError(f"document #{document_id} belongs to another assistant")
        return [_Unit(f"doc {document_id}: {c.ref}", c.ref, per_example, detect_language(c.text) or "en", chunk=c)
                for c in chunk_spans(document.text, max_chars=chunk_chars)]
    raise GenerationError(f"unknown generation method {method!r}; use one of: {', '.join(METHODS)}")


async def generate(store, assistant_id: int, *, method: str, per_example: int, client_config: ClientConfig,
                   budget: Budget | None = None, on_progress: Callable[[dict], None] | None = None,
                   judge: bool = False, auto_approve_above: float = 0.0, document_id: int | None = None,
                   chunk_chars: int = 2000, resume_run_id: int | None = None, author_id: int | None = None,
                   max_chars: int = 4000, dedup_threshold: float = DEFAULT_THRESHOLD, shots: int = 5,
                   max_rounds: int = 3, client=None, should_stop: Callable[[], bool] | None = None):
    """Generate pending examples with the larger model; every item is saved as it arrives. Returns the GenerationRun.

    A run stopped by its budget or failed halfway keeps its items and resumes with `resume_run_id`
    (units already complete in that run are skipped). `should_stop()` (polled 5 times a second) ends the
    run early the same way, requests in flight included: the bot uses it when it shuts down.
    """
    budget = budget or Budget()
    assistant = store.get_assistant(assistant_id)
    if resume_run_id is not None:
        previous = store.get_generation_run(resume_run_id)
        if previous.assistant_id != assistant_id:
            raise GenerationError(f"generation run #{resume_run_id} belongs to another assistant")
        if previous.method not in METHODS:
            raise GenerationError(f"run #{resume_run_id} ({previous.method}) is not a run of the larger model")
        method = previous.method
        per_example = int(previous.params.get("per_example", per_example))
        document_id = previous.params.get("document_id", document_id)
        judge = bool(previous.params.get("judge", judge))
    if per_example < 1:
        raise GenerationError("--per-example must be at least 1")
    units = _plan_units(store, assistant, method=method, per_example=per_example, document_id=document_id,
                        chunk_chars=chunk_chars, shots=shots)
    if resume_run_id is not None:
        run = store.reopen_generation_run(resume_run_id)
        done: dict[str, int] = {}
        for ex in store.list_examples(assistant_id, generation_run_id=run.id):
            done[_item_key(method, ex)] = done.get(_item_key(method, ex), 0) + 1
        units = [_Unit(u.key, u.label, u.need - done.get(u.key, 0), u.language, u.parent, u.shots, u.chunk)
                 for u in units if u.need - done.get(u.key, 0) > 0]
    else:
        run = store.create_generation_run(
            assistant_id, method=method, model=client_config.model, requested=sum(u.need for u in units),
            params={"per_example": per_example, "document_id": document_id, "judge": judge,
                    "base_url": client_config.base_url, "max_requests": budget.max_requests,
                    "max_tokens": budget.max_tokens})
    runner = _Runner(store, run, config=client_config, budget=budget, client=client)
    index = index_for_assistant(store, assistant_id, threshold=dedup_threshold)
    state = {"done": 0, "kept": 0}

    def report() -> None:
        if on_progress is not None:
            on_progress({"run_id": run.id, "done": state["done"], "total": len(units), "kept": state["kept"],
                         "requests": runner.requests, "tokens": runner.tokens})

    async def score(unit: _Unit, question: str, answer: str) -> float | None:
        original = unit.parent.question if unit.parent is not None else None
        if not judge or original is None:
            return None
        try:
            content = await runner.call(judge_messages(original, question, answer=answer), schema=_SCORE_SCHEMA)
            return extract_score(parse_json_payload(content))
        except BadOutput:
            return None

    async def save(unit: _Unit, items: list[tuple[str, str]], need: int) -> int:
        from tuning.data.dedup import check_candidate

        kept = 0
        for question, answer in items:
            if kept >= need:
                break
            if check_candidate(question, answer, index=index, max_chars=max_chars, language=unit.language):
                continue
            index.add(question)
            judge_score = await score(unit, question, answer)
            approved = auto_approve_above > 0 and judge_score is not None and judge_score >= auto_approve_above
            try:
                store.add_example(
                    assistant_id, question, answer, source="document" if unit.chunk is not None else "synthetic",
                    status="approved" if approved else "pending",
                    split=unit.parent.split if unit.parent is not None else "train",
                    parent_id=unit.parent.id if unit.parent is not None else None, method=method,
                    author_id=author_id, generation_run_id=run.id, document_id=document_id if unit.chunk else None,
                    chunk_ref=None if unit.parent is not None else unit.key, judge_score=judge_score)
            except DuplicateExample:
                continue
            kept += 1
            state["kept"] += 1
        store.add_generation_usage(run.id, generated=len(items), kept=kept)
        return kept

    async def work(unit: _Unit) -> None:
        kept, problem = 0, None
        for attempt in range(max_rounds):
            need = unit.need - kept
            if need <= 0:
                break
            if unit.parent is not None:
                messages = paraphrase_messages(unit.parent.question, unit.parent.answer, k=need, language=unit.language)
                schema = _questions_schema(need)
            elif unit.chunk is not None:
                messages = document_messages(unit.chunk.text, k=need, language=unit.language)
                schema = _pairs_schema(need)
            else:
                messages = new_pairs_messages(list(unit.shots), k=need, language=unit.language,
                                              description=assistant.description)
                schema = _pairs_schema(need)
            try:
                obj = parse_json_payload(await runner.call(messages, schema=schema, seed_offset=attempt))
                if unit.parent is not None:
                    items = [(q, unit.parent.answer) for q in extract_questions(obj)]
                else:
                    items = extract_pairs(obj)
                if not items:
                    raise BadOutput("the model's JSON held no items")
            except BadOutput as exc:
                problem = str(exc)
                store.add_generation_usage(run.id)
                continue
            kept += await save(unit, items, need)
            report()
        if kept == 0 and problem:
            runner.problems.append(f"{unit.label}: {problem}")

    async def guarded(unit: _Unit) -> None:
        try:
            await work(unit)
        except _Stop:
            return
        state["done"] += 1
        report()

    async def watch(tasks: list) -> None:
        while not should_stop():
            await asyncio.sleep(STOP_POLL_S)
        if runner.stop_reason is None:
            runner.stop_reason, runner.stop_status = "stopped before the end (Tunebot was shutting down)", "stopped"
        for task in tasks:
            task.cancel()  # a request in flight is abandoned; what was saved stays

    report()
    tasks = [asyncio.ensure_future(guarded(u)) for u in units]
    watcher = asyncio.ensure_future(watch(tasks)) if should_stop is not None else None
    try:
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
    except BaseException as exc:
        for task in tasks:
            task.cancel()
        store.finish_generation_run(run.id, status="failed", error=f"interrupted: {type(exc).__name__}: {exc}")
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
    final = store.get_generation_run(run.id)
    resume = f"resume with `tunebot generate --assistant {assistant.name} --resume {run.id}`"
    if runner.stop_reason is not None:
        return store.finish_generation_run(
            run.id, status=runner.stop_status,
            error=f"{runner.stop_reason}; {final.kept} items kept, {state['done']} of {len(units)} done; {resume}")
    if runner.problems:
        return store.finish_generation_run(
            run.id, status="failed",
            error=f"{len(runner.problems)} of {len(units)} got no usable answer ({runner.problems[-1]}); "
                  f"{final.kept} items kept; {resume}")
    return store.finish_generation_run(run.id, status="succeeded")

