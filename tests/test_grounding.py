"""Grounded rows and answers: the context, the citation target, reading the citation back, streaming without it."""

from __future__ import annotations

import math

import pytest

from tuning.data.dataset import TrainItem
from tuning.grounding import (DEFAULT_NO_ANSWER, NO_ANSWER, CitationFilter, Grounding, calibrate_no_answer,
                              calibrate_threshold, citation_choice, cited, decide_citation, grounded_items,
                              read_grounded, render_question, training_index, unanswerable_items)
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


def alternatives(**probs: float):
    """The engine's record of "[", then the number with these probabilities (d0=…, d1=…), then "]"."""
    step = sorted(((k[1:], math.log(p)) for k, p in probs.items()), key=lambda a: -a[1])
    return [(("[", -0.01), (" [", -5.0)), tuple(step) + ((" The", -6.0),), (("]", -0.01),)]


def test_citation_choice_reads_the_numbers_probabilities():
    choice = citation_choice(alternatives(d1=0.6, d0=0.3, d2=0.1), 3)
    assert choice == pytest.approx({0: 0.3, 1: 0.6, 2: 0.1, 3: 0.0})
    assert citation_choice(alternatives(d1=0.5, d9=0.5), 3) == pytest.approx({0: 0, 1: 1, 2: 0, 3: 0})  # no [9]
    assert citation_choice([(("The", -0.1),), (("depot", -0.2),)], 3) is None  # no citation
    assert citation_choice((), 3) is None  # an engine that reports no alternatives


def test_calibrated_no_answer_overrides_the_greedy_citation():
    hits = [hit(1, "Depot 1 opens at 8:00."), hit(2, "Depot 2 opens at 9:00."), hit(3, "Depot 3 opens at 7:00.")]
    # the model wrote [0], but with 0.4 against 0.5 for example 2: below a 0.6 threshold it answers example 2,
    # in the approved words (the model wrote none of its own)
    read = read_grounded(f"[0] {NO_ANSWER}", hits, alternatives=alternatives(d0=0.4, d2=0.5, d1=0.1),
                         no_answer_above=0.6)
    assert (read.abstained, read.cited, read.text) == (False, 1, "Depot 2 opens at 9:00.")
    assert read.choice_probability == pytest.approx(0.5) and read.no_answer_probability == pytest.approx(0.4)
    # the model cited [1], but [0] is at the threshold: "I don't know"
    read = read_grounded("[1] Depot 1 opens at 8:00.", hits, alternatives=alternatives(d1=0.3, d0=0.7),
                         no_answer_above=0.6)
    assert read.abstained and read.text == "" and read.cited is None
    # its own citation wins: its own words stay (unless they are a near-copy of the example)
    read = read_grounded("[3] At seven, every day.", hits, alternatives=alternatives(d3=0.9, d0=0.1),
                         no_answer_above=0.6)
    assert (read.cited, read.text) == (2, "At seven, every day.")
    # it leans to example 3 but is not sure (0.3 of its 0.55 for the examples): the retrieval's first example wins,
    # in its approved words, and streaming withholds the model's own words after [3]
    read = read_grounded("[3] At seven.", hits, alternatives=alternatives(d3=0.3, d1=0.25, d0=0.45),
                         no_answer_above=0.6)
    assert (read.abstained, read.cited, read.text) == (False, 0, "Depot 1 opens at 8:00.")
    assert decide_citation({0: 0.45, 1: 0.25, 2: 0.0, 3: 0.3}, 0.6) == 1
    assert decide_citation({0: 0.1, 1: 0.15, 2: 0.0, 3: 0.75}, 0.6) == 3  # 0.83 of the examples' share: its choice
    assert decide_citation({0: 0.1, 1: 0.2, 2: 0.0, 3: 0.7}, 0.6) == 1  # 0.78: not sure enough to leave the first
    # an adapter calibrated before the threshold existed: the greedy citation decides, as before
    assert read_grounded(f"[0] {NO_ANSWER}", hits, alternatives=alternatives(d0=0.4, d2=0.45)).abstained


def test_no_answer_threshold_separates_answerable_from_unanswerable():
    answerable = [0.01, 0.02, 0.05, 0.1, 0.3] * 4
    unanswerable = [0.5, 0.7, 0.8, 0.95, 0.25] * 4
    t = calibrate_no_answer(answerable, unanswerable)
    assert 0.3 < t <= 0.5  # all answerable answered, 4 of 5 unanswerable withheld
    assert sum(p >= t for p in answerable) == 0 and sum(p >= t for p in unanswerable) == 16
    # the same separation seen on 5 questions each could be chance: only a nearly certain [0] withholds
    assert calibrate_no_answer(answerable[:5], unanswerable[:5]) == 0.9
    assert calibrate_no_answer([], unanswerable) == DEFAULT_NO_ANSWER == calibrate_no_answer(answerable, [])
    assert 0.2 <= calibrate_no_answer([0.99], [0.999]) <= 0.9  # never outside its range
    # a model whose P([0]) does not tell them apart (untrained, random) says "I don't know" only when nearly sure
    assert calibrate_no_answer([0.3, 0.5, 0.7], [0.29, 0.49, 0.69]) == 0.9


def test_unanswerable_items_show_only_other_facts():
    train = facts(8)
    val = [i for i in train if i.variation][:4]
    for item, row in zip(val, unanswerable_items(val, training_index(train), k=3)):
        assert row.answer == f"[0] {NO_ANSWER}" and item.answer not in row.question
        assert row.question.count("\nA: ") == 3 and row.question.endswith(f"Question: {item.question}")


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


def test_citation_filter_withholds_the_words_of_a_citation_the_choice_rejects():
    asked = []

    def decide(number):
        asked.append(number)
        return number == 2

    assert CitationFilter(decide).feed("[2] Depot 2 opens.") == "Depot 2 opens."
    f = CitationFilter(decide)
    assert "".join(f.feed(p) for p in ["[", "1", "]", " Depot", " 1."]) == ""  # the final text comes instead
    f = CitationFilter(decide)
    assert "".join(f.feed(p) for p in ["[0]", " I don't know."]) == ""
    assert asked == [2, 1, 0]  # asked once per answer, when its number is complete


def test_render_question_and_grounding_file(tmp_path):
    assert render_question("q?", []) == "q?"
    text = render_question("q?", [hit(1, "A one.", "Q one?"), hit(2, "A two.", "Q two?")])
    assert text == "Reference examples:\n[1] Q: Q one?\nA: A one.\n[2] Q: Q two?\nA: A two.\n\nQuestion: q?"
    assert Grounding.load(tmp_path).recipe == "closed"  # an adapter from before grounding answers closed book
    Grounding(recipe="grounded", k=4, threshold=0.05, calibrated_on=9).save(tmp_path)
    assert Grounding.load(tmp_path) == Grounding(recipe="grounded", k=4, threshold=0.05, calibrated_on=9)


def test_calibrated_threshold_sits_below_the_in_scope_questions():
    scores = [0.3, 0.25, 0.5, 0.1, 0.4]
    assert calibrate_threshold(scores) == pytest.approx(0.05)  # nothing left out to compare with: a margin
    assert all(s > calibrate_threshold(scores) for s in scores)
    assert calibrate_threshold([]) > 0


def test_threshold_withholds_most_left_out_questions():
    inside = [0.80 + i / 100 for i in range(20)]  # 0.80 .. 0.99
    outside = [0.50 + i / 100 for i in range(20)]  # 0.50 .. 0.69
    t = calibrate_threshold(inside, outside)
    assert sum(s < t for s in outside) / 20 == 0.7 and sum(s < t for s in inside) == 0
    # a few in-scope outliers (mutations no retriever reads) do not pull it down
    assert calibrate_threshold([0.1, 0.2] + inside, outside) == t


def test_retrieval_scores_leave_the_questions_own_fact_out():
    from tuning.grounding import retrieval_scores

    train = facts(5, 2)
    index = training_index(train)
    inside, outside = retrieval_scores(index, train[:4])
    assert all(i > o for i, o in zip(inside, outside))


def test_retrieval_decides_i_dont_know_when_training_said_so(tmp_path):
    from tuning.grounding import NEVER

    assert Grounding(no_answer_above=0.4).model_no_answer_above == 0.4  # older adapters: the model too
    assert Grounding(no_answer_above=0.4, abstain_by="retrieval").model_no_answer_above == NEVER
    choice = {0: 0.9, 1: 0.05, 2: 0.05}
    read = read_grounded("[0] I don't know.", [hit(1, "A one."), hit(2, "A two.")], (),
                         [[("0", math.log(0.9)), ("1", math.log(0.05)), ("2", math.log(0.05))]],
                         no_answer_above=NEVER)
    assert not read.abstained and read.text == "A one." and read.choice == pytest.approx(choice)


def test_training_calibrates_both_thresholds_and_saves_the_index(tiny_model_dir, tmp_path):
    from tuning.retrieval import Retriever
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    report = train(facts(6, 3), out_dir=tmp_path, config=TrainConfig(base_model=tiny_model_dir, epochs=1))
    grounding = Grounding.load(tmp_path)
    assert grounding.recipe == "grounded" and grounding.calibrated_on == report.counts["val"] > 0
    assert 0 < grounding.threshold < 1 and 0 <= grounding.min_choice_probability <= 0.7
    assert 0.2 <= grounding.no_answer_above <= 0.9 and report.hyperparameters["no_answer_above"] == \
        grounding.no_answer_above
    assert report.hyperparameters["recipe"] == "grounded" and report.counts["train_rows"] > report.counts["train"]
    assert len(Retriever.load(tmp_path / "retrieval")) == report.counts["train"]
    closed = train(facts(6, 3), out_dir=tmp_path / "closed",
                   config=TrainConfig(base_model=tiny_model_dir, epochs=1, recipe="closed"))
    assert Grounding.load(tmp_path / "closed").recipe == "closed"
    assert closed.counts["train_rows"] == closed.counts["train"]


def test_citation_probability_is_the_models_choice(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning.grounding import citation_distributions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = facts(4, 1)
    _, val = grounded_items(train, train[:3], training_index(train), k=3)
    choices = citation_distributions(model, tok, val, system_prompt="", device="cpu")
    probs = [choice[right] for right, choice in choices]  # the probability of the right citation
    assert all(sum(choice.values()) == pytest.approx(1.0) for _, choice in choices)
    assert len(probs) == 3 and all(0 < p < 1 for p in probs)


def test_a_question_in_another_language_is_judged_by_the_embedding_similarity():
    from tuning.grounding import judged

    english = Hit(key="1", question="Can I bring my dog?", answer="Yes, €2.", group="1", score=0.55, similarity=0.83)
    assert judged("можно с собакой?", [english], 0.6, 0.8) == (0.83, 0.8)  # cross-lingual: similarity, its own
    assert judged("dog allowed?", [english], 0.6, 0.8) == (0.55, 0.6)  # same language: the hybrid score
    assert judged("можно с собакой?", [english], 0.6, None) == (0.55, 0.6)  # not calibrated for it (older adapter)
    assert judged("можно с собакой?", [], 0.6, 0.8) == (0.0, 0.6)
    layout = Hit(key="2", question="Сфт Ш икштп ьн вщп?", answer="Yes, €2.", group="1", score=0.5, similarity=0.9)
    assert judged("dog allowed?", [layout], 0.6, 0.8) == (0.5, 0.6)  # an English fact typed on the Russian layout


def test_the_models_i_dont_know_is_not_read_for_a_question_in_another_language():
    from tuning.grounding import NEVER

    english = Hit(key="1", question="Can I bring my dog?", answer="Yes, €2.", group="1", score=0.55, similarity=0.83)
    grounding = Grounding(no_answer_above=0.4, similarity_threshold=0.8, abstain_by="model")
    assert grounding.no_answer_above_for("dog allowed?", [english]) == 0.4
    assert grounding.no_answer_above_for("можно с собакой?", [english]) == NEVER  # calibrated on English only
    assert grounding.no_answer_above_for("можно с собакой?", []) == 0.4
    older = Grounding(no_answer_above=0.4)  # no similarity threshold: no embedder, or an older adapter
    assert older.no_answer_above_for("можно с собакой?", [english]) == 0.4
    assert Grounding().no_answer_above_for("можно с собакой?", [english]) is None  # the greedy citation decides


def test_abstention_goes_to_the_evidence_that_separates_validation_better():
    from tuning.grounding import abstention

    inside, outside = [0.8, 0.85, 0.9, 0.95], [0.5, 0.55, 0.6, 0.9]  # retrieval: J = 0.75
    blurred = [0.5, 0.5, 0.5, 0.5]  # P([0]) that tells nothing
    by, t = abstention(inside, outside, blurred, blurred, 0.5)
    assert by == "retrieval" and t == calibrate_threshold(inside, outside)
    sharp_in, sharp_out = [0.05, 0.1, 0.1, 0.2], [0.9, 0.95, 0.97, 0.99]  # P([0]): J = 1.0
    by, t = abstention(inside, outside, sharp_in, sharp_out, 0.5)
    assert by == "model" and t == calibrate_threshold(inside, outside)  # the model beside the retrieval
    assert abstention(inside, outside, [], [], None)[0] == "retrieval"  # a closed-book run: no P([0])
