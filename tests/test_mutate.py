"""The local mutation engine: deterministic, every kind in both languages, distinct, and queued for review."""

import random

import pytest

from storage.text import normalize_question
from tuning.data import mutate as mut
from tuning.data.mutate import Mutation, mutate, mutate_assistant

EN = "Hello, how long does delivery to Berlin take, please?"
RU = "Здравствуйте, подскажите, пожалуйста, сколько стоит доставка в Москву?"


@pytest.mark.parametrize("text", [EN, RU])
def test_deterministic_for_a_seed(text):
    assert mutate(text, n=6, seed=7) == mutate(text, n=6, seed=7)
    assert mutate(text, n=6, seed=7) != mutate(text, n=6, seed=8)


@pytest.mark.parametrize("text", [EN, RU, "Where is my parcel?", "Как отследить посылку?"])
def test_outputs_distinct_and_differ_from_source(text):
    out = mutate(text, n=8, seed=0)
    assert len(out) == 8
    norms = [normalize_question(m.text) for m in out]
    assert len(set(norms)) == len(norms)
    assert normalize_question(text) not in norms
    assert all(isinstance(m, Mutation) and m.method.startswith("mutation:") for m in out)


def test_nopunct_never_alone():
    for seed in range(20):
        assert all(m.method != "mutation:nopunct" for m in mutate(EN, n=10, seed=seed))


@pytest.mark.parametrize("lang,text", [("en", EN), ("ru", RU)])
def test_every_kind_in_both_languages(lang, text):
    rng = random.Random(1)
    assert mut.typo(text, rng) != text
    assert mut.nopunct(text, rng) == mut.nopunct(text, rng).lower()
    assert not any(c in mut.nopunct(text, rng) for c in ",?")
    assert mut.filler(text, rng) is not None
    assert "please" not in mut.filler(text, rng).lower() and "пожалуйста" not in mut.filler(text, rng)
    abbr = mut.abbrev(text, random.Random(3))
    assert abbr is not None and abbr != text
    swapped = mut.layout(text, rng)
    if lang == "ru":
        assert swapped.startswith("Plhfdcndeqnt")  # "Здравствуйте" typed on a QWERTY layout
        assert mut.translit(text, rng).startswith("Zdravstvuite, podskazhite")
    else:
        assert swapped.startswith("Руддщ")  # "Hello" typed on a ЙЦУКЕН layout
        assert mut.translit(text, rng) is None
    methods = {k for seed in range(6) for m in mutate(text, n=10, seed=seed) for k in m.method[9:].split("+")}
    expected = set(mut.KINDS) - ({"translit"} if lang == "en" else set())
    assert expected <= methods


def test_typo_kinds():
    seen = {mut.typo("delivery", random.Random(s)) for s in range(60)}
    assert "delvery" in seen or "deliery" in seen  # dropped
    assert any(len(w) == 9 for w in seen)  # doubled
    assert any(sorted(w) == sorted("delivery") and w != "delivery" for w in seen)  # swapped (or adjacent)
    assert mut.typo("a b c", random.Random(0)) is None


def test_short_text_gives_fewer_not_duplicates():
    out = mutate("Hi", n=5)
    assert len({normalize_question(m.text) for m in out}) == len(out)


def test_slang_lists_are_editable_json():
    for lang in ("en", "ru"):
        data = mut.slang(lang)
        assert data["abbreviations"] and data["fillers"] and data["openers"]


def test_mutate_assistant_queues_pending_variations(store, assistant):
    a = store.add_example(assistant.id, "How long does delivery to Berlin take?", "Two working days.")
    b = store.add_example(assistant.id, "Сколько стоит доставка в Москву?", "500 рублей.")
    store.add_example(assistant.id, "Unreviewed?", "x", status="pending")
    run = mutate_assistant(store, assistant.id, per_example=5, seed=0, author_id=1)
    assert run.status == "succeeded" and run.model == "local-mutations" and run.kept == 10
    made = store.list_examples(assistant.id, generation_run_id=run.id)
    assert len(made) == 10
    assert {e.parent_id for e in made} == {a.id, b.id}
    assert all(e.status == "pending" and e.source == "synthetic" and e.method.startswith("mutation:") for e in made)
    assert all(e.answer == (a.answer if e.parent_id == a.id else b.answer) for e in made)
    # Same seed again: the first candidates are duplicates now and are skipped; only new ones are added.
    again = mutate_assistant(store, assistant.id, per_example=5, seed=0)
    assert again.kept <= 10 and again.generated > again.kept
    hashes = [e.question_hash for e in store.list_examples(assistant.id)]
    assert len(hashes) == len(set(hashes))
