"""The eval and generate job kinds, run in-process the way the child process runs them."""

from __future__ import annotations

from tuning.jobs import enqueue_generation
from tuning.jobs.executors import run
from jobs_helpers import add_examples


def _running(store, job):
    store.claim_job(worker_id="test", free=1, gpu_mode=False)
    return store.get_job(job.id)


def test_eval_job_scores_the_base_model_on_the_test_split(store, assistant, tiny_model_dir):
    add_examples(store, assistant.id, 2, test=2)
    job = _running(store, store.create_job("eval", assistant_id=assistant.id, params={"max_new_tokens": 4}))
    result = run(store, job, artifacts="unused", cache_dir=None, default_base_model=tiny_model_dir,
                 auto_promote=False, should_stop=lambda: False)
    assert result["version_id"] is None and result["n"] == 2
    assert set(result["modes"]) == {"base"} and 0.0 <= result["modes"]["base"]["accuracy"] <= 1.0


def test_generate_job_proposes_pending_variations(store, assistant):
    add_examples(store, assistant.id, 3)
    job = _running(store, enqueue_generation(store, assistant.id, per_example=2, seed=1))
    result = run(store, job, artifacts="unused", cache_dir=None, default_base_model="unused",
                 auto_promote=False, should_stop=lambda: False)
    pending = store.list_examples(assistant.id, status="pending")
    assert result["kept"] == len(pending) > 0
    assert all(ex.generation_run_id == result["generation_run_id"] and ex.parent_id for ex in pending)
