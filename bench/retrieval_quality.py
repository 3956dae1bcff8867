"""Retrieval quality with no model: recall@1/@3, the model-free lookup baseline, how well the top score tells
in-scope from out-of-scope questions (AUC), and the "I don't know" threshold calibrated the way training does it
(on held-out mutations of the FAQ) with the share of real held-out and out-of-scope questions it withholds.

Retrievers: character n-grams alone, the bundled multilingual-e5-small alone, and hybrids (weight = the
embedding's share). Choose settings on the tuning sets (acme, gen:*), report on the others.

    python bench/retrieval_quality.py [--data acme,harbor,ru,harbor_ru] [--weights 0,0.5,0.7,1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TUNING_SETS = ("acme", "gen:40:en", "gen:40:ru", "acme_ru")
REPORT_SETS = ("harbor", "ru", "harbor_ru")


def auc(positives, negatives) -> float:
    """P(a random in-scope top score > a random out-of-scope one), ties counted half."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


class CachedEmbedder:
    """The default embedder, each text embedded once (every weight is measured on the same vectors)."""

    def __init__(self):
        from tuning.embedding import load_embedder

        self.inner = load_embedder(required=True)
        self.name = self.inner.name
        self.cache: dict = {}

    def _get(self, texts, query: bool):
        import numpy as np

        missing = [t for t in texts if (t, query) not in self.cache]
        if missing:
            vectors = (self.inner.queries if query else self.inner.passages)(missing)
            self.cache.update({(t, query): v for t, v in zip(missing, vectors)})
        return np.stack([self.cache[(t, query)] for t in texts])

    def queries(self, texts):
        return self._get(list(texts), True)

    def passages(self, texts):
        return self._get(list(texts), False)


def measure(name: str, weights, embedder, *, per_example: int = 3) -> list[dict]:
    from learning_sweep import load_data

    from tuning.data.dataset import TrainItem, add_mutations, split_items
    from tuning.evaluate import as_eval_items, contains_all
    from tuning.grounding import calibrate_threshold, judged, retrieval_scores, similarity_threshold
    from tuning.retrieval import Doc, Retriever

    pairs, held_out, oos, _ = load_data(name)
    # as `train --data X --augment mutate` does: FAQ + mutations, validation = held-out mutations
    items = add_mutations([TrainItem(q, a, group=str(i)) for i, (q, a) in enumerate(pairs)], n=per_example, seed=0)
    splits = split_items(items, val_share=0.2, seed=0)
    index = Retriever([Doc(key=f"t{n}", question=i.question, answer=i.answer, group=i.group)
                       for n, i in enumerate(splits.train)], embedder=embedder)
    items_eval = as_eval_items(held_out)
    rows = []
    for weight in weights:
        index.embed_weight = weight
        inside, outside = retrieval_scores(index, splits.val)
        threshold = calibrate_threshold(inside, outside)
        cross = similarity_threshold(index, splits.val) if weight > 0 else None
        hits = [index.search(it.question, 3) for it in items_eval]
        oos_top = [index.search(q, 1) for q in oos]
        checked = [(it, h) for it, h in zip(items_eval, hits) if it.must_contain]
        right1 = [bool(h) and contains_all(h[0].answer, it.must_contain) for it, h in checked]
        top_in = [h[0].score if h else 0.0 for _, h in checked]
        top_out = [h[0].score if h else 0.0 for h in oos_top]
        # what the assistant does: the hybrid score, or the similarity for a question in another language
        withheld_in = [c < t for c, t in (judged(it.question, h, threshold, cross) for it, h in checked)]
        withheld_out = [c < t for c, t in (judged(q, h, threshold, cross) for q, h in zip(oos, oos_top))]
        rows.append({
            "data": name, "embed_weight": weight, "n": len(checked), "n_out_of_scope": len(oos),
            "recall@1": round(sum(right1) / len(checked), 4),
            "recall@3": round(sum(any(contains_all(x.answer, it.must_contain) for x in h) for it, h in checked)
                              / len(checked), 4),
            "auc": round(auc(top_in, top_out), 4),
            "threshold": threshold, "similarity_threshold": cross,
            "validation": {"in": len(inside), "in_withheld": round(sum(s < threshold for s in inside) / len(inside), 4),
                           "left_out_withheld": round(sum(s < threshold for s in outside) / len(outside), 4)},
            "in_scope_withheld": round(sum(withheld_in) / len(checked), 4),
            "out_of_scope_withheld": round(sum(withheld_out) / max(1, len(withheld_out)), 4),
            "lookup_answered_correctly": round(sum(r and not w for r, w in zip(right1, withheld_in)) / len(checked),
                                               4),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=",".join(TUNING_SETS + REPORT_SETS))
    parser.add_argument("--weights", default="0,0.5,0.6,0.7,0.8,1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    embedder, rows = CachedEmbedder(), []
    started = time.perf_counter()
    for name in args.data.split(","):
        for row in measure(name, [float(w) for w in args.weights.split(",")], embedder):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"tuning_sets": TUNING_SETS, "report_sets": REPORT_SETS, "embedder": embedder.name,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
