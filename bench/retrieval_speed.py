"""Retrieval speed and quality at 10,000 examples, against scikit-learn's fitted TfidfVectorizer in the same run.

Docs are invented-fact FAQs (bench/faqgen.py, English and Russian) so nothing is known in advance; queries are
their templated customer rewordings. Measures: build, an incremental update of 10 changed examples (ours:
transforms only those; the baseline must refit everything), query latency p50/p95, and recall@1/@4.

    python bench/retrieval_speed.py [--docs 10000] [--queries 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def corpus(n_docs: int):
    """(pairs, queries with their answer): half English, half Russian invented facts."""
    from faqgen import generate_faq

    pairs, queries = [], []
    per_faq = 1000  # faqgen keeps entities unique up to about this many facts; several seeds make the rest
    for n in range(max(1, n_docs // per_faq)):
        language = ("en", "ru")[n % 2]
        facts, tests = generate_faq(min(per_faq, n_docs), language=language, seed=100 + n)
        pairs += [(f["question"], f["answer"]) for f in facts]
        queries += [(t["question"], t["answer"]) for t in tests]
    return pairs, queries


class FittedBaseline:
    """scikit-learn's TfidfVectorizer on character 3-5-grams (the issue's reference), refitted on every change."""

    def __init__(self, pairs):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.pairs = list(pairs)
        self.vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)
        self.matrix = self.vec.fit_transform([f"{q}\n{a}" for q, a in self.pairs])

    def search(self, question: str, k: int):
        import numpy as np

        scores = (self.matrix @ self.vec.transform([question]).T).toarray().ravel()
        return [self.pairs[i][1] for i in np.argsort(-scores)[:k]]


def measure(search, queries, k: int = 4) -> dict:
    times, top1, topk = [], 0, 0
    for question, answer in queries:
        t = time.perf_counter()
        answers = search(question, k)
        times.append((time.perf_counter() - t) * 1000)
        top1 += bool(answers) and answers[0] == answer
        topk += answer in answers
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * len(times))], 2),
            "recall@1": round(top1 / len(queries), 4), f"recall@{k}": round(topk / len(queries), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import random

    from tuning.retrieval import Doc, Retriever, docs_from_pairs

    pairs, queries = corpus(args.docs)
    queries = random.Random(0).sample(queries, min(args.queries, len(queries)))
    result: dict = {"docs": len(pairs), "queries": len(queries)}

    t = time.perf_counter()
    ours = Retriever(docs_from_pairs(pairs))
    build_s = time.perf_counter() - t
    ours.search("warm up", 1)
    changed = [Doc(key=d.key, question=d.question + " (updated)", answer=d.answer, group=d.group)
               if i < 10 else d for i, d in enumerate(ours.docs)]
    t = time.perf_counter()
    ours.update(changed)
    update_s = time.perf_counter() - t
    result["tunebot"] = {"build_s": round(build_s, 2), "update_10_s": round(update_s, 3),
                         **measure(lambda q, k: [h.answer for h in ours.search(q, k)], queries)}

    t = time.perf_counter()
    baseline = FittedBaseline(pairs)
    fit_s = time.perf_counter() - t
    result["sklearn_fitted"] = {"build_s": round(fit_s, 2), "update_10_s": round(fit_s, 2),  # a refit
                                **measure(baseline.search, queries)}
    result["query_p50_ratio"] = round(result["tunebot"]["p50_ms"] / max(1e-9, result["sklearn_fitted"]["p50_ms"]), 2)
    result["target_p50_ms"] = 20
    result["meets_target"] = result["tunebot"]["p95_ms"] < 20
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
