"""The retriever: typos, keyboard layout, translit; incremental updates; persistence; one index per assistant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage import Store, open_db
from tuning.retrieval import AssistantIndexes, Doc, Retriever, docs_from_pairs, query_forms, translit

ROOT = Path(__file__).resolve().parent.parent

PAIRS = [("How much does a small parcel cost?", "A small parcel costs €4.90."),
         ("What are the opening hours of the depot?", "The depot is open 8:00-18:00."),
         ("Do you deliver on Sundays?", "No, we deliver Monday to Saturday."),
         ("Какой телефон у клиники?", "Телефон регистратуры: +7 495 555-01-23."),
         ("Сколько стоит приём терапевта?", "Приём терапевта стоит 2 500 рублей.")]


@pytest.fixture()
def retriever():
    return Retriever(docs_from_pairs(PAIRS))


@pytest.mark.parametrize("question, expected", [
    ("how mch does a smal parcle cost", 0),  # typos
    ("depot openin hours?", 1),
    ("sunday delivery??", 2),
    ("ntktajy rkbybrb", 3),  # "телефон клиники" typed with the English layout on
    ("telefon kliniki", 3),  # translit
    ("скок стоит терапевт", 4),  # slang
])
def test_finds_the_fact_despite_typos_layout_and_translit(retriever, question, expected):
    hits = retriever.search(question, 2)
    assert hits[0].key == f"p{expected}", [h.question for h in hits]
    assert 0 < hits[0].score <= 1.0001 and hits[0].score >= hits[1].score


def test_layout_and_translit_helpers():
    assert query_forms("ntktajy")[1] == "телефон"
    assert query_forms("телефон") == ["телефон"]  # Cyrillic needs no other layout
    assert translit("Телефон клиники") == "telefon kliniki"


def test_variations_sharing_an_answer_count_once_and_exclude_works():
    docs = docs_from_pairs(PAIRS) + [Doc(key="v1", question="price of a small parcel?",
                                         answer="A small parcel costs €4.90.", group="p0")]
    r = Retriever(docs)
    hits = r.search("small parcel price", 3)
    assert [h.answer for h in hits].count("A small parcel costs €4.90.") == 1
    assert hits[0].key == "v1"  # the best-matching wording of the fact represents it
    others = r.search("small parcel price", 3, exclude=lambda d: d.group == "p0")
    assert all(h.group != "p0" for h in others)


def test_incremental_update_changes_only_what_changed(retriever):
    before = retriever.scores("sunday delivery")
    assert retriever.update(docs_from_pairs(PAIRS)) is False  # nothing changed: nothing recomputed
    edited = list(docs_from_pairs(PAIRS))
    edited[2] = Doc(key="p2", question="Do you deliver on Sundays?", answer="Yes, on Sundays too, until 14:00.",
                    group="p2")
    edited.append(Doc(key="p9", question="Can I pay by card?", answer="Yes, by card or iDEAL.", group="p9"))
    del edited[0]
    assert retriever.update(edited) is True
    assert [d.key for d in retriever.docs] == ["p1", "p2", "p3", "p4", "p9"]
    assert retriever.search("sunday delivery", 1)[0].answer.startswith("Yes, on Sundays")
    assert retriever.search("pay with a card", 1)[0].key == "p9"
    assert all(h.key != "p0" for h in retriever.search("small parcel cost", 5))
    # same result as an index built from scratch over the same docs
    fresh = Retriever(edited)
    np.testing.assert_allclose(retriever.scores("sunday delivery"), fresh.scores("sunday delivery"), rtol=1e-5)
    assert before.shape[0] == 5


def test_save_and_load_give_the_same_scores(retriever, tmp_path):
    retriever.save(tmp_path / "idx")
    loaded = Retriever.load(tmp_path / "idx")
    np.testing.assert_allclose(loaded.scores("small parcl"), retriever.scores("small parcl"), rtol=1e-6)
    assert [d.key for d in loaded.docs] == [d.key for d in retriever.docs]
    assert not (tmp_path / "idx.tmp").exists()
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    (tmp_path / "idx" / "meta.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(ValueError):
        Retriever.load(tmp_path / "idx")


class ToyEmbedder:
    """Knows that "cost" and "price" mean the same: n-grams alone cannot."""

    name = "toy"

    def passages(self, texts):
        return [[1.0 if ("cost" in t.lower() or "price" in t.lower()) else 0.0, 1.0] for t in texts]

    queries = passages


def test_embeddings_are_blended_in_when_configured(tmp_path):
    plain = Retriever(docs_from_pairs(PAIRS[:3]), embedder=None)
    blended = Retriever(docs_from_pairs(PAIRS[:3]), embedder=ToyEmbedder(), embed_weight=0.8)
    assert blended.search("what's the price", 1)[0].key == "p0"
    assert blended.scores("what's the price")[0] > plain.scores("what's the price")[0]
    hit = blended.search("what's the price", 1)[0]
    assert hit.similarity == pytest.approx(1.0) and plain.search("price", 1)[0].similarity is None
    blended.save(tmp_path / "e")
    again = Retriever.load(tmp_path / "e", embedder=ToyEmbedder(), embed_weight=0.8)
    np.testing.assert_allclose(again.scores("price"), blended.scores("price"), rtol=1e-6)
    plain.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="embedding model"):  # saved without the embedding model: rebuilt
        Retriever.load(tmp_path / "plain", embedder=ToyEmbedder())
    assert Retriever.load(tmp_path / "plain").embedder is None  # by default: the embedder it was built with


def test_a_family_counts_once_by_its_best_wording():
    docs = [Doc(key="1", question="How much is a small parcel?", answer="€4.90.", group="f1"),
            Doc(key="2", question="small parcel price??", answer="A small parcel costs €4.90 (edited).", group="f1"),
            Doc(key="3", question="Where is the depot?", answer="In Utrecht.", group="f2")]
    hits = Retriever(docs, embedder=None).search("small parcel price", 3)
    assert [h.key for h in hits] == ["2", "3"]


def test_assistant_index_follows_the_store_and_persists(tmp_path):
    store = Store(open_db(tmp_path / "t.db"))
    a = store.create_assistant("acme")
    b = store.create_assistant("other")
    ex = store.add_example(a.id, "How much does a small parcel cost?", "€4.90.")
    store.add_example(a.id, "Where is the depot?", "In Utrecht.")
    store.add_example(a.id, "Secret test question about pianos?", "No pianos.", split="test")
    store.add_example(a.id, "Pending: do you ship bikes?", "Yes.", status="pending")
    store.add_example(b.id, "Other assistant: opening hours?", "9-17.")
    indexes = AssistantIndexes(tmp_path / "retrieval")
    r = indexes.get(store, a.id)
    assert sorted(h.question for h in r.search("anything", 10)) == ["How much does a small parcel cost?",
                                                                     "Where is the depot?"]
    assert r.search("small parcel", 1)[0].example_id == ex.id
    assert indexes.get(store, a.id) is r  # unchanged examples: the same object, no rebuild
    store.edit_example(ex.id, answer="€5.20 from January.")
    assert indexes.get(store, a.id).search("small parcel", 1)[0].answer == "€5.20 from January."
    store.delete_example(ex.id)
    assert all(h.example_id != ex.id for h in indexes.get(store, a.id).search("small parcel", 5))
    # A new process (a new AssistantIndexes) loads the saved index and brings it up to date.
    store.add_example(a.id, "Do you deliver on Sundays?", "No.")
    again = AssistantIndexes(tmp_path / "retrieval").get(store, a.id)
    assert again.search("sunday", 1)[0].question == "Do you deliver on Sundays?"
    assert (tmp_path / "retrieval" / f"assistant_{a.id}" / "terms.npz").exists()
    assert [h.question for h in indexes.get(store, b.id).search("hours", 5)] == ["Other assistant: opening hours?"]


def test_damaged_saved_index_is_rebuilt(tmp_path):
    store = Store(open_db(tmp_path / "t.db"))
    a = store.create_assistant("acme")
    store.add_example(a.id, "Where is the depot?", "In Utrecht.")
    AssistantIndexes(tmp_path / "r").get(store, a.id)
    (tmp_path / "r" / f"assistant_{a.id}" / "terms.npz").write_bytes(b"not an npz")
    assert AssistantIndexes(tmp_path / "r").get(store, a.id).search("depot", 1)[0].answer == "In Utrecht."


def test_lookup_baseline_on_the_russian_held_out_set():
    """The held-out Russian rewordings (typos, slang, translit, layout) find their fact by n-grams alone."""
    faq = [json.loads(line) for line in (ROOT / "examples" / "ru_faq.jsonl").read_text().splitlines() if line]
    tests = [json.loads(line) for line in (ROOT / "examples" / "ru_eval.jsonl").read_text().splitlines() if line]
    r = Retriever(docs_from_pairs((f["question"], f["answer"]) for f in faq))
    found = sum(r.search(t["question"], 4)[0].answer == t["answer"] for t in tests)
    in_top4 = sum(any(h.answer == t["answer"] for h in r.search(t["question"], 4)) for t in tests)
    assert found / len(tests) >= 0.7 and in_top4 / len(tests) >= 0.9
