"""Variations from a larger model over any OpenAI-compatible endpoint: paraphrases, new pairs, pairs from documents.

The client (budget, retries) is in `synthetic_client`, the prompts and reply parsing in `synthetic_prompts`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

from storage.errors import DuplicateExample
from tuning.data.dedup import DEFAULT_THRESHOLD, detect_language, index_for_assistant
from tuning.data.synthetic_prompts import (CHUNK_CHARS, SCORE_SCHEMA, SHOTS, BadOutput, document_messages, extract_pairs,
                                          extract_questions, extract_score, judge_messages, new_pairs_messages,
                                          pairs_schema, paraphrase_messages, parse_json_payload, questions_schema)
from tuning.data.synthetic_client import Budget, ClientConfig, BudgetedClient, RunStopped
from tuning.errors import GenerationError

log = logging.getLogger(__name__)

METHODS = ("paraphrase", "new", "document")
STOP_POLL_S = 0.2  # how often generate() checks should_stop


# --------------------------------------------------------------- what to ask for, per method
@dataclass(frozen=True)
class _Task:
    """One unit of a run: what to ask the larger model for, and how what it returns is stored."""

    key: str  # what a resumed run matches already generated items by (the items' chunk_ref, or their parent)
    label: str
    need: int
    language: str

    source = "synthetic"

    def messages(self, need: int, description: str) -> list[dict]:
        raise NotImplementedError

    def schema(self, need: int) -> dict:
        return pairs_schema(need)

    def items(self, obj) -> list[tuple[str, str]]:
        return extract_pairs(obj)

    def stored_as(self) -> dict:
        """The example fields that tie a generated item to this unit."""
        return {"split": "train", "parent_id": None, "chunk_ref": self.key}


@dataclass(frozen=True)
class _Paraphrase(_Task):
    parent: Any = None  # the source Example: its answer is kept, its question reworded

    def messages(self, need: int, description: str) -> list[dict]:
        return paraphrase_messages(self.parent.question, self.parent.answer, k=need, language=self.language)

    def schema(self, need: int) -> dict:
        return questions_schema(need)

    def items(self, obj) -> list[tuple[str, str]]:
        return [(q, self.parent.answer) for q in extract_questions(obj)]

    def stored_as(self) -> dict:
        return {"split": self.parent.split, "parent_id": self.parent.id, "chunk_ref": None}


@dataclass(frozen=True)
class _NewPairs(_Task):
    shots: tuple = ()  # (question, answer) examples of the style

    def messages(self, need: int, description: str) -> list[dict]:
        return new_pairs_messages(list(self.shots), k=need, language=self.language, description=description)


@dataclass(frozen=True)
class _DocumentPart(_Task):
    chunk: Any = None  # a tuning.data.documents.Chunk
    document_id: int | None = None

    source = "document"

    def messages(self, need: int, description: str) -> list[dict]:
        return document_messages(self.chunk.text, k=need, language=self.language)

    def stored_as(self) -> dict:
        return {**super().stored_as(), "document_id": self.document_id}


def _item_key(method: str, example) -> str:
    return f"parent:{example.parent_id}" if method == "paraphrase" else (example.chunk_ref or "")


def _majority_language(texts) -> str:
    found = [detect_language(t) for t in texts]
    found = [f for f in found if f]
    return max(set(found), key=found.count) if found else "en"


def _plan(store, assistant, *, method: str, per_example: int, document_id: int | None,
          chunk_chars: int, shots: int) -> list[_Task]:
    roots = store.list_examples(assistant.id, status="approved", roots_only=True)
    if method == "paraphrase":
        if not roots:
            raise GenerationError("no approved examples to paraphrase yet: add or approve some first")
        return [_Paraphrase(f"parent:{ex.id}", f"example #{ex.id}", per_example, detect_language(ex.question) or "en",
                            parent=ex) for ex in roots]
    if method == "new":
        if not roots:
            raise GenerationError("no approved examples to learn the style from yet: add or approve some first")
        groups = [tuple((ex.question, ex.answer) for ex in roots[b:b + shots]) for b in range(0, len(roots), shots)]
        return [_NewPairs(f"new: batch {b + 1}", f"new batch {b + 1}", per_example,
                          _majority_language(q for q, _ in group), shots=group) for b, group in enumerate(groups)]
    if method == "document":
        from tuning.data.documents import chunk_spans

        if document_id is None:
            raise GenerationError("method document needs a document: import one first (tunebot import-document)")
        document = store.get_document(document_id)
        if document.assistant_id != assistant.id:
            raise GenerationError(f"document #{document_id} belongs to another assistant")
        return [_DocumentPart(f"doc {document_id}: {c.ref}", c.ref, per_example, detect_language(c.text) or "en",
                              chunk=c, document_id=document_id)
                for c in chunk_spans(document.text, max_chars=chunk_chars)]
    raise GenerationError(f"unknown generation method {method!r}; use one of: {', '.join(METHODS)}")


# --------------------------------------------------------------- the run
async def generate(store, assistant_id: int, *, method: str, per_example: int, client_config: ClientConfig,
                   budget: Budget | None = None, on_progress: Callable[[dict], None] | None = None,
                   judge: bool = False, auto_approve_above: float = 0.0, document_id: int | None = None,
                   chunk_chars: int = CHUNK_CHARS, resume_run_id: int | None = None, author_id: int | None = None,
                   max_chars: int = 4000, dedup_threshold: float = DEFAULT_THRESHOLD, shots: int = SHOTS,
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
        raise GenerationError("variations per example must be at least 1", code="per_example_min")
    tasks = _plan(store, assistant, method=method, per_example=per_example, document_id=document_id,
                  chunk_chars=chunk_chars, shots=shots)
    if resume_run_id is not None:
        run = store.reopen_generation_run(resume_run_id)
        done: dict[str, int] = {}
        for ex in store.list_examples(assistant_id, generation_run_id=run.id):
            done[_item_key(method, ex)] = done.get(_item_key(method, ex), 0) + 1
        tasks = [dataclasses.replace(u, need=u.need - done.get(u.key, 0)) for u in tasks
                 if u.need - done.get(u.key, 0) > 0]
    else:
        run = store.create_generation_run(
            assistant_id, method=method, model=client_config.model, requested=sum(u.need for u in tasks),
            params={"per_example": per_example, "document_id": document_id, "judge": judge,
                    "base_url": client_config.base_url, "max_requests": budget.max_requests,
                    "max_tokens": budget.max_tokens})
    generation = _Generation(
        store, assistant, run, method=method, runner=BudgetedClient(store, run, config=client_config, budget=budget,
                                                             client=client),
        index=index_for_assistant(store, assistant_id, threshold=dedup_threshold), judge=judge,
        auto_approve_above=auto_approve_above, author_id=author_id, max_chars=max_chars, max_rounds=max_rounds,
        on_progress=on_progress)
    await generation.run_all(tasks, should_stop)
    return generation.finish(len(tasks))


class _Generation:
    """The units of one run, worked on concurrently; each item checked, judged and saved as it arrives."""

    def __init__(self, store, assistant, run, *, method: str, runner: BudgetedClient, index, judge: bool,
                 auto_approve_above: float, author_id: int | None, max_chars: int, max_rounds: int,
                 on_progress: Callable[[dict], None] | None) -> None:
        self.store, self.assistant, self.run, self.method, self.runner, self.index = (
            store, assistant, run, method, runner, index)
        self.judge, self.auto_approve_above, self.author_id = judge, auto_approve_above, author_id
        self.max_chars, self.max_rounds, self.on_progress = max_chars, max_rounds, on_progress
        self.done = self.kept = self.total = 0

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress({"run_id": self.run.id, "done": self.done, "total": self.total, "kept": self.kept,
                              "requests": self.runner.requests, "tokens": self.runner.tokens})

    async def run_all(self, tasks: list[_Task], should_stop: Callable[[], bool] | None) -> None:
        self.total = len(tasks)
        self.report()
        futures = [asyncio.ensure_future(self._guarded(u)) for u in tasks]
        watcher = asyncio.ensure_future(self._watch(futures, should_stop)) if should_stop is not None else None
        try:
            if futures:
                await asyncio.wait(futures)
            for future in futures:
                if not future.cancelled() and future.exception() is not None:
                    raise future.exception()
        except BaseException as exc:
            for future in futures:
                future.cancel()
            self.store.finish_generation_run(self.run.id, status="failed",
                                             error=f"interrupted: {type(exc).__name__}: {exc}")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def finish(self, n_tasks: int):
        runner, run_id = self.runner, self.run.id
        final = self.store.get_generation_run(run_id)
        # The error says what happened in the run's own terms; how to resume is the front end's to say
        # (the CLI prints its --resume, the bot its own words).
        if runner.stop_reason is not None:
            return self.store.finish_generation_run(
                run_id, status=runner.stop_status,
                error=f"{runner.stop_reason}; {final.kept} items kept, {self.done} of {n_tasks} done")
        if runner.problems:
            return self.store.finish_generation_run(
                run_id, status="failed",
                error=f"{len(runner.problems)} of {n_tasks} got no usable answer ({runner.problems[-1]}); "
                      f"{final.kept} items kept")
        return self.store.finish_generation_run(run_id, status="succeeded")

    async def _watch(self, futures: list, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            await asyncio.sleep(STOP_POLL_S)
        if self.runner.stop_reason is None:
            self.runner.stop_reason = "stopped before the end (Tunebot was shutting down)"
            self.runner.stop_status = "stopped"
        for future in futures:
            future.cancel()  # a request in flight is abandoned; what was saved stays

    async def _guarded(self, task: _Task) -> None:
        try:
            await self._work(task)
        except RunStopped:
            return
        self.done += 1
        self.report()

    async def _work(self, task: _Task) -> None:
        """Ask until the unit has what it needs, or max_rounds requests were made for it."""
        kept, problem = 0, None
        for attempt in range(self.max_rounds):
            need = task.need - kept
            if need <= 0:
                break
            try:
                obj = parse_json_payload(await self.runner.call(task.messages(need, self.assistant.description),
                                                                schema=task.schema(need), seed_offset=attempt))
                items = task.items(obj)
                if not items:
                    raise BadOutput("the model's JSON held no items")
            except BadOutput as exc:
                problem = str(exc)
                self.store.add_generation_usage(self.run.id)
                continue
            kept += await self._save(task, items, need)
            self.report()
        if kept == 0 and problem:
            self.runner.problems.append(f"{task.label}: {problem}")

    async def _score(self, task: _Task, question: str, answer: str) -> float | None:
        if not self.judge or not isinstance(task, _Paraphrase):
            return None
        try:
            content = await self.runner.call(judge_messages(task.parent.question, question, answer=answer),
                                             schema=SCORE_SCHEMA)
            return extract_score(parse_json_payload(content))
        except BadOutput:
            return None

    async def _save(self, task: _Task, items: list[tuple[str, str]], need: int) -> int:
        from tuning.data.dedup import check_candidate

        kept = 0
        for question, answer in items:
            if kept >= need:
                break
            if check_candidate(question, answer, index=self.index, max_chars=self.max_chars, language=task.language):
                continue
            self.index.add(question)
            judge_score = await self._score(task, question, answer)
            approved = (self.auto_approve_above > 0 and judge_score is not None
                        and judge_score >= self.auto_approve_above)
            try:
                self.store.add_example(
                    self.assistant.id, question, answer, source=task.source,
                    status="approved" if approved else "pending", method=self.method, author_id=self.author_id,
                    generation_run_id=self.run.id, judge_score=judge_score, **task.stored_as())
            except DuplicateExample:
                continue
            kept += 1
            self.kept += 1
        self.store.add_generation_usage(self.run.id, generated=len(items), kept=kept)
        return kept
