"""Replay the grounded answer rules on answers a sweep saved (bench/learning_sweep.py --answers, or
bench/reevaluate.py), without running a model again: which evidence says "I don't know" and how sure the model
must be of another example than the retrieval's first before the answer comes from it.

For each saved question the sweep kept the retrieval confidence and the threshold it was judged by (and the P([0])
threshold the model's "I don't know" was read with: none for a question in another language), the model's
probabilities of each citation ([0] = "I don't know", [1..k] = the retrieved examples) and which retrieved
examples hold the right answer. A rule decides, per question, "I don't know" or the example the answer comes
from; an answer is counted right when that example's answer is (the approved answer is what a grounded reply
shows once the model cites it; tuning.grounding.read_grounded).

    python bench/answer_rules.py bench/results/learning_sweep/acme_e5.json [...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, None)  # None: never another example than the first
ABSTAIN = ("retrieval", "retrieval+model")


def choose(citation: dict | None, share: float | None, no_answer_above: float | None, abstain: str) -> int:
    """0 for "I don't know" (by the model), else the 1-based example the answer comes from: the service's
    decide_citation with the rule's share (None: NEVER, no share reaches it) and P([0]) threshold."""
    from tuning.grounding import NEVER, decide_citation

    if not citation:
        return 1
    model_says = abstain == "retrieval+model" and no_answer_above is not None
    return decide_citation({int(d): p for d, p in citation.items()}, no_answer_above if model_says else NEVER,
                           share=NEVER if share is None else share)


def withheld_by_retrieval(record: dict, threshold: float) -> bool:
    return record["confidence"] < record.get("threshold", threshold)


def replay(run: dict, share: float | None, abstain: str) -> dict:
    """answered and right, in-scope "don't know", out-of-scope "don't know" under one rule."""
    threshold, no_answer_above = run["abstain_threshold"], run.get("no_answer_above")
    right = withheld = 0
    for r in run["answers"]:
        picked = 0 if withheld_by_retrieval(r, threshold) else choose(
            r.get("citation"), share, r.get("no_answer_above", no_answer_above), abstain)
        withheld += picked == 0
        right += picked > 0 and picked <= len(r["hits_correct"]) and r["hits_correct"][picked - 1]
    oos = run.get("out_of_scope_answers") or []
    oos_withheld = sum(withheld_by_retrieval(r, threshold)
                       or choose(r.get("citation"), share, r.get("no_answer_above", no_answer_above), abstain) == 0
                       for r in oos)
    n = len(run["answers"])
    return {"share": share, "abstain": abstain, "answered_correctly": round(right / n, 4),
            "in_scope_withheld": round(withheld / n, 4),
            "out_of_scope_withheld": round(oos_withheld / len(oos), 4) if oos else None}


def runs_of(path: Path) -> list[tuple[str, dict]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "settings" in data:  # a learning sweep: one run per setting
        return [(f"{data['data']}#{i}", s) for i, s in enumerate(data["settings"]) if "answers" in s]
    return [(data.get("data", path.stem), data)]  # a re-evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.files:
        for label, run in runs_of(Path(name)):
            lookup = sum(bool(r["hits_correct"]) and r["hits_correct"][0]
                         and not withheld_by_retrieval(r, run["abstain_threshold"]) for r in run["answers"])
            for abstain in ABSTAIN:
                for share in SHARES:
                    rows.append({"run": label, **replay(run, share, abstain),
                                 "lookup_answered_correctly": round(lookup / len(run["answers"]), 4)})
    text = json.dumps({"files": args.files, "rows": rows}, indent=1)
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
