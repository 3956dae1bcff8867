"""Model versions: register a trained candidate, compare, promote, and roll back."""

from __future__ import annotations

from storage import ModelVersion, Store
from tuning.jobs.queue import JobError

# Which evaluation numbers decide "better", in order (ties go to the next one).
RANKING = ("accuracy", "f1", "rouge_l")


def register_candidate(store: Store, assistant_id: int, *, job_id: int, adapter_path: str, base_model: str,
                       dataset_hash: str | None, hyperparameters: dict, metrics: dict) -> ModelVersion:
    """Add the candidate version of a training job, once (a retried job reuses its row)."""
    for version in store.list_model_versions(assistant_id):
        if version.job_id == job_id:
            return version
    return store.add_model_version(assistant_id, adapter_path=adapter_path, base_model=base_model, job_id=job_id,
                                   dataset_hash=dataset_hash, hyperparameters=hyperparameters, metrics=metrics)


def score(metrics: dict | None) -> tuple | None:
    """The comparable tuple of an evaluation summary, or None when there was no evaluation."""
    if not metrics or metrics.get("accuracy") is None:
        return None
    return tuple(float(metrics.get(k) or 0.0) for k in RANKING)


def beats(candidate: dict | None, incumbent: dict | None) -> bool:
    """True when the candidate's evaluation is strictly better than the incumbent's (or there is none)."""
    mine = score(candidate)
    if mine is None:
        return False
    theirs = score(incumbent)
    return theirs is None or mine > theirs


def promote_version(store: Store, version_id: int, *, by: int | None = None) -> ModelVersion:
    """Make a version the active one of its assistant (the previous active one is archived)."""
    version = store.get_model_version(version_id)
    if version.status == "discarded":
        raise JobError(f"version #{version_id} was discarded and cannot be promoted")
    if version.status == "active":
        return version
    return store.activate_version(version_id, by=by)


def activate_first(store: Store, version: ModelVersion) -> bool:
    """Activate a version when no version of its assistant is or ever was active (nothing trained answers yet).

    It cannot be worse than no trained version at all; later versions wait for a person (or auto-promotion).
    """
    assistant = store.get_assistant(version.assistant_id)
    if assistant.active_version_id or version.status != "candidate":
        return False
    if any(v.promoted_at for v in store.list_model_versions(assistant.id) if v.id != version.id):
        return False
    promote_version(store, version.id)
    return True


def rollback(store: Store, assistant_id: int, *, to: int | None = None, by: int | None = None) -> ModelVersion:
    """Activate an earlier version: `to`, or the one that was active before the current one."""
    assistant = store.get_assistant(assistant_id)
    if to is not None:
        version = store.get_model_version(to)
        if version.assistant_id != assistant_id:
            raise JobError(f"version #{to} belongs to another assistant")
        return promote_version(store, to, by=by)
    earlier = [v for v in store.list_model_versions(assistant_id)
               if v.promoted_at and v.id != assistant.active_version_id and v.status != "discarded"]
    if not earlier:
        raise JobError(f"{assistant.name!r} has no earlier active version to roll back to; "
                       "name one with --to (see `tunebot versions`)")
    earlier.sort(key=lambda v: (v.promoted_at, v.id))
    return promote_version(store, earlier[-1].id, by=by)


def measured_tokens_per_s(store: Store, base_model: str, *, last: int = 5) -> tuple[float, int] | None:
    """The median training throughput (tokens/s) of the last `last` runs of this base model here, and how many
    runs it is drawn from; None before the first run (a median: one run on a busy machine does not skew it)."""
    import statistics

    from tuning.models import model_key

    key = model_key(base_model)
    rates = [float(v.metrics["tokens_per_s"]) for v in store.recent_model_versions(limit=200)
             if model_key(v.base_model) == key and (v.metrics or {}).get("tokens_per_s")]
    rates = [r for r in rates if r > 0][:last]
    return (statistics.median(rates), len(rates)) if rates else None
