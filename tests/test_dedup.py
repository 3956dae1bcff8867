"""Near-duplicate and quality filters applied before review."""

from tuning.data.dedup import (NearDuplicateIndex, detect_language, filter_candidates, index_for_assistant,
                          is_near_duplicate, similarity)


def test_case_and_punctuation_only_paraphrases_are_caught():
    assert is_near_duplicate("How long does delivery take?", "how long does delivery take", 0.8)
    assert is_near_duplicate("Сколько стоит доставка?!", "СКОЛЬКО СТОИТ ДОСТАВКА", 0.99)
    assert is_near_duplicate("Где мой заказ, ёлки?", "где мой заказ елки", 1.0)
    assert is_near_duplicate("How long does the delivery take?", "How long does delivery take?", 0.8)


def test_distinct_questions_are_not():
    pairs = [("How long does delivery take?", "How much does delivery cost?"),
             ("Where is my parcel?", "Can I return a parcel?"),
             ("Сколько стоит доставка?", "Как отследить посылку?"),
             ("Do you ship to Berlin?", "Do you ship to Paris on Sundays?")]
    for a, b in pairs:
        assert not is_near_duplicate(a, b, 0.8), (a, b, similarity(a, b))


def test_index_finds_best_match_and_ref():
    index = NearDuplicateIndex([(1, "How long does delivery take?"), (2, "What is the price of delivery?")])
    assert index.find("how long does delivery take") == (1, 1.0)
    ref, score = index.find("How long does the delivery take")
    assert ref == 1 and 0.8 <= score < 1
    assert index.find("Can I pay by card?") is None
    exact_only = NearDuplicateIndex([(1, "Where is my parcel?")], threshold=1.01)
    assert exact_only.find("Where is my parcell?") is None
    assert exact_only.find("where is my parcel") == (1, 1.0)


def test_filter_candidates_reasons_and_batch_dedup():
    index = NearDuplicateIndex([(1, "How long does delivery take?")])
    kept, rejected = filter_candidates(
        [("How long does delivery take!", "a"),       # duplicate of an existing example
         ("When will my parcel arrive?", "a"),        # kept
         ("when will my parcel arrive", "a"),         # duplicate of the previous one in the batch
         ("  ", "a"), ("???", "a"), ("Fine?", ""),     # empty
         ("x" * 50 + "?", "a"),                       # too long
         ("Когда придёт посылка?", "a")],             # wrong language
        index=index, max_chars=40, language="en")
    assert kept == [("When will my parcel arrive?", "a")]
    assert [r.reason for r in rejected] == ["duplicate", "duplicate", "empty", "empty", "empty", "too_long", "language"]
    assert len(index) == 2


def test_detect_language():
    assert detect_language("Привет, how are you") == "en"
    assert detect_language("Привет, как дела? ok") == "ru"
    assert detect_language("123 ?!") is None


def test_index_for_assistant_includes_rejected(store, assistant):
    ex = store.add_example(assistant.id, "Where is my parcel?", "Track it online.")
    store.reject(ex.id)
    index = index_for_assistant(store, assistant.id)
    assert index.find("where is my parcel") == (ex.id, 1.0)
