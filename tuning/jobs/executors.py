"""What each job kind does, wherever it runs: a pure job function on a serialized spec, DB writes by the caller.

`job_spec` reads everything a job needs from the database into a JSON-able dict; `run_job_spec` runs it
without touching the database (in the local child process or in a Ray task on another node), reporting
progress through a callback; `record_outcome` writes its result (the candidate version, promotion) back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from storage import Job, Store
from tuning.jobs.evaluation import (EVAL_MAX_ITEMS, before_after_examples, eval_items, eval_summary, judge,
                                   test_item)
from tuning.jobs.progress import ProgressWriter, db_progress_sink
from tuning.jobs.queue import JobError
from tuning.jobs.versions import activate_first, beats, promote_version, register_candidate

log = logging.getLogger(__name__)

# Kinds whose work needs no database access: the ray executor can run them on another node.
PORTABLE_KINDS = ("train", "eval")


class Stopped(Exception):
    """The job was asked to stop (cancel, SIGTERM, worker gone) before it finished."""


def job_key(job: Job | dict) -> str:
    """The job's folder inside the artifacts store: '<assistant id>/job-<id>'."""
    if isinstance(job, dict):
        return f"{job.get('assistant_id') or 0}/job-{job['job_id']}"
    return f"{job.assistant_id or 0}/job-{job.id}"


def job_dir(artifacts: str | Path, job: Job) -> Path:
    """The job's folder in a local artifacts store."""
    return Path(artifacts) / job_key(job)


# ------------------------------------------------------------------ specs (read the database)
def job_spec(store: Store, job: Job, *, default_base_model: str, auto_promote: bool = False) -> dict:
    """Everything a portable job needs, read from the database, as a JSON-able dict."""
    if job.kind == "train":
        return training_spec(store, job, default_base_model=default_base_model, auto_promote=auto_promote)
    if job.kind == "eval":
        return eval_spec(store, job, default_base_model=default_base_model)
    raise JobError(f"job kind {job.kind!r} needs the database and runs only on the worker's host")


def training_spec(store: Store, job: Job, *, default_base_model: str, auto_promote: bool = False) -> dict:
    """The training job's examples, settings and (for auto-promotion) the version it must beat."""
    from tuning.data.dataset import items_from_store

    assistant = store.get_assistant(job.assistant_id)
    params = job.params or {}
    # Test items stay in: train() drops every group that holds a test question, variations included.
    items = items_from_store(store, assistant.id)
    if not any(i.split != "test" for i in items):
        raise JobError(f"assistant {assistant.name!r} has no approved training examples",
                       code="no_training_examples", params={"name": assistant.name})
    incumbent = None
    if auto_promote and assistant.active_version_id:
        active = store.get_model_version(assistant.active_version_id)
        incumbent = {"id": active.id, "base_model": active.base_model, "adapter_path": active.adapter_path}
    return {"kind": "train", "job_id": job.id, "assistant_id": assistant.id, "assistant": assistant.name,
            "attempt": job.attempts, "params": params, "progress": job.progress or {},
            "base_model": params.get("base_model") or assistant.base_model or default_base_model,
            "system_prompt": assistant.system_prompt or "",
            "items": [dataclasses.asdict(i) for i in items],
            "test_items": [test_item(e) for e in store.list_examples(assistant.id, status="approved", split="test")],
            "incumbent": incumbent}


def eval_spec(store: Store, job: Job, *, default_base_model: str) -> dict:
    """The version to evaluate (params.version_id, default the active one) and the test split."""
    assistant = store.get_assistant(job.assistant_id)
    params = job.params or {}
    test_items = store.list_examples(assistant.id, status="approved", split="test")
    if not test_items:
        raise JobError(f"assistant {assistant.name!r} has no approved test examples to evaluate on",
                       code="no_test_examples", params={"name": assistant.name})
    version_id = params.get("version_id") or assistant.active_version_id
    version = store.get_model_version(version_id) if version_id else None
    return {"kind": "eval", "job_id": job.id, "assistant_id": assistant.id, "attempt": job.attempts,
            "params": params, "progress": job.progress or {},
            "version_id": version.id if version else None,
            "base_model": version.base_model if version else (assistant.base_model or default_base_model),
            "adapter_path": version.adapter_path if version else None,
            "system_prompt": assistant.system_prompt or "", "test_items": [test_item(e) for e in test_items]}


# ------------------------------------------------------------------ pure job functions (no database)
def run_job_spec(spec: dict, *, artifacts: str, cache_dir: str | None, progress_cb: Callable[[dict], None],
                 should_stop: Callable[[], bool], staging_dir: str | Path | None = None) -> dict:
    """Run a portable job from its spec; returns its outcome (see record_outcome)."""
    if spec["kind"] == "train":
        return run_training_job(spec, artifacts=artifacts, cache_dir=cache_dir, progress_cb=progress_cb,
                                should_stop=should_stop, staging_dir=staging_dir)
    if spec["kind"] == "eval":
        return run_eval_job(spec, cache_dir=cache_dir)
    raise JobError(f"unknown portable job kind {spec['kind']!r}")


def _train_config(params: dict, base_model: str):
    from tuning.training.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = params.get("config") or {}
    unknown = set(given) - names
    if unknown:
        raise JobError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainConfig(**{**given, "base_model": given.get("base_model") or base_model})


def run_training_job(spec: dict, *, artifacts: str, cache_dir: str | None, progress_cb: Callable[[dict], None],
                     should_stop: Callable[[], bool], staging_dir: str | Path | None = None) -> dict:
    """Train (resuming from the job's checkpoints), evaluate (test split, else held-out questions), store it all.

    With a remote artifacts store the run writes to a local staging folder, syncs it up after every
    epoch (so a retry on another node resumes) and at the end; the outcome names the stored folder.
    """
    from tuning.artifacts import ArtifactStore
    from tuning.data.dataset import TrainItem
    from tuning.training.config import TrainingCancelled
    from tuning.training.progress import TrainProgress
    from tuning.training.run import train

    params = spec.get("params") or {}
    config = _train_config(params, spec["base_model"])
    items = [TrainItem(**i) for i in spec["items"]]
    store, key = ArtifactStore(artifacts), job_key(spec)
    if store.remote:
        out_dir = Path(staging_dir or Path(tempfile.gettempdir()) / "tunebot-staging") / key
        if not (out_dir / "checkpoints").exists() and store.exists(f"{key}/checkpoints"):
            log.info("job #%s: fetching its checkpoints from %s", spec["job_id"], store.url_for(key))
            store.download_dir(key, out_dir)
    else:
        out_dir = Path(store.url_for(key))
    progress = ProgressWriter(progress_cb, attempt=spec.get("attempt", 1), progress=spec.get("progress"),
                              fault=params.get("fault"))

    def on_progress(info: TrainProgress) -> None:
        progress(info.to_dict())
        if store.remote and (info.epoch_done or info.checkpoint):
            store.upload_dir(out_dir, key)  # the checkpoint, for a retry elsewhere

    progress.phase("training")
    try:
        report = train(items, out_dir=out_dir, config=config, system_prompt=spec.get("system_prompt", ""),
                       cache_dir=cache_dir, on_progress=on_progress, should_stop=should_stop, resume=True)
    except TrainingCancelled:
        if store.remote:
            store.upload_dir(out_dir, key)
        raise Stopped() from None
    last_epoch = report.epochs[-1] if report.epochs else {}
    metrics: dict = {"steps": report.steps, "total_steps": report.hyperparameters.get("total_steps"),
                     "epochs_done": len(report.epochs), "train_loss": last_epoch.get("train_loss"),
                     "best_val_loss": report.best_val_loss, "val_kind": report.val_kind,
                     "resumed_from_step": report.resumed_from_step, "tokens_per_s": report.tokens_per_s,
                     "duration_s": report.duration_s, "stopped_early": report.stopped_early}
    evaluation, incumbent = _evaluate_version(spec, items, config, out_dir, metrics=metrics, cache_dir=cache_dir,
                                              progress=progress)
    if should_stop():
        raise Stopped()
    adapter_dir = store.upload_dir(out_dir, key) if store.remote else str(out_dir)
    return {"kind": "train", "adapter_dir": adapter_dir, "base_model": config.base_model,
            "dataset_hash": report.data_hash, "hyperparameters": report.hyperparameters, "metrics": metrics,
            "evaluation": {"n": evaluation.get("n"), "modes": evaluation["modes"]} if evaluation else None,
            "incumbent": incumbent}


def _evaluate_version(spec: dict, items: list, config, out_dir: Path, *, metrics: dict, cache_dir, progress):
    """Evaluate the new version (test split, else held-out questions) in every mode, and the active version in
    its own, on the same questions; adds the summary to `metrics`; (evaluation, incumbent's summary)."""
    from tuning.artifacts import local_dir

    params = spec.get("params") or {}
    max_new_tokens = int(params.get("eval_max_new_tokens", 128))
    test_items, eval_on = eval_items(items, spec.get("test_items") or [], config,
                                     limit=int(params.get("eval_max_items", EVAL_MAX_ITEMS)))
    metrics["eval_on"] = eval_on
    if not test_items:
        return None, None
    from tuning.evaluate import evaluate, markdown_table
    from tuning.grounding import answer_mode

    progress.phase("evaluating")
    mode = answer_mode(out_dir)  # what users will get from this version
    evaluation = evaluate(test_items, base_model=config.base_model, adapter_dir=str(out_dir),
                          modes=("base", "fewshot", "lookup", "tuned", "grounded"),
                          system_prompt=spec.get("system_prompt", ""), cache_dir=cache_dir,
                          max_new_tokens=max_new_tokens, on_progress=progress.evaluating, include_answers=True)
    correct = judge(evaluation, test_items)
    evaluation["modes"]["answer"] = evaluation["modes"][mode]  # the summary promotion compares
    metrics.update(eval_summary(evaluation["modes"], "answer"))
    metrics["answer_mode"] = mode
    metrics["eval_table"] = markdown_table({**evaluation, "modes": {m: v for m, v in evaluation["modes"].items()
                                                                    if m != "answer"}})
    metrics["base_accuracy"] = evaluation["modes"].get("base", {}).get("accuracy")
    metrics["n_test"] = evaluation.get("n")
    metrics["eval_correct"] = correct
    metrics["eval_by_overlap"] = sum(1 for it in test_items if not it.get("must_contain"))
    metrics["eval_examples"] = before_after_examples(evaluation, test_items, after=mode)
    (out_dir / "evaluation.json").write_text(json.dumps(evaluation, ensure_ascii=False, indent=2, default=str))
    evaluation.pop("answers", None)
    incumbent = None
    if spec.get("incumbent"):
        theirs = spec["incumbent"]
        their_dir = str(local_dir(theirs["adapter_path"], cache_dir=cache_dir))
        their_mode = answer_mode(their_dir)
        result = evaluate(test_items, base_model=theirs["base_model"], adapter_dir=their_dir,
                          modes=(their_mode,), system_prompt=spec.get("system_prompt", ""), cache_dir=cache_dir,
                          max_new_tokens=max_new_tokens, include_answers=True)
        judge(result, test_items)
        incumbent = {"id": theirs["id"], "summary": eval_summary(result["modes"], their_mode)}
    return evaluation, incumbent


def run_eval_job(spec: dict, *, cache_dir: str | None) -> dict:
    """Evaluate a version and the base model on the test split; the outcome is the job's result."""
    from tuning.artifacts import local_dir
    from tuning.evaluate import evaluate

    adapter = spec.get("adapter_path")
    adapter = str(local_dir(adapter, cache_dir=cache_dir)) if adapter else None
    result = evaluate(spec["test_items"], base_model=spec["base_model"], adapter_dir=adapter,
                      modes=("base", "tuned") if adapter else ("base",), system_prompt=spec.get("system_prompt", ""),
                      cache_dir=cache_dir, max_new_tokens=int((spec.get("params") or {}).get("max_new_tokens", 128)))
    return {"kind": "eval", "version_id": spec.get("version_id"), "n": result.get("n"),
            "modes": {m: eval_summary(result["modes"], m) for m in result["modes"]}}


# ------------------------------------------------------------------ database writes (the caller's side)
def record_outcome(store: Store, job: Job, outcome: dict, *, auto_promote: bool,
                   progress_cb: Callable[[dict], None] | None = None) -> dict:
    """Write a portable job's outcome (candidate version, promotion); returns the result stored on the job."""
    if outcome.get("kind") == "eval":
        return {k: v for k, v in outcome.items() if k != "kind"}
    assistant = store.get_assistant(job.assistant_id)
    version = register_candidate(store, assistant.id, job_id=job.id, adapter_path=outcome["adapter_dir"],
                                 base_model=outcome["base_model"], dataset_hash=outcome["dataset_hash"],
                                 hyperparameters=outcome["hyperparameters"], metrics=outcome["metrics"])
    promoted, why = False, "auto-promotion is off"
    if auto_promote:
        incumbent = outcome.get("incumbent")
        if incumbent and incumbent["id"] != store.get_assistant(assistant.id).active_version_id:
            incumbent = None  # the active version changed while training: not compared, promoted by hand
        promoted, why = _maybe_promote(store, assistant, version, outcome.get("evaluation"), incumbent=incumbent)
    first = not promoted and activate_first(store, version)
    if first:
        promoted, why = True, "the first trained version: nothing was active"
    if progress_cb is not None:
        progress_cb({**(job.progress or {}), "phase": "done"})
    return {"version_id": version.id, "promoted": promoted, "promotion": why, "first_version": first,
            "adapter_dir": outcome["adapter_dir"],
            "metrics": outcome["metrics"]}


def _maybe_promote(store: Store, assistant, version, evaluation, *, incumbent: dict | None = None):
    """Promote when the candidate beats what answers now (the active version, else the base model).

    `incumbent` ({"id", "summary"}) is the active version's evaluation, computed by the job on the same
    questions; without it (no active version when the job started, or another one since) nothing is compared.
    """
    if evaluation is None:
        return False, "no test examples to compare on; promote it by hand"
    tuned = eval_summary(evaluation["modes"], "answer" if "answer" in evaluation["modes"] else "tuned")
    if assistant.active_version_id:
        active = store.get_model_version(assistant.active_version_id)
        if not incumbent or incumbent["id"] != active.id:
            return False, f"the active version #{active.id} changed during training; promote it by hand"
        theirs, name = incumbent["summary"], f"active version #{active.id}"
    else:
        theirs, name = eval_summary(evaluation["modes"], "base"), "the base model"
    if beats(tuned, theirs):
        promote_version(store, version.id)
        return True, f"beat {name} ({tuned.get('accuracy')} > {theirs.get('accuracy')})"
    return False, f"did not beat {name} ({tuned.get('accuracy')} vs {theirs.get('accuracy')})"


# ------------------------------------------------------------------ the local child's entry point
def run(store: Store, job: Job, *, artifacts: str | Path, cache_dir: str | None, default_base_model: str,
        auto_promote: bool, should_stop: Callable[[], bool]) -> dict:
    """Run the job here (the local child process): spec, job function, then the DB writes; returns the result."""
    if job.kind == "generate":
        return run_generate(store, job)
    if job.kind not in PORTABLE_KINDS:
        raise JobError(f"unknown job kind {job.kind!r}")
    spec = job_spec(store, job, default_base_model=default_base_model, auto_promote=auto_promote)
    sink = db_progress_sink(store, job.id)
    outcome = run_job_spec(spec, artifacts=str(artifacts), cache_dir=cache_dir, progress_cb=sink,
                           should_stop=should_stop)
    return record_outcome(store, store.get_job(job.id), outcome, auto_promote=auto_promote, progress_cb=sink)


def run_generate(store: Store, job: Job) -> dict:
    """Rule-based variations (typos, word order, …) of approved examples, pending review."""
    from tuning.data.mutate import mutate_assistant

    params = job.params or {}
    run = mutate_assistant(store, job.assistant_id, per_example=int(params.get("per_example", 3)),
                           seed=int(params.get("seed", 0)), author_id=job.created_by)
    return {"generation_run_id": run.id, "kept": run.kept, "generated": run.generated}
