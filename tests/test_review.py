"""Review functions shared by the bot and the CLI."""

import pytest

from storage.errors import DuplicateExample, InvalidValue
from tuning.data.mutate import mutate_assistant
from tuning.data.review import (approve_all_in_run, approve_variation, edit_variation, next_pending, parent_of,
                           reject_variation, review_progress)


@pytest.fixture
def run(store, assistant):
    store.add_example(assistant.id, "How long does delivery to Berlin take?", "Two days.")
    store.add_example(assistant.id, "Can I pay by card?", "Yes, Visa and Mastercard.")
    return mutate_assistant(store, assistant.id, per_example=3, seed=1)


def test_queue_order_skip_and_progress(store, assistant, run):
    first = next_pending(store, assistant.id)
    assert first is not None and first.status == "pending" and first.generation_run_id == run.id
    assert parent_of(store, first).question == "How long does delivery to Berlin take?"
    second = next_pending(store, assistant.id, after_id=first.id)
    assert second.id > first.id
    assert review_progress(store, assistant.id) == (0, 6)
    approve_variation(store, first.id, by=1)
    reject_variation(store, second.id, by=1)
    assert review_progress(store, assistant.id, run.id) == (2, 6)
    assert store.get_example(first.id).status == "approved" and store.get_example(first.id).reviewer_id == 1
    assert store.get_example(second.id).status == "rejected"
    assert next_pending(store, assistant.id).id not in (first.id, second.id)


def test_edit_keeps_history_and_approves(store, assistant, run):
    ex = next_pending(store, assistant.id, run_id=run.id)
    edited = edit_variation(store, ex.id, question="How many days to Berlin?", by=2)
    assert edited.question == "How many days to Berlin?" and edited.status == "approved"
    assert [r.action for r in store.example_history(ex.id)] == ["create", "edit", "approved"]
    assert store.example_history(ex.id)[0].question == ex.question
    with pytest.raises(InvalidValue):
        edit_variation(store, ex.id, question="  ")
    with pytest.raises(DuplicateExample):
        edit_variation(store, next_pending(store, assistant.id).id, question="can i pay by card")


def test_approve_all_in_run(store, assistant, run):
    reject_variation(store, next_pending(store, assistant.id).id)
    assert approve_all_in_run(store, run.id, by=1) == 5
    assert next_pending(store, assistant.id) is None
    assert review_progress(store, assistant.id, run.id) == (6, 6)
    assert store.count_examples(assistant.id, status="approved") == 7
    assert approve_all_in_run(store, run.id) == 0
