"""bench/answer_rules.py: the grounded answer rules replayed on saved answers agree with tuning.grounding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from answer_rules import choose, replay  # noqa: E402

from tuning.grounding import NEVER, decide_citation  # noqa: E402


@pytest.mark.parametrize("citation", [{"0": 0.1, "1": 0.2, "2": 0.7, "3": 0.0}, {"0": 0.5, "1": 0.3, "2": 0.2},
                                      {"0": 0.05, "1": 0.05, "2": 0.0, "3": 0.9}, {"0": 0.2, "1": 0.6, "2": 0.2}])
def test_the_replayed_choice_is_the_services(citation):
    from tuning import grounding

    choice = {int(d): p for d, p in citation.items()}
    assert choose(citation, grounding.OTHER_EXAMPLE_SHARE, 0.4, "retrieval+model") == decide_citation(choice, 0.4)
    assert choose(citation, grounding.OTHER_EXAMPLE_SHARE, None, "retrieval") == decide_citation(choice, NEVER)


def run(answers, oos, **extra):
    return {"abstain_threshold": 0.6, "no_answer_above": 0.4, "answers": answers, "out_of_scope_answers": oos,
            **extra}


def test_replay_counts_withheld_and_right_answers():
    answers = [
        {"confidence": 0.9, "citation": {"0": 0.1, "1": 0.8, "2": 0.1}, "hits_correct": [True, False]},  # right
        {"confidence": 0.5, "citation": {"0": 0.1, "1": 0.8, "2": 0.1}, "hits_correct": [True, False]},  # retrieval
        {"confidence": 0.9, "citation": {"0": 0.6, "1": 0.3, "2": 0.1}, "hits_correct": [True, False]},  # model [0]
        {"confidence": 0.9, "citation": {"0": 0.0, "1": 0.1, "2": 0.9}, "hits_correct": [True, False]},  # overridden
    ]
    oos = [{"confidence": 0.9, "citation": {"0": 0.7, "1": 0.3}}, {"confidence": 0.3, "citation": None}]
    both = replay(run(answers, oos), 0.8, "retrieval+model")
    assert both == {"share": 0.8, "abstain": "retrieval+model", "answered_correctly": 0.25,
                    "in_scope_withheld": 0.5, "out_of_scope_withheld": 1.0}
    alone = replay(run(answers, oos), None, "retrieval")  # never another example, the retrieval alone withholds
    assert alone == {"share": None, "abstain": "retrieval", "answered_correctly": 0.75, "in_scope_withheld": 0.25,
                     "out_of_scope_withheld": 0.5}
    # a question in another language: the model's P([0]) was not read for it (no_answer_above NEVER)
    answers[2]["no_answer_above"] = NEVER
    assert replay(run(answers, oos), 0.8, "retrieval+model")["answered_correctly"] == 0.5


def test_the_command_reads_a_sweep_and_writes_its_rows(tmp_path, capsys, monkeypatch):
    import answer_rules

    answers = [{"confidence": 0.9, "citation": {"0": 0.1, "1": 0.9}, "hits_correct": [True]}]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"data": "x", "settings": [run(answers, [])]}))
    monkeypatch.setattr(sys, "argv", ["answer_rules.py", str(sweep), "--out", str(tmp_path / "rules.json")])
    answer_rules.main()
    rows = json.loads((tmp_path / "rules.json").read_text())["rows"]
    assert len(rows) == len(answer_rules.SHARES) * len(answer_rules.ABSTAIN)
    assert all(r["run"] == "x#0" and r["answered_correctly"] == 1.0 and r["lookup_answered_correctly"] == 1.0
               for r in rows)
