"""The /train time estimate: the throughput earlier runs of the same base model measured here, else a rough guess."""

from bot.telegram.handlers.training import TOKENS_PER_S_CPU, training_estimate
from tuning.jobs.versions import measured_tokens_per_s, register_candidate


def _finished_run(store, assistant_id: int, base_model: str, tokens_per_s: float | None) -> None:
    """A training job that succeeded, and the candidate version it registered (as the worker records them)."""
    job = store.create_job("train", assistant_id=assistant_id)
    metrics = {"steps": 12, "duration_s": 30.0} | ({"tokens_per_s": tokens_per_s} if tokens_per_s is not None else {})
    register_candidate(store, assistant_id, job_id=job.id, adapter_path=f"/artifacts/{job.id}", base_model=base_model,
                       dataset_hash="h", hyperparameters={}, metrics=metrics)
    store.update_job(job.id, status="succeeded", result={"metrics": metrics})


def test_no_run_of_the_model_yet_gives_no_measurement(store, assistant):
    assert measured_tokens_per_s(store, "bundled:smollm2-135m") is None
    _finished_run(store, assistant.id, "HuggingFaceTB/SmolLM2-360M-Instruct", 900.0)  # another model
    _finished_run(store, assistant.id, "bundled:smollm2-135m", None)  # a run that reported no throughput
    assert measured_tokens_per_s(store, "bundled:smollm2-135m") is None


def test_the_median_of_the_last_five_runs_of_the_same_model_on_any_assistant(store, assistant):
    other = store.create_assistant("globex", owner_id=2)
    for rate in (50.0, 60.0):  # old runs, left out: only the last five count
        _finished_run(store, assistant.id, "bundled:smollm2-135m", rate)
    for rate, owner in ((2400.0, assistant), (2500.0, other), (90.0, assistant), (2448.5, other), (2600.0, assistant)):
        _finished_run(store, owner.id, "bundled:smollm2-135m", rate)
    _finished_run(store, assistant.id, "HuggingFaceTB/SmolLM2-360M-Instruct", 10.0)
    assert measured_tokens_per_s(store, "bundled:smollm2-135m") == (2448.5, 5)  # the slow 90 does not skew it
    assert measured_tokens_per_s(store, "HuggingFaceTB/SmolLM2-360M-Instruct") == (10.0, 1)


def test_a_model_folder_is_one_model_however_it_is_written(store, assistant, tmp_path):
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    _finished_run(store, assistant.id, str(folder), 300.0)
    assert measured_tokens_per_s(store, str(tmp_path / "models" / ".." / "models" / "tiny")) == (300.0, 1)


def test_the_estimate_says_where_its_speed_comes_from():
    tokens = 60 * 2400 * 2  # two minutes at the measured 2,400 tokens/s
    measured = training_estimate(tokens, (2400.0, 3), lang="en")
    assert measured == ("Estimated time: ~2.0 min (at 2400 tokens/s, the median of the last 3 runs of this "
                        "model here)")
    assert "~2.0 мин" in training_estimate(tokens, (2400.0, 3), lang="ru")
    rough = training_estimate(tokens, None, lang="en")
    assert f"≈{tokens / TOKENS_PER_S_CPU / 60:.1f} min" in rough and "first run" in rough and "rough" in rough
    assert "≈" in training_estimate(tokens, None, lang="ru") and "грубая оценка" in training_estimate(
        tokens, None, lang="ru")
