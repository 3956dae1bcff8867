"""Evaluation metrics, few-shot selection, generation, and base/fewshot/tuned reports on the tiny model."""

from __future__ import annotations

import json

import pytest

from train_helpers import fact_items
from tuning.answering.service import select_fewshot
from tuning.evaluate import EvalItem, contains_all, evaluate, markdown_table, normalize, rouge_l, token_f1


def test_must_contain_normalizes_case_whitespace_and_nbsp():
    assert normalize("  €4.90\u00a0PER   parcel ") == "€4.90 per parcel"
    assert contains_all("It costs €4.90 per\u00a0Parcel.", ["€4.90", "per parcel"])
    assert contains_all("It is 31.5\u202fKG max", ["31.5 kg"])
    assert not contains_all("It costs €4.95.", ["€4.90"])


def test_token_f1_and_rouge_l():
    assert token_f1("the depot opens at 7", "the depot opens at 7") == 1.0
    assert token_f1("", "x") == 0.0
    assert token_f1("opens at 7", "the depot opens at 7") == pytest.approx(2 * 1 * 0.6 / 1.6)
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)


def test_select_fewshot_picks_the_most_similar_questions():
    pool = [("How much is a small parcel?", "€4.90"), ("Where is the depot?", "Utrecht"),
            ("Do you ship abroad?", "Yes"), ("How much is a medium parcel?", "€7.50")]
    shots = select_fewshot("how much does a small parcel cost", pool, k=2)
    assert len(shots) == 2 and shots[-1] == pool[0] and shots[0] == pool[3]


def test_evaluate_compares_every_mode_with_the_lookup_baseline(tiny_model_dir, tmp_path):
    from tuning.grounding import Grounding
    from tuning.training.config import TrainConfig
    from tuning.training.run import train

    train(fact_items(3, 1), out_dir=tmp_path, config=TrainConfig(base_model=tiny_model_dir, epochs=1))
    assert (tmp_path / "retrieval" / "meta.json").exists() and Grounding.load(tmp_path).recipe == "grounded"
    items = [EvalItem("When is depot 1 open?", "Depot 1 opens at 8:00.", ("8:00",)),
             {"question": "depot 2 hours?", "answer": "Depot 2 opens at 9:00."}]
    seen = []
    result = evaluate(items, base_model=tiny_model_dir, adapter_dir=str(tmp_path), max_new_tokens=6,
                      include_answers=True, out_of_scope=["zzzz qqqq xxxx"],
                      on_progress=lambda mode, i, n: seen.append(mode))
    assert result["n"] == 2 and list(result["modes"]) == ["base", "fewshot", "lookup", "tuned", "grounded"]
    for metrics in result["modes"].values():
        assert {"accuracy", "f1", "rouge_l", "stop_rate", "ttft_ms", "tokens_per_s", "abstain_rate"} <= set(metrics)
        assert metrics["accuracy"] in (0.0, 1.0)  # one question has must_contain
    # lookup needs no model: the nearest trained example's answer, verbatim (the random model never gets 8:00)
    assert result["modes"]["lookup"]["accuracy"] == 1.0 and result["answers"][0]["lookup"].startswith("Depot 1 opens at 8:00")
    assert result["retrieval"]["recall@1"] == 1.0
    # a question sharing nothing with the examples is below the calibrated threshold: it would be abstained
    assert result["out_of_scope"]["lookup"]["abstain_rate"] == 1.0
    assert result["out_of_scope_answers"][0]["confidence"] < result["abstain_threshold"]
    assert seen.count("tuned") == 3 and seen.count("grounded") == 3 and len(result["answers"]) == 2
    json.dumps(result)
    table = markdown_table(result)
    assert table.count("\n| ") == 5 and "| grounded |" in table and "out of scope" in table
    with pytest.raises(Exception, match="fewshot"):
        evaluate(items, base_model=tiny_model_dir, modes=("fewshot",))


def test_cli_train_and_eval_json(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from bot.cli import main

    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(tmp_path / "data"))
    data = tmp_path / "faq.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"When is depot {i} open?", "answer": f"At {7 + i}:00."})
                              for i in range(4)) + "\nnot json\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "depot 1 hours?", "answer": "At 8:00.", "must_contain": ["8:00"]}))
    out = tmp_path / "model"
    assert main(["train", "--data", str(data), "--out", str(out), "--base-model", tiny_model_dir,
                 "--epochs", "1", "--augment", "mutate:2", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "line 5" in captured.err
    assert report["counts"]["items"] == 12 and report["val_kind"] == "recall"
    oos = tmp_path / "oos.jsonl"
    oos.write_text(json.dumps({"question": "Do you sell pianos?"}) + "\nwhat's the weather\n{broken\n")
    assert main(["eval", "--model", str(out), "--data", str(test), "--max-new-tokens", "4", "--json",
                 "--out-of-scope", str(oos)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    # the index saved beside the adapter gives lookup, few-shot and grounded without --fewshot-data
    assert result["n"] == 1 and set(result["modes"]) == {"base", "fewshot", "lookup", "tuned", "grounded"}
    assert result["n_out_of_scope"] == 2 and "line 3" in captured.err
    assert set(result["out_of_scope"]) == set(result["modes"]) and {"recall@1", "recall@3"} == set(result["retrieval"])
    assert main(["train", "--data", str(data), "--out", str(out), "--augment", "bogus"]) == 2
    assert "--augment" in capsys.readouterr().err
    assert main(["eval", "--data", str(test), "--compare", "tuned"]) == 2
