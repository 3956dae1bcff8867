"""What is sent to the larger model and read back: the prompts of each method (with their JSON schemas), the
parsing of its replies, and the estimate of a run's tokens shown before it starts."""

from __future__ import annotations

import json
import re
from typing import Any

LANGUAGE_NAMES = {"en": "English", "ru": "Russian"}
class BadOutput(Exception):
    """The model answered, but not with usable JSON (or with nothing)."""


SHOTS = 5  # examples per "new pairs" prompt
CHUNK_CHARS = 2000  # characters of a document per prompt


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
def questions_schema(k: int) -> dict:
    """At most k short strings: a grammar-constrained server cannot then ramble until max_tokens cuts the JSON."""
    items = {"type": "string", "minLength": 3, "maxLength": 300}
    return {"type": "object", "properties": {"questions": {"type": "array", "items": items, "minItems": 1,
                                                           "maxItems": k}}, "required": ["questions"]}


def pairs_schema(k: int) -> dict:
    text = {"type": "string", "minLength": 2, "maxLength": 1000}
    pair = {"type": "object", "properties": {"question": text, "answer": text}, "required": ["question", "answer"]}
    return {"type": "object", "properties": {"pairs": {"type": "array", "items": pair, "minItems": 1,
                                                       "maxItems": k}}, "required": ["pairs"]}


SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]}


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


def estimate_tokens(store, assistant_id: int, *, method: str, per_example: int, document_id: int | None = None,
                    judge: bool = False, shots: int = SHOTS, chunk_chars: int = CHUNK_CHARS) -> int:
    """Tokens a run of generate() will use: the prompts it will send (the same batches of `shots` examples and
    document chunks), and answers about as long as the items asked for. Shown before a run, with its cost."""
    from tuning.data.importing import estimate_tokens as tokens

    def prompt(messages: list[dict]) -> int:
        return sum(tokens(m["content"]) + 4 for m in messages)

    roots = store.list_examples(assistant_id, status="approved", roots_only=True)
    total = 0
    if method == "paraphrase":
        for ex in roots:
            total += prompt(paraphrase_messages(ex.question, ex.answer, k=per_example, language="en"))
            total += per_example * (tokens(ex.question) + 6) + 8
            if judge:
                total += per_example * (prompt(judge_messages(ex.question, ex.question, answer=ex.answer))
                                        + 8)
    elif method == "new":
        for start in range(0, len(roots), shots):
            group = [(ex.question, ex.answer) for ex in roots[start:start + shots]]
            total += prompt(new_pairs_messages(group, k=per_example, language="en"))
            total += per_example * (sum(tokens(q) + tokens(a) for q, a in group) // len(group) + 12) + 8
    elif method == "document":
        from tuning.data.documents import chunk_spans

        for chunk in chunk_spans(store.get_document(document_id).text, max_chars=chunk_chars):
            total += prompt(document_messages(chunk.text, k=per_example, language="en"))
            total += per_example * 60 + 8  # a question and a short answer quoted from the text
    return total
