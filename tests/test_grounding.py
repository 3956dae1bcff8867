"""Grounded rows and answers: the context, the citation target, reading the citation back, streaming without it."""

from __future__ import annotations

import math

import pytest

from tuning.dataset import TrainItem
from tuning.grounding import (NO_ANSWER, CitationFilter, Grounding, calibrate_threshold, cited, grounded_items,
                              read_grounded, render_question, training_index)
from tuning.retrieval import Hit


def facts(n: int, variations: int = 2) -> list[TrainItem]:
    items = []
    for i in range(n):
        items.append(TrainItem(f"When does depot {i} open?", f"Depot {i} opens at {7 + i % 5}:{i:02d}.", group=str(i)))
        for v in range(variations):
            items.append(TrainItem(f"depot {i} opening time{'?' * (v + 1)}", items[-1 - v].answer, group=str(i),
                                   variation=True))
    return items


def hit(i: int, answer: str, question: str = "q") -> Hit:
    return Hit(key=str(i), question=question, answer=answer, group=str(i), score=0.5)


def test_grounded_rows_cite_the_gold_example_or_say_they_do_not_know():
    train = facts(12)
    rows, val = grounded_items(train, train[:3], training_index(train), k=3, seed=1)
    grounded, closed = rows[:len(train)], rows[len(train):]
    assert [r.question for r in closed] == [i.question for i in train if not i.variation]  # closed book, once
    assert [r.answer for r in closed] == [i.answer for i in train if not i.variation]
    with_gold = 0
    for row, item in zip(grounded, train):
        assert row.question.startswith("Reference examples:\n[1] Q: ") and row.question.endswith(
            f"Question: {item.question}")
        assert row.question.count("\nA: ") == 3
        if row.answer.startswith("[0] "):
            assert row.answer == f"[0] {NO_ANSWER}" and item.answer not in row.question  # gold left out
        else:
            with_gold += 1
            position = int(row.answer[1])
            assert row.answer == cited(item.answer, position)
            ref = row.question.split(f"[{position}] Q: ")[1].split("\n[")[0]
            assert f"A: {item.answer}" in ref  # the cited example is the item's own fact
            # its own wording is not the one shown when another wording of the fact exists
            assert f"Q: {item.question}\n" not in row.question
    assert 0.6 <= with_gold / len(grounded) <= 0.95  # ~80% of rows hold the gold example
    assert all(not v.answer.startswith("[0]") for v in val)  # validation always can find it


def test_read_grounded_strips_the_citation_and_snaps_near_copies():
    hits = [hit(1, "The service code for Rypru cleaning is CF-6858."), hit(2, "Depot 2 opens at 9:00.")]
    read = read_grounded("[1] The service code for Rypru cleaning is C-6858.", hits, [-0.01, -0.2, -0.01, -1.0])
    assert read.text == "The service code for Rypru cleaning is CF-6858." and read.cited == 0  # verbatim source
    assert read.choice_probability == pytest.approx(math.exp(-0.2))
    assert read_grounded("[2] It opens at nine, Monday to Friday.", hits).text == "It opens at nine, Monday to Friday."
    assert read_grounded(f"[0] {NO_ANSWER}", hits).abstained
    assert read_grounded("[7] Something.", hits).abstained  # cites an example that is not there
    plain = read_grounded("Depot 2 opens at 9:00.", hits)
    assert plain.cited is None and not plain.abstained and plain.text == "Depot 2 opens at 9:00."


@pytest.mark.parametrize("pieces, shown", [
    (["[", "2", "]", " Depot", " 2 opens."], " Depot 2 opens."),
    (["[2] Depot 2", " opens."], "Depot 2 opens."),
    (["[0]", " I don't", " know."], ""),
    (["Depot", " 2 opens."], "Depot 2 opens."),
    (["[", "x] odd"], "[x] odd"),
])
def test_citation_filter_streams_only_the_answer(pieces, shown):
    f = CitationFilter()
    assert "".join(f.feed(p) for p in pieces).strip() == shown.strip()


def test_render_question_and_grounding_file(tmp_path):
    assert render_question("q?", []) == "q?"
    text = render_question("q?", [hit(1, "A one.", "Q one?"), hit(2, "A two.", "Q two?")])
    assert text == "Reference examples:\n[1] Q: Q one?\nA: A one.\n[2] Q: Q two?\nA: A two.\n\nQuestion: q?"
    assert Grounding.load(tmp_path).recipe == "closed"  # an adapter from before grounding answers closed book
    Grounding(recipe="grounded", k=4, threshold=0.05, calibrated_on=9).save(tmp_path)
    assert Grounding.load(tmp_path) == Grounding(recipe="grounded", k=4, threshold=0.05, calibrated_on=9)


def test_calibrated_threshold_sits_below_the_in_scope_questions():
    scores = [0.3, 0.25, 0.5, 0.1, 0.4]
    assert calibrate_threshold(scores) == pytest.approx(0.05)
    assert all(s > calibrate_threshold(scores) for s in scores)
    assert calibrate_threshold([]) > 0


def test_training_calibrates_both_thresholds_and_saves_the_index(tiny_model_dir, tmp_path):
    from tuning.retrieval import Retriever
    from tuning.train import TrainConfig, train

    report = train(facts(6, 3), out_dir=tmp_path, config=TrainConfig(base_model=tiny_model_dir, epochs=1))
    grounding = Grounding.load(tmp_path)
    assert grounding.recipe == "grounded" and grounding.calibrated_on == report.counts["val"] > 0
    assert 0 < grounding.threshold < 1 and 0 <= grounding.min_choice_probability <= 0.7
    assert report.hyperparameters["recipe"] == "grounded" and report.counts["train_rows"] > report.counts["train"]
    assert len(Retriever.load(tmp_path / "retrieval")) == report.counts["train"]
    closed = train(facts(6, 3), out_dir=tmp_path / "closed",
                   config=TrainConfig(base_model=tiny_model_dir, epochs=1, recipe="closed"))
    assert Grounding.load(tmp_path / "closed").recipe == "closed"
    assert closed.counts["train_rows"] == closed.counts["train"]


def test_citation_probability_is_the_models_choice(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning.grounding import citation_probabilities

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = facts(4, 1)
    _, val = grounded_items(train, train[:3], training_index(train), k=3)
    probs = citation_probabilities(model, tok, val, system_prompt="", device="cpu")
    assert len(probs) == 3 and all(0 < p < 1 for p in probs)
