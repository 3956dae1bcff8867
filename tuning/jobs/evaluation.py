"""What a training job evaluates its version on, and how an answer is judged right."""

from __future__ import annotations

# Summary numbers copied from an evaluation mode into a version's metrics.
EVAL_KEYS = ("accuracy", "f1", "rouge_l", "stop_rate", "ttft_ms", "tokens_per_s")


def eval_summary(modes: dict, mode: str) -> dict:
    return {k: modes.get(mode, {}).get(k) for k in EVAL_KEYS if modes.get(mode, {}).get(k) is not None}


def test_item(example) -> dict:
    return {"question": example.question, "answer": example.answer, "must_contain": example.must_contain}


# Held-out questions evaluated after a run without test items (each costs one answer per mode).
EVAL_MAX_ITEMS = 40
# Without must_contain words, an answer counts as correct when its token F1 with the expert's answer reaches this.
CLOSE_ENOUGH_F1 = 0.5
EXAMPLE_CHARS = 300


def eval_items(items: list, test_items: list[dict], config, *, limit: int = EVAL_MAX_ITEMS) -> tuple[list[dict], str]:
    """The questions a run is evaluated on and what they are: "test" (experts marked them), "variations"
    (held-out variations of trained examples), "examples" (held-out examples), or "none" (too few to hold out).

    Held-out ones are exactly the validation split that train() keeps out of training (same split, same seed).
    """
    if test_items:
        return test_items, "test"
    import random

    from tuning.data.dataset import split_items

    splits = split_items(items, val_share=config.val_share, seed=config.seed)
    held = list(splits.val)
    if not held:
        return [], "none"
    if len(held) > limit:
        held = random.Random(config.seed).sample(held, limit)
    kind = "variations" if any(i.variation for i in held) else "examples"
    return [{"question": i.question, "answer": i.answer, "must_contain": None} for i in held], kind


def is_correct(answer: str, item: dict) -> bool:
    """must_contain words when the item has them, else close enough to the expert's answer."""
    from tuning.evaluate import contains_all, token_f1

    if item.get("must_contain"):
        return contains_all(answer, item["must_contain"])
    return token_f1(answer, item["answer"]) >= CLOSE_ENOUGH_F1


def judge(evaluation: dict, items: list[dict]) -> dict:
    """Correct answers per mode ({mode: count}); modes without must_contain accuracy get this one."""
    answers = evaluation.get("answers") or []
    correct = {}
    for mode, metrics in evaluation["modes"].items():
        correct[mode] = sum(is_correct(a.get(mode) or "", it) for a, it in zip(answers, items))
        if metrics.get("accuracy") is None and answers:
            metrics["accuracy"] = round(correct[mode] / len(answers), 4)
            metrics["judged_by"] = "answer_overlap"
    return correct


def before_after_examples(evaluation: dict, items: list[dict], *, after: str, n: int = 2) -> list[dict]:
    """Up to n questions with the untrained model's answer and this version's: fixed ones first."""
    rows = []
    for a, it in zip(evaluation.get("answers") or [], items):
        before_ok, after_ok = is_correct(a.get("base") or "", it), is_correct(a.get(after) or "", it)
        rows.append(((after_ok and not before_ok), after_ok, {
            "question": it["question"][:EXAMPLE_CHARS], "expected": it["answer"][:EXAMPLE_CHARS],
            "before": (a.get("base") or "")[:EXAMPLE_CHARS], "after": (a.get(after) or "")[:EXAMPLE_CHARS],
            "before_correct": before_ok, "after_correct": after_ok}))
    rows.sort(key=lambda r: (not r[0], not r[1]))  # stable: keeps the evaluation's order within each kind
    return [r[2] for r in rows[:n]]
