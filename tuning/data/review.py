"""Reviewing generated examples: next pending one, approve, reject, edit, bulk-approve a run (bot and CLI)."""

from __future__ import annotations

from storage.errors import InvalidValue
from storage.records import Example


def pending_examples(store, assistant_id: int, *, run_id: int | None = None) -> list[Example]:
    """Every live pending example of the assistant (of one generation run when given), oldest first."""
    return store.list_examples(assistant_id, status="pending", generation_run_id=run_id)


def next_pending(store, assistant_id: int, *, run_id: int | None = None, after_id: int | None = None) -> Example | None:
    """The oldest pending example (after `after_id`, so that "skip" moves on), or None when the queue is done."""
    for ex in pending_examples(store, assistant_id, run_id=run_id):
        if after_id is None or ex.id > after_id:
            return ex
    return None


def parent_of(store, example: Example) -> Example | None:
    """The example a variation was made from (None for a root or a deleted parent)."""
    if example.parent_id is None:
        return None
    try:
        return store.get_example(example.parent_id)
    except Exception:
        return None


def approve_variation(store, example_id: int, *, by: int | None = None) -> Example:
    """Approve one example: it goes into the next training run."""
    return store.approve(example_id, by=by)


def reject_variation(store, example_id: int, *, by: int | None = None) -> Example:
    """Reject one example: it stays (so it is not proposed again) but never trains."""
    return store.reject(example_id, by=by)


def edit_variation(store, example_id: int, *, question: str | None = None, answer: str | None = None,
                   by: int | None = None, approve: bool = True) -> Example:
    """Fix the text of a variation (history kept) and, by default, approve it."""
    if not (question and question.strip()) and not (answer and answer.strip()):
        raise InvalidValue("nothing to change: give a new question or a new answer")
    store.edit_example(example_id, question=question, answer=answer, by=by)
    return store.approve(example_id, by=by) if approve else store.get_example(example_id)


def approve_all_in_run(store, run_id: int, *, by: int | None = None) -> int:
    """Approve every still-pending example of a generation run; returns how many."""
    run = store.get_generation_run(run_id)
    count = 0
    for ex in pending_examples(store, run.assistant_id, run_id=run_id):
        store.approve(ex.id, by=by)
        count += 1
    store.audit("review.approve_run", user_id=by, assistant_id=run.assistant_id,
                details={"run_id": run_id, "approved": count})
    return count


def review_progress(store, assistant_id: int, run_id: int | None = None) -> tuple[int, int]:
    """(reviewed, total) over generated examples (source synthetic or document; of one run when given)."""
    if run_id is not None:
        examples = store.list_examples(assistant_id, generation_run_id=run_id)
    else:
        examples = [ex for ex in store.list_examples(assistant_id) if ex.generation_run_id is not None]
    reviewed = sum(ex.status != "pending" for ex in examples)
    return reviewed, len(examples)
