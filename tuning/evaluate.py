"""Before/after evaluation: base model, base model with few-shot examples, tuned model, side by side."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tuning.answering.service import FEWSHOT_K  # one selector (retrieval) for chat, API and eval
from tuning.errors import ModelLoadError
from tuning.scoring import contains_all, normalize, rouge_l, token_f1, words  # noqa: F401 (the scoring, re-exported)

MODES = ("base", "fewshot", "lookup", "tuned", "grounded")
MODEL_FREE = ("lookup",)  # answered without any model: the nearest example's answer, a baseline
NEEDS_ADAPTER = ("tuned", "grounded")


@dataclass(frozen=True)
class EvalItem:
    """A test question, its reference answer, and tokens a correct answer must contain."""

    question: str
    answer: str
    must_contain: tuple[str, ...] | None = None


def as_eval_items(items: Sequence) -> list[EvalItem]:
    """EvalItems from anything with question/answer (and maybe must_contain) attributes or dict keys."""
    out = []
    for it in items:
        get = it.get if isinstance(it, dict) else lambda k, d=None, it=it: getattr(it, k, d)
        must = get("must_contain", None)
        out.append(EvalItem(question=get("question"), answer=get("answer"),
                            must_contain=tuple(must) if must else None))
    return out


def summarize(items: Sequence[EvalItem], answers: Sequence) -> dict:
    """Metrics of one mode over its GeneratedAnswers."""
    checked = [(it, a) for it, a in zip(items, answers) if it.must_contain]
    ttfts = [a.ttft_ms for a in answers]
    rates = [a.tokens_per_s for a in answers if a.tokens_per_s > 0]
    return {
        "accuracy": round(sum(contains_all(a.text, it.must_contain) for it, a in checked) / len(checked), 4)
        if checked else None,
        "f1": round(statistics.fmean(token_f1(a.text, it.answer) for it, a in zip(items, answers)), 4),
        "rouge_l": round(statistics.fmean(rouge_l(a.text, it.answer) for it, a in zip(items, answers)), 4),
        "stop_rate": round(sum(a.stopped for a in answers) / len(answers), 4),
        "answer_tokens": round(statistics.fmean(a.n_tokens for a in answers), 1),
        "answer_chars": round(statistics.fmean(len(a.text) for a in answers), 1),
        "ttft_ms": round(statistics.median(ttfts), 1),
        "tokens_per_s": round(statistics.fmean(rates), 1) if rates else 0.0,
    }


def _trained_system_prompt(adapter_dir) -> str:
    path = Path(adapter_dir) / "train_config.json"
    if path.exists():
        return json.loads(path.read_text()).get("system_prompt", "")
    return ""


def _lookup_answer(hits):
    from tuning.answering.requests import GeneratedAnswer

    return GeneratedAnswer(text=hits[0].answer if hits else "", ttft_ms=0.0, n_tokens=0, tokens_per_s=0.0,
                           stopped=True)


def _eval_index(adapter_dir, fewshot: Sequence[tuple[str, str]]):
    """An index over the given example pairs, else the one the training run saved beside the adapter."""
    from tuning.retrieval import Retriever, docs_from_pairs

    if fewshot:
        return Retriever(docs_from_pairs(fewshot))
    if adapter_dir and (Path(adapter_dir) / "retrieval" / "meta.json").exists():
        return Retriever.load(Path(adapter_dir) / "retrieval")
    return None


def _recall(items: Sequence[EvalItem], hits_of: Sequence, ks: Sequence[int]) -> dict:
    checked = [(it, hits) for it, hits in zip(items, hits_of) if it.must_contain]
    if not checked:
        return {}
    return {f"recall@{k}": round(sum(any(contains_all(h.answer, it.must_contain) for h in hits[:k])
                                     for it, hits in checked) / len(checked), 4) for k in ks}


def evaluate(items: Sequence, *, base_model: str, adapter_dir=None, modes: Sequence[str] = MODES,
             fewshot: Sequence[tuple[str, str]] = (), system_prompt: str = "", cache_dir=None,
             max_new_tokens: int = 128, k: int | None = None, include_answers: bool = False,
             out_of_scope: Sequence = (), engine=None, backend: str = "local",
             on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """{"n", "modes": {mode: metrics}, "retrieval": recall@k, "out_of_scope": {mode: abstain_rate}}.

    Answers go through the same engine, prompts and retriever as chat: the torch Engine (batched), or with
    backend="llamacpp" the llama.cpp one (tuning.answering.llamacpp), so that both backends are measured the same
    way. tuned/grounded need adapter_dir; fewshot/lookup/grounded need an index: the one saved beside the adapter
    or one built from `fewshot` pairs. A question whose retrieval confidence is below the adapter's calibrated
    threshold counts as abstained (the assistant would say it does not know) in abstain_rate.
    """
    from tuning.grounding import Grounding, judged

    items, oos = _checked_questions(items, modes, adapter_dir, out_of_scope)
    if adapter_dir and not system_prompt:
        system_prompt = _trained_system_prompt(adapter_dir)
    grounding = Grounding.load(adapter_dir)
    k = k or grounding.k
    index = _eval_index(adapter_dir, fewshot)
    if index is None and any(m in ("fewshot", "lookup", "grounded") for m in modes):
        raise ModelLoadError("the fewshot, lookup and grounded modes need example pairs (--fewshot-data FILE) "
                             "or a model folder with its retrieval index")
    questions = [it.question for it in items] + oos
    hits_of = [index.search(q, max(k, FEWSHOT_K)) if index is not None else [] for q in questions]
    judgements = [judged(q, h, grounding.threshold, grounding.similarity_threshold) for q, h in zip(questions, hits_of)]
    above = [grounding.no_answer_above_for(q, h) for q, h in zip(questions, hits_of)]  # the model's P([0]) rule
    n_in = len(items)
    results: dict = {"n": n_in, "modes": {}, "k": k, "backend": backend, "abstain_threshold": grounding.threshold,
                     "no_answer_above": grounding.no_answer_above, "recipe": grounding.recipe}
    if index is not None:
        results["retrieval"] = _recall(items, hits_of[:n_in], (1, k))
    if oos:
        results["n_out_of_scope"] = len(oos)
        results["out_of_scope"] = {}
    engines = _Engines(base_model, adapter_dir, needs=[m for m in modes if m in NEEDS_ADAPTER], engine=engine,
                       backend=backend, cache_dir=cache_dir, max_new_tokens=max_new_tokens)
    texts: dict = {}
    read: dict = {}  # grounded: each answer's citation read back
    try:
        for mode in modes:
            answers = [_lookup_answer(h) for h in hits_of] if mode == "lookup" else _answers(
                mode, engines, questions, hits_of, k=k, system_prompt=system_prompt,
                max_new_tokens=max_new_tokens, on_progress=on_progress)
            abstained = [c < t for c, t in judgements]
            if mode == "grounded":  # the citation: the text without it, and the model's own "I don't know"
                answers, abstained, read = _read_citations(answers, hits_of, abstained, above, k=k,
                                                           grounding=grounding)
            results["modes"][mode] = _metrics(items, answers, abstained)
            if oos:
                results["out_of_scope"][mode] = {"abstain_rate": round(sum(abstained[n_in:]) / len(oos), 4)}
            texts[mode] = [a.text for a in answers]
    finally:
        engines.close()
    if include_answers:
        results.update(_answer_records(items, oos, texts, read, judgements, above, hits_of, k=k))
    return results


def _checked_questions(items, modes, adapter_dir, out_of_scope) -> tuple[list[EvalItem], list[str]]:
    """The test items and out-of-scope questions, after checking that the modes can be evaluated."""
    items = as_eval_items(items)
    oos = [it if isinstance(it, str) else (it.get("question") if isinstance(it, dict) else it.question)
           for it in out_of_scope]
    if not items:
        raise ModelLoadError("no questions to evaluate")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ModelLoadError(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    needs = [m for m in modes if m in NEEDS_ADAPTER]
    if needs and not adapter_dir:
        raise ModelLoadError(f"the {needs[0]} mode needs a trained model folder (--model DIR)")
    return items, oos


class _Engines:
    """The engines an evaluation answers with: the given one (or one of its backend) on the base model with the
    adapter, or, for a fully fine-tuned model, a torch engine on that model; closed at the end if made here."""

    def __init__(self, base_model: str, adapter_dir, *, needs: Sequence[str], engine, backend: str, cache_dir,
                 max_new_tokens: int):
        self.base_model, self.model_dir, self.adapter = base_model, base_model, None
        if adapter_dir:
            folder = Path(adapter_dir)
            if (folder / "adapter_config.json").exists():
                self.adapter = str(folder)
            elif needs and (folder / "config.json").exists():  # full fine-tuning saved a whole model
                self.model_dir = str(folder)
            elif needs:
                raise ModelLoadError(f"{folder} holds neither a LoRA adapter nor a model")
        # a remote backend is evaluated with a local engine
        self.engine = engine if engine is not None and hasattr(engine, "submit") else None
        self.backend, self.cache_dir, self.max_new_tokens = backend, cache_dir, max_new_tokens
        self.own: list = []

    def for_mode(self, mode: str):
        from tuning.answering.engine import Engine

        if mode in NEEDS_ADAPTER and self.model_dir != self.base_model:  # a fully fine-tuned model: torch only
            self.own.append(Engine(self.model_dir, cache_dir=self.cache_dir, max_new_tokens=self.max_new_tokens))
            return self.own[-1]
        if self.engine is None:
            if self.backend == "llamacpp":
                from tuning.answering.llamacpp import LlamaCppEngine

                self.engine = LlamaCppEngine(self.base_model, cache_dir=self.cache_dir,
                                             max_new_tokens=self.max_new_tokens)
            else:
                self.engine = Engine(self.base_model, cache_dir=self.cache_dir, max_new_tokens=self.max_new_tokens)
            self.own.append(self.engine)
        return self.engine

    def close(self) -> None:
        for engine in self.own:
            engine.close()


def _answers(mode: str, engines: _Engines, questions: Sequence[str], hits_of: Sequence, *, k: int,
             system_prompt: str, max_new_tokens: int, on_progress) -> list:
    """Every question answered in one mode, all submitted first so that the engine batches them."""
    from tuning.grounding import render_question
    from tuning.prompts import build_messages

    engine = engines.for_mode(mode)
    pending = []
    for q, hits in zip(questions, hits_of):
        shots = [(h.question, h.answer) for h in reversed(hits[:FEWSHOT_K])] if mode == "fewshot" else ()
        text = render_question(q, hits[:k]) if mode == "grounded" else q
        messages = build_messages(text, system_prompt=system_prompt, fewshot=shots)
        pending.append(engine.submit(messages, adapter_dir=engines.adapter if mode in NEEDS_ADAPTER else None,
                                     max_new_tokens=max_new_tokens))
    answers = []
    for i, generation in enumerate(pending):
        answers.append(generation.result())
        if on_progress:
            on_progress(mode, i + 1, len(pending))
    return answers


def _read_citations(answers: list, hits_of: Sequence, abstained: list[bool], above: Sequence[float | None], *,
                    k: int, grounding):
    """Grounded answers without their citations, whether each says "I don't know", and the citations read."""
    from dataclasses import replace

    from tuning.answering.service import grounded_unsure
    from tuning.grounding import read_grounded

    read = [read_grounded(a.text, h[:k], a.token_logprobs, a.alternatives, no_answer_above=t)
            for a, h, t in zip(answers, hits_of, above)]
    answers = [replace(a, text=r.text) for a, r in zip(answers, read)]
    abstained = [x or r.abstained or grounded_unsure(r, grounding.min_choice_probability, t)
                 for x, r, t in zip(abstained, read, above)]
    return answers, abstained, read


def _metrics(items: Sequence[EvalItem], answers: Sequence, abstained: Sequence[bool]) -> dict:
    """summarize() of the in-scope answers, with how often the assistant would say it does not know, and how
    many questions it answers correctly without withholding them (what a customer actually receives)."""
    n_in = len(items)
    metrics = summarize(items, answers[:n_in])
    metrics["abstain_rate"] = round(sum(abstained[:n_in]) / n_in, 4)
    metrics["answered_correctly"] = round(sum(
        1 for it, a, x in zip(items, answers, abstained) if it.must_contain and not x
        and contains_all(a.text, it.must_contain)) / max(1, sum(1 for it in items if it.must_contain)), 4)
    return metrics


def _answer_records(items, oos, texts: dict, read: list, judgements, above, hits_of, *, k: int) -> dict:
    """Every answer of every mode with its confidence and the threshold it was judged by, for analyses: the
    grounded citation's probabilities and which retrieved examples hold the right answer (precision and coverage
    of "I don't know"; bench/answer_rules.py replays the answer rules on them)."""
    n_in = len(items)

    def record(i: int, question: str) -> dict:
        r = read[i] if read else None
        confidence, threshold = judgements[i]
        return {"question": question, "confidence": confidence, "threshold": threshold, "no_answer_above": above[i],
                **{m: v[i] for m, v in texts.items()},
                "choice_probability": {m: (r.choice_probability if m == "grounded" and r else None) for m in texts},
                "no_answer_probability": {"grounded": r.no_answer_probability} if r else {},
                "citation": {str(d): round(p, 4) for d, p in r.choice.items()} if r and r.choice else None,
                "hit_scores": [round(float(h.score), 4) for h in hits_of[i][:k]]}

    out = {"answers": [{**record(i, it.question), "reference": it.answer,
                        "hits_correct": [bool(it.must_contain) and contains_all(h.answer, it.must_contain)
                                         for h in hits_of[i][:k]]} for i, it in enumerate(items)]}
    if oos:
        out["out_of_scope_answers"] = [record(n_in + j, q) for j, q in enumerate(oos)]
    return out


def markdown_table(result: dict) -> str:
    """The comparison as a markdown table: % correct, quality, stopping, response time."""
    oos = result.get("out_of_scope") or {}
    header = ("| mode | correct | token F1 | ROUGE-L | ended by itself | first token | tokens/s | says \"don't know\" |"
              + (" out of scope: \"don't know\" |" if oos else ""))
    lines = [header, "|" + "---|" * (9 if oos else 8)]
    for mode, m in result["modes"].items():
        acc = "n/a" if m["accuracy"] is None else f"{m['accuracy'] * 100:.0f}%"
        line = (f"| {mode} | {acc} | {m['f1']:.2f} | {m['rouge_l']:.2f} | {m['stop_rate'] * 100:.0f}% "
                f"| {m['ttft_ms']:.0f} ms | {m['tokens_per_s']:.1f} | {m.get('abstain_rate', 0) * 100:.0f}% |")
        if oos:
            line += f" {oos[mode]['abstain_rate'] * 100:.0f}% |"
        lines.append(line)
    tail = f"\n\n{result['n']} questions"
    if oos:
        tail += f", {result['n_out_of_scope']} out of scope"
    if result.get("retrieval"):
        tail += "; retrieval " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in result["retrieval"].items())
    return "\n".join(lines) + tail + "."
