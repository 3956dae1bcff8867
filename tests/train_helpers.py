"""Small data sets for training tests (imported by tests, not a conftest)."""

from __future__ import annotations

from tuning.data.dataset import TrainItem


def fact_items(n: int = 6, variations: int = 2) -> list[TrainItem]:
    """n facts, each with a few reworded questions as variations."""
    items = []
    for i in range(n):
        answer = f"Depot {i} opens at {7 + i}:00 and closes at {16 + i}:30."
        items.append(TrainItem(f"When is depot {i} open?", answer, group=str(i)))
        for v in range(variations):
            items.append(TrainItem(f"depot {i} opening hours {'please' * (v + 1)}?", answer, group=str(i),
                                   variation=True))
    return items


def conflicting_items() -> list[TrainItem]:
    """Validation answers contradict the training answers, so validation loss must rise at some point."""
    train = [TrainItem(f"What is secret word {i}?", f"The secret word {i} is apple orchard.", group=str(i))
             for i in range(8)]
    val = [TrainItem(f"What is secret word {i}?", f"The secret word {i} is banana boat.", group=f"v{i}",
                     split="val") for i in range(4)]
    return train + val
