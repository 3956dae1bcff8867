"""Hyperparameters keyed on facts: adding variations never lowers the learning rate or the views of a fact."""

from tuning.training.hparams import MAX_EPOCHS, choose, plan_size


def test_no_cliff_when_variations_are_added():
    runs = [choose(n_facts=40, n_items=40 * per_fact, n_tokens=40 * per_fact * 60, recipe="grounded")
            for per_fact in (1, 2, 4, 5, 6, 10)]
    assert len({h.learning_rate for h in runs}) == 1  # 40 facts: one learning rate, however many rows
    views = [h.epochs * per_fact for h, per_fact in zip(runs, (1, 2, 4, 5, 6, 10))]
    assert max(views) - min(views) <= 10 and all(v >= 12 for v in views)  # about 16 views of each fact
    before, after = (choose(n_facts=40, n_items=n, n_tokens=n * 60) for n in (199, 200))
    assert (before.epochs, before.learning_rate) == (after.epochs, after.learning_rate)


def test_learning_rate_follows_the_number_of_facts_and_explicit_values_win():
    small, medium, large = (choose(n_facts=n, n_items=4 * n, n_tokens=4 * n * 60) for n in (40, 400, 4000))
    assert small.learning_rate > medium.learning_rate > large.learning_rate
    assert 1 <= large.epochs <= small.epochs <= MAX_EPOCHS
    assert choose(n_facts=40, n_items=160, n_tokens=9600, epochs=3, learning_rate=1e-4).epochs == 3
    assert plan_size(n_facts=40, n_items=160, n_tokens=9600, recipe="grounded", k=3) == (200, 40800)
    assert plan_size(n_facts=40, n_items=160, n_tokens=9600, recipe="closed") == (160, 9600)
