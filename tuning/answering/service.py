"""The answer service: resolve a mode into a plan (adapter, retrieved examples, prompt), answer it or say
"I don't know" when the retrieval confidence is below the version's calibrated threshold, and record both.

Modes: `base`, `fewshot` (retrieved examples as chat turns), `tuned` (the active adapter, closed book),
`grounded` (the active adapter given the retrieved examples, as it was trained), `version` (a given version,
answering the way it was trained), and `auto`: grounded or tuned by the active version's recipe, few-shot
before any training. One retriever (tuning.retrieval) selects the examples for every mode and caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from tuning.answering.requests import MODES, InferenceError, NoActiveVersion, prepare_messages
from tuning.grounding import (DEFAULT_THRESHOLD, CitationFilter, Grounding, default_threshold, judged,
                              read_grounded, render_question)
from tuning.retrieval import has_cyrillic

ABSTAIN_TEXT = ("I'm not sure about this one, so I've passed your question to our experts: "
                "they will add the answer.")
ABSTAIN_TEXT_RU = "Я не уверен в ответе, поэтому передал ваш вопрос нашим экспертам: они добавят ответ."


def abstain_text_for(question: str) -> str:
    """The "I don't know" in the question's language (Russian or English), for callers with no text of their own
    (the CLI, the demo, the API); the bot passes its own, in the user's language."""
    return ABSTAIN_TEXT_RU if has_cyrillic(question) else ABSTAIN_TEXT


FEWSHOT_K = 4


def select_fewshot(question: str, examples: Sequence[tuple[str, str]], *, k: int = FEWSHOT_K) -> list[tuple[str, str]]:
    """Up to k (question, answer) pairs the retriever finds for the question (one per answer), best last."""
    from tuning.retrieval import Retriever, docs_from_pairs

    return [(h.question, h.answer) for h in reversed(Retriever(docs_from_pairs(examples)).search(question, k))]


@dataclass(frozen=True)
class AnswerPlan:
    """How to answer: the resolved mode, the adapter (if any), the prompt and the examples retrieved for it."""

    assistant_id: int
    mode: str
    version_id: int | None = None
    adapter_dir: str | None = None
    adapter_name: str | None = None
    system_prompt: str = ""
    fewshot: tuple[tuple[str, str], ...] = ()
    prompt: str | None = None  # the user turn sent to the model when it differs from the question (grounded)
    hits: tuple = ()  # tuning.retrieval.Hit, best first: what the answer may draw on
    confidence: float = 1.0
    threshold: float = DEFAULT_THRESHOLD
    min_choice_probability: float = 0.0
    no_answer_above: float | None = None
    may_abstain: bool = False  # auto answers (what users get by default) say "I don't know" when unsure
    retrieved_from: int = 0  # how many examples the retriever held (none: nothing to judge confidence by)

    @property
    def unsure(self) -> bool:
        return self.may_abstain and self.retrieved_from > 0 and self.confidence < self.threshold

    @property
    def sources(self) -> tuple[tuple[int, str], ...]:
        """(example id, question) of the examples shown to the model, or of the best match when none were."""
        shown = self.hits if self.mode in ("grounded", "fewshot") else self.hits[:1]
        return tuple((h.example_id, h.question) for h in shown if h.example_id is not None)

    def messages(self, question_or_messages) -> list[dict]:
        """The chat messages to send for a question or a conversation, with this plan's context applied."""
        if self.prompt is not None:
            if isinstance(question_or_messages, str):
                question_or_messages = self.prompt
            else:
                question_or_messages = [dict(m) for m in question_or_messages]
                question_or_messages[-1]["content"] = self.prompt
        return prepare_messages(question_or_messages, system_prompt=self.system_prompt, fewshot=self.fewshot)

    def engine_kwargs(self) -> dict:
        return {"adapter_dir": self.adapter_dir, "adapter_name": self.adapter_name,
                "system_prompt": self.system_prompt, "fewshot": self.fewshot}


@dataclass(frozen=True)
class Answer:
    """An answer shown to a user, with the ids of the stored messages (for feedback) and what it drew on."""

    text: str
    mode: str
    version_id: int | None
    ttft_ms: float
    latency_ms: float
    n_tokens: int
    tokens_per_s: float
    conversation_id: int | None = None
    message_id: int | None = None
    sources: tuple[tuple[int, str], ...] = ()
    confidence: float | None = None
    abstained: bool = False
    unanswered_id: int | None = None
    extra: dict = field(default_factory=dict)


def _retriever(store, assistant_id: int, indexes):
    from tuning.retrieval import Retriever, docs_from_store

    if indexes is not None:
        return indexes.get(store, assistant_id)
    return Retriever(docs_from_store(store, assistant_id))


def plan_answer(store, assistant_id: int, question: str, *, mode: str = "auto", version_id: int | None = None,
                fewshot_k: int = FEWSHOT_K, indexes=None) -> AnswerPlan:
    """Resolve a mode (auto: the active version as it was trained, else few-shot) into an adapter and prompt."""
    if mode not in MODES:
        raise InferenceError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    assistant = store.get_assistant(assistant_id)
    auto = mode == "auto"
    version = None
    if mode in ("auto", "tuned", "grounded") and assistant.active_version_id:
        version = store.get_model_version(assistant.active_version_id)
    elif mode in ("tuned", "grounded"):
        raise NoActiveVersion(f"assistant {assistant.name!r} has no trained version yet: "
                              "train it first, or ask in base or few-shot mode")
    elif mode == "version":
        if version_id is None:
            raise InferenceError("mode 'version' needs a version id")
        version = store.get_model_version(version_id)
        if version.assistant_id != assistant_id:
            raise InferenceError(f"model version #{version_id} belongs to another assistant")
    grounding = Grounding.load(version.adapter_path) if version is not None else Grounding()
    if mode in ("auto", "version"):
        mode = ("grounded" if grounding.recipe == "grounded" else "tuned") if version is not None else "fewshot"
    retriever = _retriever(store, assistant_id, indexes)
    hits = tuple(retriever.search(question, max(grounding.k, fewshot_k)))
    thresholds = (grounding.threshold, grounding.similarity_threshold) if grounding.calibrated_on \
        else (default_threshold(retriever), None)
    score, threshold = judged(question, hits, *thresholds)
    common = {"assistant_id": assistant_id, "system_prompt": assistant.system_prompt, "confidence": score,
              "threshold": threshold, "min_choice_probability": grounding.min_choice_probability,
              "no_answer_above": grounding.no_answer_above_for(question, hits), "may_abstain": auto,
              "retrieved_from": len(retriever)}
    if mode in ("tuned", "grounded"):
        shown = hits[:grounding.k] if mode == "grounded" else ()
        return AnswerPlan(mode=mode, version_id=version.id, adapter_dir=version.adapter_path,
                          adapter_name=f"{assistant.name}-v{version.id}",
                          prompt=render_question(question, shown) if shown else None,
                          hits=shown or hits[:1], **common)
    if mode == "fewshot":
        shown = hits[:fewshot_k]
        return AnswerPlan(mode=mode, fewshot=tuple((h.question, h.answer) for h in reversed(shown)), hits=shown,
                          **common)
    return AnswerPlan(mode=mode, hits=hits[:1], **common)


def record_answer(store, plan: AnswerPlan, question: str, answer: str, *, user_id: int | None = None,
                  conversation_id: int | None = None, latency_ms: float | None = None,
                  abstained: bool = False, sources: Sequence[tuple[int, str]] | None = None) -> tuple[int, int]:
    """Store the question and the answer with its sources; returns (conversation id, answer message id)."""
    if conversation_id is None:
        conversation_id = store.start_conversation(plan.assistant_id, user_id, mode=plan.mode)
    store.add_message(conversation_id, "user", question, mode=plan.mode)
    message_id = store.add_message(conversation_id, "assistant", answer, model_version_id=plan.version_id,
                                   mode=plan.mode, latency_ms=latency_ms,
                                   sources=[i for i, _ in (plan.sources if sources is None else sources)],
                                   confidence=plan.confidence,
                                   abstained=abstained)
    return conversation_id, message_id


def answer_question(store, engine, assistant_id: int, question: str, *, mode: str = "auto",
                    version_id: int | None = None, user_id: int | None = None, conversation_id: int | None = None,
                    on_piece=None, record: bool = True, indexes=None, abstain_text: str | None = None) -> Answer:
    """Answer one question in a mode, calling on_piece(text) per streamed piece, and record the exchange.

    An auto answer whose confidence is below the threshold is not generated: the assistant says it will pass
    the question on (abstain_text, in the user's language), and the question is queued for the experts.
    """
    plan = plan_answer(store, assistant_id, question, mode=mode, version_id=version_id, indexes=indexes)
    if abstain_text is None:
        abstain_text = abstain_text_for(question)
    start = time.perf_counter()
    first, pieces, logprobs, alternatives, streamed = None, [], (), (), False
    if not plan.unsure:
        grounded = plan.mode == "grounded"
        running: dict = {}
        visible = CitationFilter(streamed_citation(plan, lambda: getattr(running.get("generation"), "alternatives",
                                                                        ()))) if grounded else None
        for piece in _generate(engine, plan, question, running):
            if isinstance(piece, tuple):  # the end: the answer's token log-probabilities and alternatives
                logprobs, alternatives = piece[1], piece[2]
                break
            first = first or time.perf_counter()
            pieces.append(piece)
            shown = visible.feed(piece) if visible is not None else piece
            if on_piece is not None and shown:
                on_piece(shown)
                streamed = True
    outcome = finish_answer(plan, "".join(pieces), logprobs, alternatives, abstain_text=abstain_text)
    text, sources, unsure = outcome.text, outcome.sources, outcome.abstained
    probability = outcome.choice_probability
    end = time.perf_counter()
    if on_piece is not None and (unsure or not streamed):  # e.g. the model wrote [0] but an example won
        on_piece(text)
    latency_ms = (end - start) * 1000
    ids: tuple = (None, None)
    unanswered_id = None
    if record:
        ids = record_answer(store, plan, question, text, user_id=user_id, conversation_id=conversation_id,
                            latency_ms=latency_ms, abstained=unsure, sources=sources)
        if unsure and plan.may_abstain:
            unanswered_id = store.add_unanswered(assistant_id, question, user_id=user_id, conversation_id=ids[0],
                                                 message_id=ids[1]).id
    n = len(pieces)
    return Answer(text=text, mode=plan.mode, version_id=plan.version_id,
                  ttft_ms=((first or end) - start) * 1000, latency_ms=latency_ms, n_tokens=n,
                  tokens_per_s=(n - 1) / max(end - (first or end), 1e-9) if n > 1 else 0.0,
                  conversation_id=ids[0], message_id=ids[1], sources=sources, confidence=plan.confidence,
                  abstained=unsure, unanswered_id=unanswered_id,
                  extra={"choice_probability": probability} if probability is not None else {})


@dataclass(frozen=True)
class Finished:
    """What a generated answer becomes for the user: its text, whether it is "I don't know", its sources."""

    text: str
    abstained: bool
    sources: tuple[tuple[int, str], ...]
    choice_probability: float | None = None


def finish_answer(plan: AnswerPlan, raw: str, token_logprobs: Sequence[float] = (), alternatives: Sequence = (), *,
                  abstain_text: str | None = None) -> Finished:
    """Read a generated answer back: a grounded one loses its citation (the cited example becomes the first
    source) and is "I don't know" when P([0]) reaches the version's calibrated threshold (older versions: when
    the model wrote [0] or cited with too little probability)."""
    text, sources, unsure, probability = raw.strip(), plan.sources, plan.unsure, None
    if not unsure and plan.mode == "grounded":
        read = read_grounded(raw, plan.hits, token_logprobs, alternatives, no_answer_above=plan.no_answer_above)
        probability = read.choice_probability
        unsure = read.abstained or grounded_unsure(read, plan.min_choice_probability, plan.no_answer_above)
        text = read.text
        if read.cited is not None and plan.hits[read.cited].example_id is not None:
            hit = plan.hits[read.cited]
            sources = ((hit.example_id, hit.question),) + tuple(s for s in sources if s[0] != hit.example_id)
    if unsure:
        text = abstain_text or ABSTAIN_TEXT
    return Finished(text=text, abstained=unsure, sources=sources, choice_probability=probability)


def grounded_unsure(read, min_choice_probability: float, no_answer_above: float | None) -> bool:
    """An older adapter's rule (no calibrated P([0]) threshold): a citation chosen with too little probability.
    (A calibrated adapter that wrote no citation answered closed book, as its closed-book rows taught it: the
    retrieval confidence alone judges that, as in the tuned mode.)"""
    return (no_answer_above is None and read.choice_probability is not None
            and read.choice_probability < min_choice_probability)


def streamed_citation(plan: AnswerPlan, alternatives_now):
    """For CitationFilter: whether the model's words after citing [n] are the answer, decided when the number
    is written (alternatives_now() holds its probabilities by then): the calibrated choice must be n."""
    from tuning.grounding import citation_choice, decide_citation

    def decide(number: int) -> bool:
        choice = citation_choice(alternatives_now(), len(plan.hits)) if plan.no_answer_above is not None else None
        if choice is None:
            return number != 0
        return decide_citation(choice, plan.no_answer_above) == number

    return decide


def _generate(engine, plan: AnswerPlan, question: str, running: dict | None = None):
    """Text pieces of the answer, then ("end", token log-probabilities, alternatives) when the engine measures
    them; running["generation"] is the engine's request while it runs."""
    if hasattr(engine, "submit"):  # the local engine: exact tokens and their log-probabilities
        generation = engine.submit(plan.messages(question), adapter_dir=plan.adapter_dir)
        if running is not None:
            running["generation"] = generation
        try:
            yield from generation
            result = generation.result()
            yield ("end", result.token_logprobs, result.alternatives)
        finally:
            generation.cancel()
        return
    yield from engine.stream(plan.prompt or question, **plan.engine_kwargs())


def compare_answers(store, engine, assistant_id: int, question: str,
                    *, modes: Sequence[str] = ("base", "fewshot", "tuned", "grounded"), user_id: int | None = None,
                    on_piece=None, record: bool = True, indexes=None) -> list[Answer]:
    """One question answered in several modes (tuned and grounded are skipped while nothing is trained)."""
    assistant = store.get_assistant(assistant_id)
    answers = []
    for mode in modes:
        if mode in ("tuned", "grounded") and not assistant.active_version_id:
            continue
        callback = (lambda piece, _mode=mode: on_piece(_mode, piece)) if on_piece else None
        answers.append(answer_question(store, engine, assistant_id, question, mode=mode, user_id=user_id,
                                       on_piece=callback, record=record, indexes=indexes))
    return answers
