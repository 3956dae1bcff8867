"""bench/faqgen.py (procedural invented-fact FAQ) and the hand-written eval sets in examples/."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load_faqgen():
    spec = importlib.util.spec_from_file_location("faqgen", ROOT / "bench" / "faqgen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["faqgen"] = module   # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


faqgen = _load_faqgen()


def norm(text: str) -> str:
    """As the evaluator compares: case-insensitive, whitespace and non-breaking spaces normalized."""
    return " ".join(text.replace("\u00a0", " ").split()).lower()


def contains_all(answer: str, tokens: list[str]) -> bool:
    return all(norm(t) in norm(answer) for t in tokens)


@pytest.fixture(scope="module")
def big():
    return {lang: faqgen.generate_faq(1000, language=lang, seed=0) for lang in ("en", "ru")}


@pytest.mark.parametrize("language", ["en", "ru"])
def test_deterministic_per_seed(language):
    a = faqgen.generate_faq(60, language=language, seed=7)
    b = faqgen.generate_faq(60, language=language, seed=7)
    c = faqgen.generate_faq(60, language=language, seed=8)
    assert a == b
    assert a != c
    assert faqgen.generate_faq(30, language=language, seed=7)[0] == a[0][:30]  # a prefix, whatever n


@pytest.mark.parametrize("language", ["en", "ru"])
@pytest.mark.parametrize("n", [20, 1000])
def test_sizes_and_shapes(language, n, big):
    train, test = big[language] if n == 1000 else faqgen.generate_faq(n, language=language, seed=0)
    assert len(train) == n and len(test) == 2 * n
    assert all(set(p) == {"question", "answer"} for p in train)
    assert all(set(t) == {"question", "answer", "must_contain", "split"} and t["split"] == "test" for t in test)
    for i, pair in enumerate(train):  # test items come in fact order, 2 per fact
        assert test[2 * i]["answer"] == test[2 * i + 1]["answer"] == pair["answer"]
    assert len({p["question"] for p in train}) == n
    assert len({p["answer"] for p in train}) == n


@pytest.mark.parametrize("language", ["en", "ru"])
def test_entities_unique_and_kinds_mixed(language):
    facts = faqgen.generate_facts(1000, language=language, seed=3)
    entities = [f.entity.lower() for f in facts]
    assert len(set(entities)) == len(entities)
    assert len({(f.kind, f.entity) for f in facts}) == 1000
    kinds = {f.kind for f in facts}
    assert 15 <= len(kinds) == len(faqgen.KINDS)
    for f in facts:
        assert f.entity.lower() in f.question.lower() and f.entity.lower() in f.answer.lower()
        assert all(f.entity.lower() in q.lower() for q in f.rewordings)


@pytest.mark.parametrize("language", ["en", "ru"])
def test_must_contain_in_own_answer(language, big):
    _, test = big[language]
    for item in test:
        assert 1 <= len(item["must_contain"]) <= 2
        assert contains_all(item["answer"], item["must_contain"]), item


@pytest.mark.parametrize("language", ["en", "ru"])
def test_must_contain_identifies_the_fact(language):
    facts = faqgen.generate_facts(300, language=language, seed=11)
    answers = [norm(f.answer) for f in facts]
    for i, f in enumerate(facts):
        tokens = [norm(t) for t in f.must_contain]
        hits = [j for j, a in enumerate(answers) if all(t in a for t in tokens)]
        assert hits == [i], (f, [facts[j].answer for j in hits])


@pytest.mark.parametrize("language", ["en", "ru"])
def test_rewordings_differ_from_canonical(language, big):
    train, test = big[language]
    canonical = {norm(p["question"]) for p in train}
    for i, pair in enumerate(train):
        q1, q2 = norm(test[2 * i]["question"]), norm(test[2 * i + 1]["question"])
        assert q1 != q2
        assert norm(pair["question"]) not in (q1, q2)
    assert not canonical & {norm(t["question"]) for t in test}  # a test question is never a train question


def test_russian_is_cyrillic_and_english_is_not():
    cyr = re.compile("[а-яё]", re.IGNORECASE)
    train, test = faqgen.generate_faq(50, language="ru", seed=2)
    assert all(cyr.search(p["question"]) and cyr.search(p["answer"]) for p in train)
    assert all(cyr.search(t["question"]) for t in test)
    train, test = faqgen.generate_faq(50, language="en", seed=2)
    assert not any(cyr.search(p["question"] + p["answer"]) for p in train)


def test_bad_arguments():
    with pytest.raises(ValueError):
        faqgen.generate_faq(5, language="de")
    with pytest.raises(ValueError):
        faqgen.generate_faq(-1)
    assert faqgen.generate_faq(0) == ([], [])


def test_write_faq_and_cli(tmp_path):
    train_path, test_path = faqgen.write_faq(25, "ru", 4, tmp_path / "a")
    train = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    test = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    assert (train, test) == faqgen.generate_faq(25, language="ru", seed=4)
    assert "«" in train_path.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes

    faqgen.main(["--facts", "12", "--language", "en", "--seed", "1", "--out", str(tmp_path / "b")])
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == ["faqgen_en_12_seed1_test.jsonl", "faqgen_en_12_seed1_train.jsonl"]


# ---------------------------------------------------------------- hand-written example sets


def read_jsonl(name: str) -> list[dict]:
    lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("eval_name, faq_name", [
    ("ru_eval.jsonl", "ru_faq.jsonl"),
    ("harbor_eval.jsonl", "harbor_faq.jsonl"),
    ("acme_eval.jsonl", "acme_faq.jsonl"),
])
def test_eval_sets(eval_name, faq_name):
    faq = read_jsonl(faq_name)
    evals = read_jsonl(eval_name)
    assert all(set(p) == {"question", "answer"} for p in faq)
    answers = [norm(p["answer"]) for p in faq]
    questions = {norm(p["question"]) for p in faq}
    if eval_name != "acme_eval.jsonl":
        assert len(faq) == 30 and len(evals) == 60
    for n, item in enumerate(evals, 1):
        assert item["split"] == "test", n
        assert 1 <= len(item["must_contain"]) <= 2, n
        assert contains_all(item["answer"], item["must_contain"]), (n, item)
        assert norm(item["answer"]) in answers, (n, "answer is not verbatim from the FAQ")
        assert norm(item["question"]) not in questions, (n, "reuses a FAQ question")
    assert len({norm(i["question"]) for i in evals}) == len(evals)
    if eval_name != "acme_eval.jsonl":  # 2 rewordings per fact, in FAQ order
        assert [norm(i["answer"]) for i in evals] == [a for a in answers for _ in range(2)]
        for item in evals:  # must_contain singles out its own fact
            hits = [a for a in answers if contains_all(a, item["must_contain"])]
            assert hits == [norm(item["answer"])], item


@pytest.mark.parametrize("name, faq_name", [
    ("acme_out_of_scope.jsonl", "acme_faq.jsonl"),
    ("ru_out_of_scope.jsonl", "ru_faq.jsonl"),
    ("harbor_out_of_scope.jsonl", "harbor_faq.jsonl"),
])
def test_out_of_scope_sets(name, faq_name):
    rows = read_jsonl(name)
    assert len(rows) == 25
    assert all(set(r) == {"question"} and r["question"].strip() for r in rows)
    assert len({norm(r["question"]) for r in rows}) == 25
    assert not {norm(r["question"]) for r in rows} & {norm(p["question"]) for p in read_jsonl(faq_name)}
