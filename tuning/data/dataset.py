"""Training data: items from the store, splits that measure recall, chat rendering, padding-free packing."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from tuning.prompts import build_messages, render_chat

IGNORE = -100


@dataclass(frozen=True)
class TrainItem:
    """One question-answer pair; variations share the group (the root example id) of their example."""

    question: str
    answer: str
    group: str
    variation: bool = False
    split: str = "train"
    example_id: int | None = None  # the stored example (None for items from a file)


@dataclass(frozen=True)
class Splits:
    """Train/validation/test items; val_kind says what validation measures: recall, style or none."""

    train: list[TrainItem]
    val: list[TrainItem]
    test: list[TrainItem]
    val_kind: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of one rendered example and its labels (IGNORE outside the answer)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class PackedRow:
    """Several examples in one row; position ids restart at 0 for each, so none attends to another."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    n_examples: int

    def tensors(self, device=None) -> dict:
        import torch

        def t(values):
            return torch.tensor([values], dtype=torch.long, device=device)

        return {"input_ids": t(self.input_ids), "labels": t(self.labels), "position_ids": t(self.position_ids)}


def items_from_store(store, assistant_id: int) -> list[TrainItem]:
    """Approved live examples; a variation's group is its root example id, so splits keep families together."""
    examples = store.list_examples(assistant_id, status="approved")
    parents = {ex.id: ex.parent_id for ex in store.list_examples(assistant_id)}

    def root(ex_id: int) -> int:
        seen = set()
        while parents.get(ex_id) is not None and ex_id not in seen:
            seen.add(ex_id)
            ex_id = parents[ex_id]
        return ex_id

    return [TrainItem(question=ex.question, answer=ex.answer, group=str(root(ex.id)),
                      variation=ex.parent_id is not None, split=ex.split, example_id=ex.id) for ex in examples]


def items_from_pairs(pairs: Iterable[tuple[str, str]], *, split: str = "train") -> list[TrainItem]:
    """Items for plain pairs (a file without variations): each pair is its own group."""
    return [TrainItem(question=q, answer=a, group=f"p{i}", split=split) for i, (q, a) in enumerate(pairs)]


def data_hash(items: Sequence[TrainItem], *, system_prompt: str = "") -> str:
    """A short stable hash of the training data (order-independent)."""
    rows = sorted(json.dumps([i.question, i.answer, i.group, i.variation, i.split], ensure_ascii=False)
                  for i in items)
    digest = hashlib.sha256(system_prompt.encode())
    for row in rows:
        digest.update(row.encode())
    return digest.hexdigest()[:16]


def split_items(items: Sequence[TrainItem], *, val_share: float = 0.2, seed: int = 0,
                min_style_items: int = 5) -> Splits:
    """Test groups are never trained on; val holds out a share of each example's variations (recall),
    or, without variations, a share of the examples (style)."""
    rng = random.Random(seed)
    test_groups = {i.group for i in items if i.split == "test"}
    test = [i for i in items if i.group in test_groups]
    rest = [i for i in items if i.group not in test_groups]
    val = [i for i in rest if i.split == "val"]  # marked by an expert
    pool = [i for i in rest if i.split != "val"]

    groups: dict[str, list[TrainItem]] = {}
    for item in pool:
        groups.setdefault(item.group, []).append(item)
    has_variations = any(i.variation for i in pool)
    if has_variations and val_share > 0:
        families = {g: [i for i in groups[g] if i.variation] for g in sorted(groups)}
        for variations in families.values():
            rng.shuffle(variations)
        # floor(share) of each family's variations, then single extra ones from random families until the
        # total is round(share * all variations): small families (1-2 variations) also contribute.
        counts = {g: int(val_share * len(v)) for g, v in families.items()}
        target = max(1, round(val_share * sum(len(v) for v in families.values())))
        spare = [g for g, v in families.items() if len(v) > counts[g]]
        rng.shuffle(spare)
        for g in spare[:max(0, target - sum(counts.values()))]:
            counts[g] += 1
        held = [i for g, v in families.items() for i in v[:counts[g]]]
        held_ids = {id(i) for i in held}
        train = [i for i in pool if id(i) not in held_ids]
        return Splits(train=train, val=val + held, test=test, val_kind="recall")
    if val_share > 0 and len(groups) >= min_style_items:
        names = sorted(groups)
        rng.shuffle(names)
        n = max(1, round(val_share * len(names)))
        held_groups = set(names[:n])
        train = [i for i in pool if i.group not in held_groups]
        return Splits(train=train, val=val + [i for i in pool if i.group in held_groups], test=test,
                      val_kind="style")
    return Splits(train=pool, val=val, test=test, val_kind="recall" if val else "none")


def encode_item(tokenizer, question: str, answer: str, *, system_prompt: str = "",
                max_tokens: int = 1024) -> Encoded:
    """Render with the chat template; labels only on the answer tokens and the end-of-turn token."""
    messages = build_messages(question, system_prompt=system_prompt)
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    full = render_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}])
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to plain concatenation
        full = prompt + answer + (tokenizer.eos_token or "")
    # The prompt is tokenized on its own, exactly as at inference time (tuning.prompts.encode_prompt).
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in completion_ids:
        completion_ids = completion_ids[:completion_ids.index(eos) + 1]  # nothing after the end-of-turn
    elif eos is not None:
        completion_ids = completion_ids + [eos]
    room = max_tokens - len(prompt_ids)
    if room < 2:
        prompt_ids = prompt_ids[-(max_tokens // 2):]
        room = max_tokens - len(prompt_ids)
    completion_ids = completion_ids[:room]
    return Encoded(input_ids=prompt_ids + completion_ids,
                   labels=[IGNORE] * len(prompt_ids) + list(completion_ids))


def encode_items(tokenizer, items: Sequence[TrainItem], *, system_prompt: str = "",
                 max_tokens: int = 1024) -> list[Encoded]:
    return [encode_item(tokenizer, i.question, i.answer, system_prompt=system_prompt, max_tokens=max_tokens)
            for i in items]


def pack(encoded: Sequence[Encoded], *, batch_tokens: int, order: Sequence[int] | None = None) -> list[PackedRow]:
    """Fill rows of at most batch_tokens tokens, in the given order, with no padding at all."""
    rows: list[PackedRow] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    count = 0
    for index in (order if order is not None else range(len(encoded))):
        enc = encoded[index]
        if ids and len(ids) + len(enc.input_ids) > batch_tokens:
            rows.append(PackedRow(ids, labels, positions, count))
            ids, labels, positions, count = [], [], [], 0
        ids.extend(enc.input_ids)
        labels.extend(enc.labels)
        positions.extend(range(len(enc.input_ids)))
        count += 1
    if ids:
        rows.append(PackedRow(ids, labels, positions, count))
    return rows


def epoch_rows(encoded: Sequence[Encoded], *, batch_tokens: int, seed: int, epoch: int) -> list[PackedRow]:
    """The rows of one epoch: a shuffle that depends only on (seed, epoch), so a resumed run sees the same."""
    order = list(range(len(encoded)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return pack(encoded, batch_tokens=batch_tokens, order=order)


def add_mutations(items: Sequence[TrainItem], *, n: int, seed: int = 0) -> list[TrainItem]:
    """Items plus n mutated questions (typos, layout, …) per non-test example, as variations of it."""
    from tuning.data.mutate import mutate

    out = list(items)
    for item in items:
        if item.variation or item.split == "test" or n <= 0:
            continue
        for m in mutate(item.question, n=n, seed=seed):
            out.append(TrainItem(question=m.text, answer=item.answer, group=item.group, variation=True,
                                 split=item.split))
    return out
