"""Dataset building: chat rendering with answer-only labels, splits, padding-free packing."""

from __future__ import annotations

import pytest

from tuning.data.dataset import (IGNORE, TrainItem, add_mutations, data_hash, encode_item, items_from_store, pack,
                            split_items)
from tuning.prompts import DEFAULT_SYSTEM_PROMPT, build_messages


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def family(group: str, n_variations: int, *, split: str = "train") -> list[TrainItem]:
    root = TrainItem(f"question {group}?", f"answer {group}.", group=group, split=split)
    return [root] + [TrainItem(f"question {group} v{i}?", f"answer {group}.", group=group, variation=True, split=split)
                     for i in range(n_variations)]


def test_build_messages_always_has_a_system_message():
    assert build_messages("Q?")[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    msgs = build_messages("Q?", system_prompt="Be ACME.", fewshot=[("a?", "A."), ("b?", "B.")])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == "Be ACME." and msgs[-1]["content"] == "Q?"


def test_labels_mask_the_prompt_and_keep_answer_plus_end_of_turn(tokenizer):
    enc = encode_item(tokenizer, "Where is the depot?", "The depot is in Utrecht.", system_prompt="You are ACME.")
    assert len(enc.input_ids) == len(enc.labels)
    first = next(i for i, x in enumerate(enc.labels) if x != IGNORE)
    assert all(x == IGNORE for x in enc.labels[:first])
    assert all(x != IGNORE for x in enc.labels[first:])  # nothing masked after the answer starts
    assert enc.labels[first:] == enc.input_ids[first:]
    assert tokenizer.decode(enc.labels[first:]) == "The depot is in Utrecht.<|im_end|>"
    prompt = tokenizer.decode(enc.input_ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are ACME." in prompt and "Where is the depot?" in prompt
    assert "SmolLM" not in tokenizer.decode(encode_item(tokenizer, "q", "a").input_ids)


def test_prompt_tokens_match_what_inference_feeds(tokenizer):
    from tuning.prompts import encode_prompt

    enc = encode_item(tokenizer, "Hours on Sunday?", "Closed.", system_prompt="S")
    prompt_ids = encode_prompt(tokenizer, build_messages("Hours on Sunday?", system_prompt="S"))[0].tolist()
    assert enc.input_ids[:len(prompt_ids)] == prompt_ids


def test_pack_fills_rows_without_padding_and_restarts_positions(tokenizer):
    encoded = [encode_item(tokenizer, f"q{i}?" + " more" * i, "a" * (i + 1)) for i in range(6)]
    rows = pack(encoded, batch_tokens=90)
    assert sum(r.n_examples for r in rows) == 6
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in encoded)
    for row in rows:
        assert len(row.input_ids) <= 90 or row.n_examples == 1
        assert row.position_ids.count(0) == row.n_examples
        assert len(row.position_ids) == len(row.input_ids) == len(row.labels)


def test_validation_holds_out_a_share_of_each_examples_variations():
    items = family("1", 5) + family("2", 5) + family("3", 0)
    splits = split_items(items, val_share=0.2, seed=0)
    assert splits.val_kind == "recall"
    assert splits.val and all(i.variation for i in splits.val)
    trained_roots = {i.group for i in splits.train if not i.variation}
    assert trained_roots == {"1", "2", "3"}  # every example itself is trained on
    for group in ("1", "2"):
        held = [i for i in splits.val if i.group == group]
        assert len(held) == 1  # 20% of 5 variations
        assert any(i.group == group and i.variation for i in splits.train)  # its other variations are trained
    assert not {i.question for i in splits.val} & {i.question for i in splits.train}


def test_without_variations_validation_holds_out_examples_and_says_style():
    items = [TrainItem(f"q{i}?", f"a{i}.", group=str(i)) for i in range(10)]
    splits = split_items(items, val_share=0.2)
    assert splits.val_kind == "style"
    assert len(splits.val) == 2 and len(splits.train) == 8
    tiny = split_items(items[:3], val_share=0.2)
    assert tiny.val_kind == "none" and len(tiny.train) == 3


def test_test_questions_and_their_variations_never_reach_training():
    test_root = TrainItem("secret test question?", "secret.", group="t", split="test")
    test_variation = TrainItem("secret test qestion", "secret.", group="t", variation=True)  # split not marked
    items = family("1", 4) + family("2", 4) + [test_root, test_variation]
    splits = split_items(items, val_share=0.5)
    assert set(splits.test) == {test_root, test_variation}
    assert all(i.group != "t" for i in splits.train + splits.val)


def test_items_from_store_keeps_families_and_only_approved_live_examples(store, assistant):
    root = store.add_example(assistant.id, "How much is a small parcel?", "€4.90.")
    para = store.add_example(assistant.id, "Price of a small parcel?", "€4.90.", source="synthetic",
                             parent_id=root.id, method="paraphrase")
    store.add_example(assistant.id, "Small parcel cost?", "€4.90.", source="synthetic", parent_id=para.id,
                      method="mutation:typo")
    store.add_example(assistant.id, "Pending one?", "x", status="pending", parent_id=root.id)
    gone = store.add_example(assistant.id, "Deleted one?", "y")
    store.delete_example(gone.id)
    store.add_example(assistant.id, "Test one?", "z", split="test")
    items = items_from_store(store, assistant.id)
    assert [i.question for i in items] == ["How much is a small parcel?", "Price of a small parcel?",
                                           "Small parcel cost?", "Test one?"]
    assert {i.group for i in items[:3]} == {str(root.id)}
    assert [i.variation for i in items] == [False, True, True, False]
    assert items[3].split == "test"


def test_add_mutations_adds_variations_in_the_same_group():
    items = [TrainItem("How much does a medium parcel cost?", "€7.50.", group="g1"),
             TrainItem("Test question here?", "x", group="g2", split="test")]
    out = add_mutations(items, n=3, seed=0)
    new = out[2:]
    assert len(new) == 3 and all(i.variation and i.group == "g1" and i.answer == "€7.50." for i in new)
    assert data_hash(out) != data_hash(items) and data_hash(out) == data_hash(list(reversed(out)))
