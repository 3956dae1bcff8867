"""What each job kind does inside its child process: train, eval, generate."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

from storage import Job, Store
from tuning.jobs.queue import JobError
from tuning.jobs.versions import beats, promote_version, register_candidate

log = logging.getLogger(__name__)

# Summary numbers copied from an evaluation mode into a version's metrics.
EVAL_KEYS = ("accuracy", "f1", "rouge_l", "stop_rate", "ttft_ms", "tokens_per_s")


class Stopped(Exception):
    """The job was asked to stop (cancel, SIGTERM, worker gone) before it finished."""


def job_dir(artifacts: str | Path, job: Job) -> Path:
    return Path(artifacts) / str(job.assistant_id or 0) / f"job-{job.id}"


class ProgressWriter:
    """on_progress for training: merges each report into jobs.progress, written at most every `every_s`."""

    def __init__(self, store: Store, job: Job, *, every_s: float = 1.0, fault: dict | None = None) -> None:
        self.store = store
        self.job = job
        self.every_s = every_s
        self.fault = fault or {}
        self.progress: dict = dict(job.progress or {})
        self._last = 0.0

    def __call__(self, info: dict) -> None:
        self.progress.update({k: v for k, v in info.items() if _jsonable(v)})
        self.progress["attempt"] = self.job.attempts
        step, total = info.get("step"), info.get("total_steps")
        now = time.monotonic()
        if now - self._last >= self.every_s or (step is not None and step == total):
            self.flush()
        self._maybe_fault(step)

    def evaluating(self, mode: str, done: int, total: int) -> None:
        """on_progress for evaluation: which mode, how many questions answered."""
        self.progress.update(phase="evaluating", eval_mode=mode, eval_done=done, eval_total=total)
        if time.monotonic() - self._last >= self.every_s or done == total:
            self.flush()

    def phase(self, name: str) -> None:
        self.progress["phase"] = name
        self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        self.store.transition_job(self.job.id, from_states=("running",), progress=self.progress)

    def _maybe_fault(self, step: int | None) -> None:
        """Test-only fault injection (job params {"fault": {"kill_at_step": N, "on_attempts": [..]}})."""
        at = self.fault.get("kill_at_step")
        attempts = self.fault.get("on_attempts")
        if at is None or step is None or step < at:
            return
        if attempts is not None and self.job.attempts not in attempts:
            return
        self.flush()
        log.warning("fault injection: SIGKILL at step %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _asdict(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return {k: v for k, v in dataclasses.asdict(obj).items() if _jsonable(v)}
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if _jsonable(v)}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_") and _jsonable(v)}


def run(store: Store, job: Job, *, artifacts: str | Path, cache_dir: str | None, default_base_model: str,
        auto_promote: bool, should_stop: Callable[[], bool]) -> dict:
    """Run the job's kind; returns the result stored on the job."""
    if job.kind == "train":
        return run_train(store, job, artifacts=artifacts, cache_dir=cache_dir,
                         default_base_model=default_base_model, auto_promote=auto_promote, should_stop=should_stop)
    if job.kind == "eval":
        return run_eval(store, job, cache_dir=cache_dir, default_base_model=default_base_model)
    if job.kind == "generate":
        return run_generate(store, job)
    raise JobError(f"unknown job kind {job.kind!r}")


def _train_config(params: dict, base_model: str):
    from tuning.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = params.get("config") or {}
    unknown = set(given) - names
    if unknown:
        raise JobError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainConfig(**{**given, "base_model": given.get("base_model") or base_model})


def _eval_summary(modes: dict, mode: str) -> dict:
    return {k: modes.get(mode, {}).get(k) for k in EVAL_KEYS if modes.get(mode, {}).get(k) is not None}


def run_train(store: Store, job: Job, *, artifacts, cache_dir, default_base_model: str, auto_promote: bool,
              should_stop: Callable[[], bool]) -> dict:
    """Train (resuming from the job's checkpoints), evaluate on the test split, register a candidate."""
    from tuning.dataset import items_from_store
    from tuning.train import TrainingCancelled, train

    assistant = store.get_assistant(job.assistant_id)
    params = job.params or {}
    base_model = params.get("base_model") or assistant.base_model or default_base_model
    config = _train_config(params, base_model)
    items = items_from_store(store, assistant.id)
    train_items = [i for i in items if i.split != "test"]
    test_items = store.list_examples(assistant.id, status="approved", split="test")  # they carry must_contain
    if not train_items:
        raise JobError(f"assistant {assistant.name!r} has no approved training examples")
    out_dir = job_dir(artifacts, job)
    progress = ProgressWriter(store, job, fault=params.get("fault"))
    progress.phase("training")
    try:
        report = train(train_items, out_dir=out_dir, config=config, system_prompt=assistant.system_prompt or "",
                       cache_dir=cache_dir, on_progress=progress, should_stop=should_stop, resume=True)
    except TrainingCancelled:
        raise Stopped() from None
    last_epoch = report.epochs[-1] if report.epochs else {}
    metrics: dict = {"steps": report.steps, "total_steps": report.hyperparameters.get("total_steps"),
                     "epochs_done": len(report.epochs), "train_loss": last_epoch.get("train_loss"),
                     "best_val_loss": report.best_val_loss, "val_kind": report.val_kind,
                     "resumed_from_step": report.resumed_from_step, "tokens_per_s": report.tokens_per_s,
                     "duration_s": report.duration_s, "stopped_early": report.stopped_early}
    evaluation = None
    if test_items:
        from tuning.evaluate import evaluate

        progress.phase("evaluating")
        evaluation = evaluate(test_items, base_model=config.base_model, adapter_dir=str(out_dir),
                              modes=("base", "tuned"), system_prompt=assistant.system_prompt or "",
                              cache_dir=cache_dir, max_new_tokens=int(params.get("eval_max_new_tokens", 128)),
                              on_progress=progress.evaluating)
        metrics.update(_eval_summary(evaluation["modes"], "tuned"))
        metrics["base_accuracy"] = evaluation["modes"].get("base", {}).get("accuracy")
        metrics["n_test"] = evaluation.get("n")
        (out_dir / "evaluation.json").write_text(json.dumps(evaluation, ensure_ascii=False, indent=2, default=str))
    if should_stop():
        raise Stopped()
    version = register_candidate(store, assistant.id, job_id=job.id, adapter_path=str(out_dir),
                                 base_model=config.base_model, dataset_hash=report.data_hash,
                                 hyperparameters=report.hyperparameters, metrics=metrics)
    promoted, why = False, "auto-promotion is off"
    if auto_promote:
        promoted, why = _maybe_promote(store, assistant, version, evaluation, test_items, cache_dir=cache_dir,
                                       max_new_tokens=int(params.get("eval_max_new_tokens", 128)))
    progress.phase("done")
    return {"version_id": version.id, "promoted": promoted, "promotion": why, "adapter_dir": str(out_dir),
            "metrics": metrics}


def _maybe_promote(store: Store, assistant, version, evaluation, test_items, *, cache_dir, max_new_tokens):
    """Promote when the candidate beats what answers now (the active version, else the base model)."""
    if evaluation is None:
        return False, "no test examples to compare on; promote it by hand"
    tuned = _eval_summary(evaluation["modes"], "tuned")
    if assistant.active_version_id:
        from tuning.evaluate import evaluate

        active = store.get_model_version(assistant.active_version_id)
        incumbent = evaluate(test_items, base_model=active.base_model, adapter_dir=active.adapter_path,
                             modes=("tuned",), system_prompt=assistant.system_prompt or "", cache_dir=cache_dir,
                             max_new_tokens=max_new_tokens)
        theirs, name = _eval_summary(incumbent["modes"], "tuned"), f"active version #{active.id}"
    else:
        theirs, name = _eval_summary(evaluation["modes"], "base"), "the base model"
    if beats(tuned, theirs):
        promote_version(store, version.id)
        return True, f"beat {name} ({tuned.get('accuracy')} > {theirs.get('accuracy')})"
    return False, f"did not beat {name} ({tuned.get('accuracy')} vs {theirs.get('accuracy')})"


def run_eval(store: Store, job: Job, *, cache_dir, default_base_model: str) -> dict:
    """Evaluate a version (params.version_id, default the active one) and the base model on the test split."""
    from tuning.evaluate import evaluate

    assistant = store.get_assistant(job.assistant_id)
    params = job.params or {}
    test_items = store.list_examples(assistant.id, status="approved", split="test")
    if not test_items:
        raise JobError(f"assistant {assistant.name!r} has no approved test examples to evaluate on")
    version_id = params.get("version_id") or assistant.active_version_id
    version = store.get_model_version(version_id) if version_id else None
    base_model = version.base_model if version else (assistant.base_model or default_base_model)
    result = evaluate(test_items, base_model=base_model, adapter_dir=version.adapter_path if version else None,
                      modes=("base", "tuned") if version else ("base",), system_prompt=assistant.system_prompt or "",
                      cache_dir=cache_dir, max_new_tokens=int(params.get("max_new_tokens", 128)))
    return {"version_id": version.id if version else None, "n": result.get("n"),
            "modes": {m: _eval_summary(result["modes"], m) for m in result["modes"]}}


def run_generate(store: Store, job: Job) -> dict:
    """Rule-based variations (typos, word order, …) of approved examples, pending review."""
    from tuning.mutate import mutate_assistant

    params = job.params or {}
    run = mutate_assistant(store, job.assistant_id, per_example=int(params.get("per_example", 3)),
                           seed=int(params.get("seed", 0)), author_id=job.created_by)
    return {"generation_run_id": run.id, "kept": run.kept, "generated": run.generated}
