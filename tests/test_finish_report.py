"""The Telegram finish report of a training run: a translated before/after table, examples, and what /chat uses."""

from __future__ import annotations

from bot.telegram.progress import render_finish_report
from tuning.data.dataset import TrainItem
from tuning.jobs.evaluation import before_after_examples, eval_items, judge
from tuning.jobs.executors import record_outcome
from tuning.training.config import TrainConfig

# What run_training_job measured on 8 held-out variations (held out the same way train() holds them out).
METRICS = {"steps": 132, "total_steps": 132, "tokens_per_s": 2448.5, "eval_on": "variations", "n_test": 8,
           "answer_mode": "grounded", "accuracy": 0.875,
           "eval_correct": {"base": 0, "fewshot": 2, "lookup": 8, "tuned": 3, "grounded": 7},
           "eval_examples": [{"question": "Сколько стоит <доставка> в Казань?", "expected": "500 ₽ & 2 дня",
                              "before": "Я не знаю.", "after": "500 ₽, два дня.",
                              "before_correct": False, "after_correct": True}]}


def outcome(metrics: dict) -> dict:
    return {"kind": "train", "adapter_dir": "/tmp/none", "base_model": "tiny", "dataset_hash": "h",
            "hyperparameters": {"recipe": "grounded"}, "metrics": metrics, "evaluation": None, "incumbent": None}


def finished(store, assistant, metrics: dict):
    """A succeeded training job with the result record_outcome wrote, and its version (real rows)."""
    job = store.create_job("train", assistant_id=assistant.id, created_by=1)
    result = record_outcome(store, job, outcome(metrics), auto_promote=False)
    store.transition_job(job.id, from_states=("queued",), status="succeeded", result=result)
    job = store.get_job(job.id)
    return job, store.get_model_version(result["version_id"])


def report(store, assistant, job, version, lang):
    active = store.get_assistant(assistant.id).active_version_id
    return render_finish_report(job, lang, version=version, active_version_id=active)


def test_first_version_activates_itself_and_the_report_says_so_in_both_languages(store, assistant):
    job, version = finished(store, assistant, METRICS)
    assert version.status == "active" and store.get_assistant(assistant.id).active_version_id == version.id
    assert job.result["first_version"] is True and job.result["promoted"] is True

    en, rows = report(store, assistant, job, version, "en")
    assert "before and after" in en and "<pre>" in en and "</pre>" in en
    assert "tokens_per_s" not in en and "stopped_early" not in en and "steps:" not in en
    assert "8 held-out questions" in en
    assert f"Version #{version.id} answers 7 of 8 questions correctly (the untrained model: 0)" in en
    table = en.split("<pre>")[1].split("</pre>")[0]
    assert "nearest example (lookup)" in table and "8/8" in table and "0/8" in table and "*" in table
    assert "Сколько стоит &lt;доставка&gt; в Казань?" in en and "500 ₽ &amp; 2 дня" in en  # user text escaped
    assert "first trained version, so it became active by itself" in en
    assert [[label for label, _ in row] for row in rows] == [["💬 Try it"]]

    ru, _ = report(store, assistant, job, version, "ru")
    assert "до и после" in ru and "<pre>" in ru
    assert f"Версия #{version.id} правильно отвечает на 7 из 8 вопросов (необученная модель – на 0)" in ru
    assert "ближайший пример" in ru and "стала активной сама" in ru and "отложенных вопросах" in ru
    print(en, ru, sep="\n\n-----\n\n")


def test_a_later_version_is_a_candidate_and_the_report_asks_to_activate_it(store, assistant):
    _, first = finished(store, assistant, METRICS)
    job, second = finished(store, assistant, {**METRICS, "eval_on": "test"})
    assert second.status == "candidate" and store.get_assistant(assistant.id).active_version_id == first.id
    assert job.result["first_version"] is False and job.result["promoted"] is False
    en, rows = report(store, assistant, job, second, "en")
    assert f"Make version #{second.id} active? Until you press ⭐ Make active, /chat answers with version #{first.id}" in en
    assert "8 test questions that the experts marked" in en and "close to the experts' answer" not in en
    assert [data for _, data in rows[0]] == [f"tv:t:{second.id}", f"tv:a:{second.id}", f"tv:d:{second.id}"]
    ru, _ = report(store, assistant, job, second, "ru")
    assert f"Сделать версию #{second.id} активной?" in ru and f"версия #{first.id}" in ru
    job, third = finished(store, assistant, {**METRICS, "eval_on": "test", "eval_by_overlap": 3})
    assert "close to the experts' answer" in report(store, assistant, job, third, "en")[0]  # 3 lacked must_contain


def test_a_candidate_with_nothing_active_says_few_shot_answers(store, assistant):
    _, first = finished(store, assistant, METRICS)
    store.set_version_status(first.id, "discarded")  # nothing active, but a version was active before
    job, second = finished(store, assistant, METRICS)
    assert second.status == "candidate"
    en, _ = render_finish_report(job, "en", version=second, active_version_id=None)
    assert "/chat answers with few-shot" in en


def test_a_run_without_evaluation_says_so_plainly(store, assistant):
    job, version = finished(store, assistant, {"steps": 12, "total_steps": 12, "eval_on": "none"})
    for lang, phrase in (("en", "No before/after check this time"), ("ru", "Сравнения «до и после» на этот раз нет")):
        text, _ = report(store, assistant, job, version, lang)
        assert phrase in text and "<pre>" not in text and "steps" not in text


def test_held_out_variations_are_evaluated_when_there_is_no_test_split():
    items = [TrainItem(f"Question {g}?", f"Answer {g}", group=str(g)) for g in range(5)]
    items += [TrainItem(f"Question {g} reworded {v}?", f"Answer {g}", group=str(g), variation=True)
              for g in range(5) for v in range(4)]
    held, kind = eval_items(items, [], TrainConfig())
    assert kind == "variations" and len(held) == 4  # 20% of 20 variations, the validation split of train()
    assert all("reworded" in h["question"] for h in held)
    assert eval_items(items, [{"question": "q", "answer": "a", "must_contain": ["a"]}], TrainConfig())[1] == "test"
    assert eval_items(items[:2], [], TrainConfig()) == ([], "none")
    assert len(eval_items(items, [], TrainConfig(), limit=2)[0]) == 2

    evaluation = {"modes": {"base": {"accuracy": None}, "grounded": {"accuracy": None}},
                  "answers": [{"base": "no idea", "grounded": h["answer"]} for h in held]}
    assert judge(evaluation, held) == {"base": 0, "grounded": 4}
    assert evaluation["modes"]["grounded"]["accuracy"] == 1.0  # judged by overlap with the experts' answer
    examples = before_after_examples(evaluation, held, after="grounded")
    assert len(examples) == 2 and examples[0]["before"] == "no idea" and examples[0]["after_correct"]
