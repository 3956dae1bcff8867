"""Before/after evaluation: base model, base model with few-shot examples, tuned model, side by side."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tuning.errors import ModelLoadError

MODES = ("base", "fewshot", "tuned")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class EvalItem:
    """A test question, its reference answer, and tokens a correct answer must contain."""

    question: str
    answer: str
    must_contain: tuple[str, ...] | None = None


def normalize(text: str) -> str:
    """Case-folded, non-breaking spaces as spaces, whitespace collapsed."""
    text = text.replace("\u00a0", " ").replace("\u202f", " ").replace("\u2009", " ")
    return " ".join(text.split()).casefold()


def contains_all(answer: str, must_contain: Sequence[str]) -> bool:
    norm = normalize(answer)
    return all(normalize(token) in norm for token in must_contain)


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common: dict[str, int] = {}
    for w in ref:
        common[w] = common.get(w, 0) + 1
    overlap = 0
    for w in pred:
        if common.get(w, 0) > 0:
            overlap += 1
            common[w] -= 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from the longest common subsequence of words."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def select_fewshot(question: str, pool: Sequence[tuple[str, str]], k: int = 8) -> list[tuple[str, str]]:
    """The k pairs whose question shares the most words with this one (Jaccard), most similar last."""
    target = set(words(question))

    def score(pair: tuple[str, str]) -> float:
        other = set(words(pair[0]))
        return len(target & other) / max(1, len(target | other))

    ranked = sorted(enumerate(pool), key=lambda ip: (score(ip[1]), -ip[0]), reverse=True)[:k]
    return [pair for _, pair in reversed(ranked)]


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


def evaluate(items: Sequence, *, base_model: str, adapter_dir=None, modes: Sequence[str] = MODES,
             fewshot: Sequence[tuple[str, str]] = (), system_prompt: str = "", cache_dir=None,
             max_new_tokens: int = 128, k: int = 8, include_answers: bool = False,
             on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """{"n", "modes": {mode: metrics}}; the tuned mode needs adapter_dir, fewshot needs example pairs."""
    import torch

    from tuning.generation import generate_answer
    from tuning.models import load_base_model
    from tuning.prompts import build_messages

    items = as_eval_items(items)
    if not items:
        raise ModelLoadError("no questions to evaluate")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ModelLoadError(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    if "tuned" in modes and not adapter_dir:
        raise ModelLoadError("the tuned mode needs a trained model folder (--model DIR)")
    if adapter_dir and not system_prompt:
        system_prompt = _trained_system_prompt(adapter_dir)
    model, tokenizer = load_base_model(base_model, cache_dir=cache_dir)
    model.eval()
    results: dict = {"n": len(items), "modes": {}}
    answers_by_mode: dict = {}

    def run(mode: str, model_for_mode) -> None:
        answers = []
        for i, it in enumerate(items):
            shots = select_fewshot(it.question, fewshot, k) if mode == "fewshot" else ()
            messages = build_messages(it.question, system_prompt=system_prompt, fewshot=shots)
            with torch.no_grad():
                answers.append(generate_answer(model_for_mode, tokenizer, messages, max_new_tokens=max_new_tokens))
            if on_progress:
                on_progress(mode, i + 1, len(items))
        results["modes"][mode] = summarize(items, answers)
        answers_by_mode[mode] = [a.text for a in answers]

    for mode in modes:
        if mode == "base":
            run("base", model)
        elif mode == "fewshot":
            if not fewshot:
                raise ModelLoadError("the fewshot mode needs example pairs (--fewshot-data FILE)")
            run("fewshot", model)
    if "tuned" in modes:
        folder = Path(adapter_dir)
        if (folder / "adapter_config.json").exists():
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(model, str(folder))
        elif (folder / "config.json").exists():  # full fine-tuning saved a whole model
            from transformers import AutoModelForCausalLM

            tuned = AutoModelForCausalLM.from_pretrained(str(folder))
        else:
            raise ModelLoadError(f"{folder} holds neither a LoRA adapter nor a model")
        tuned.eval()
        run("tuned", tuned)
    results["modes"] = {m: results["modes"][m] for m in modes if m in results["modes"]}
    if include_answers:
        results["answers"] = [{"question": it.question, "reference": it.answer,
                               **{m: answers_by_mode[m][i] for m in results["modes"]}}
                              for i, it in enumerate(items)]
    return results


def markdown_table(result: dict) -> str:
    """The comparison as a markdown table: % correct, quality, stopping, response time."""
    header = "| mode | correct | token F1 | ROUGE-L | ended by itself | first token | tokens/s |"
    lines = [header, "|" + "---|" * 7]
    for mode, m in result["modes"].items():
        acc = "n/a" if m["accuracy"] is None else f"{m['accuracy'] * 100:.0f}%"
        lines.append(f"| {mode} | {acc} | {m['f1']:.2f} | {m['rouge_l']:.2f} | {m['stop_rate'] * 100:.0f}% "
                     f"| {m['ttft_ms']:.0f} ms | {m['tokens_per_s']:.1f} |")
    return "\n".join(lines) + f"\n\n{result['n']} questions."
