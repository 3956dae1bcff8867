"""Jobs and the workers that claim them, model versions and retrain policies."""

from __future__ import annotations

import json
from typing import Any, Iterable


from storage.common import check_value, one_row
from storage.db import transaction
from storage.records import JOB_KINDS, JOB_STATES, VERSION_STATES, Job, ModelVersion, RetrainPolicy, from_row


class JobStore:
    """The store part about training and its results (mixed into Store)."""

    # ----------------------------------------------------------------- jobs
    def create_job(self, kind: str, *, assistant_id: int | None = None, params: dict | None = None,
                   priority: int = 0, gpus: int = 0, scheduled_at: str | None = None,
                   max_attempts: int = 3, created_by: int | None = None) -> Job:
        check_value(kind, JOB_KINDS, "job kind")
        with transaction(self.db):
            jid = self.db["jobs"].insert({
                "kind": kind, "assistant_id": assistant_id, "status": "scheduled" if scheduled_at else "queued",
                "priority": priority, "gpus": gpus, "params": json.dumps(params or {}, ensure_ascii=False),
                "scheduled_at": scheduled_at, "max_attempts": max_attempts, "created_by": created_by,
                "created_at": self.now(),
            }).last_pk
            self.audit("job.create", user_id=created_by, assistant_id=assistant_id,
                       details={"job_id": jid, "kind": kind})
        return self.get_job(jid)

    def get_job(self, job_id: int) -> Job:
        return from_row(Job, one_row(self.db, "jobs", job_id, "job"))

    def list_jobs(self, *, assistant_id: int | None = None, status: str | Iterable[str] | None = None,
                  limit: int | None = None) -> list[Job]:
        where, args = [], []
        if assistant_id is not None:
            where.append("assistant_id = ?")
            args.append(assistant_id)
        if status is not None:
            states = [status] if isinstance(status, str) else list(status)
            where.append(f"status in ({', '.join('?' * len(states))})")
            args.extend(states)
        rows = self.db["jobs"].rows_where(" and ".join(where) or None, args, order_by="id desc", limit=limit)
        return [from_row(Job, r) for r in rows]

    def update_job(self, job_id: int, **fields: Any) -> Job:
        if "status" in fields:
            check_value(fields["status"], JOB_STATES, "job status")
        for key in ("params", "progress", "result"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], ensure_ascii=False)
        self.db["jobs"].update(job_id, fields)
        return self.get_job(job_id)

    def transition_job(self, job_id: int, *, from_states: Iterable[str], **fields: Any) -> bool:
        """Update a job only while its status is one of `from_states`; False when it was not."""
        if "status" in fields:
            check_value(fields["status"], JOB_STATES, "job status")
        for key in ("params", "progress", "result"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], ensure_ascii=False)
        states = list(from_states)
        sets = ", ".join(f"[{k}] = ?" for k in fields)
        cur = self.db.execute(
            f"update jobs set {sets} where id = ? and status in ({', '.join('?' * len(states))})",
            [*fields.values(), job_id, *states])
        return cur.rowcount == 1

    def claim_job(self, *, worker_id: str, free: int, gpu_mode: bool,
                  exclude_kinds: Iterable[str] = ()) -> Job | None:
        """Atomically take the best queued job that fits `free` slots (GPUs in gpu_mode), or None."""
        excluded = list(exclude_kinds)
        need = "max(coalesce(gpus, 0), 1)" if gpu_mode else "1"
        kinds = f"and kind not in ({', '.join('?' * len(excluded))})" if excluded else ""
        now = self.now()
        with transaction(self.db):  # an UPDATE … RETURNING is not committed by sqlite-utils on its own
            row = self.db.execute(
                "update jobs set status = 'running', worker_id = ?, attempts = attempts + 1, started_at = ?, "
                "heartbeat_at = ?, error = null, pid = null where id = (select id from jobs where status = 'queued' "
                f"and {need} <= ? {kinds} order by priority desc, id limit 1) and status = 'queued' returning id",
                [worker_id, now, now, free, *excluded]).fetchone()
        return self.get_job(row[0]) if row else None

    def release_due_jobs(self) -> list[int]:
        """Scheduled jobs whose time has come become queued; returns their ids."""
        with transaction(self.db):
            rows = self.db.execute("update jobs set status = 'queued' where status = 'scheduled' "
                                   "and scheduled_at <= ? returning id", [self.now()]).fetchall()
        return sorted(r[0] for r in rows)

    def worker_heartbeat(self, worker_id: str, *, host: str, pid: int, slots: str) -> None:
        """Record that a worker is alive now (its row is created on the first beat)."""
        now = self.now()
        self.db.execute("insert into workers (id, host, pid, slots, started_at, heartbeat_at) values (?, ?, ?, ?, ?, ?) "
                        "on conflict(id) do update set heartbeat_at = excluded.heartbeat_at",
                        [worker_id, host, pid, slots, now, now])

    def remove_worker(self, worker_id: str) -> None:
        self.db.execute("delete from workers where id = ?", [worker_id])

    def live_workers(self, *, since: str) -> list[dict]:
        """Workers whose last heartbeat is at or after `since`."""
        return list(self.db.query("select * from workers where heartbeat_at >= ? order by id", [since]))

    def count_approved_since(self, assistant_id: int, since: str | None) -> int:
        """Live approved examples added or approved after `since` (all of them when None)."""
        return self.db.execute(
            "select count(*) from examples where assistant_id = ? and status = 'approved' and deleted_at is null "
            "and (? is null or updated_at > ?)", [assistant_id, since, since]).fetchone()[0]

    # ------------------------------------------------------- model versions
    def add_model_version(self, assistant_id: int, *, adapter_path: str, base_model: str,
                          job_id: int | None = None, dataset_hash: str | None = None,
                          hyperparameters: dict | None = None, metrics: dict | None = None) -> ModelVersion:
        with transaction(self.db):
            vid = self.db["model_versions"].insert({
                "assistant_id": assistant_id, "job_id": job_id, "adapter_path": adapter_path,
                "base_model": base_model, "dataset_hash": dataset_hash,
                "hyperparameters": json.dumps(hyperparameters or {}), "metrics": json.dumps(metrics or {}),
                "status": "candidate", "created_at": self.now(),
            }).last_pk
            self.audit("version.create", assistant_id=assistant_id, details={"version_id": vid, "job_id": job_id})
        return self.get_model_version(vid)

    def get_model_version(self, version_id: int) -> ModelVersion:
        return from_row(ModelVersion, one_row(self.db, "model_versions", version_id, "model version"))

    def list_model_versions(self, assistant_id: int) -> list[ModelVersion]:
        return [from_row(ModelVersion, r) for r in
                self.db["model_versions"].rows_where("assistant_id = ?", [assistant_id], order_by="id")]

    def recent_model_versions(self, *, limit: int = 50) -> list[ModelVersion]:
        """The newest model versions of every assistant, newest first (trained on this installation)."""
        return [from_row(ModelVersion, r) for r in
                self.db["model_versions"].rows_where(order_by="id desc", limit=limit)]

    def activate_version(self, version_id: int, *, by: int | None = None) -> ModelVersion:
        """Make this version the assistant's active one; the previous active one is archived."""
        with transaction(self.db):
            version = self.get_model_version(version_id)
            self.db.execute("update model_versions set status = 'archived' where assistant_id = ? and status = 'active'",
                            [version.assistant_id])
            self.db["model_versions"].update(version_id, {"status": "active", "promoted_at": self.now()})
            self.db["assistants"].update(version.assistant_id, {"active_version_id": version_id})
            self.audit("version.activate", user_id=by, assistant_id=version.assistant_id,
                       details={"version_id": version_id})
        return self.get_model_version(version_id)

    def set_version_status(self, version_id: int, status: str, *, by: int | None = None) -> ModelVersion:
        check_value(status, VERSION_STATES, "version status")
        if status == "active":
            return self.activate_version(version_id, by=by)
        with transaction(self.db):
            version = self.get_model_version(version_id)
            self.db["model_versions"].update(version_id, {"status": status})
            if version.status == "active":
                self.db["assistants"].update(version.assistant_id, {"active_version_id": None})
            self.audit(f"version.{status}", user_id=by, assistant_id=version.assistant_id,
                       details={"version_id": version_id})
        return self.get_model_version(version_id)

    # ------------------------------------------------------ retrain policies
    def set_retrain_policy(self, assistant_id: int, *, cron: str, min_new: int = 1, enabled: bool = True) -> RetrainPolicy:
        self.get_assistant(assistant_id)
        self.db["retrain_policies"].upsert({"assistant_id": assistant_id, "cron": cron, "min_new": min_new,
                                            "enabled": int(enabled), "created_at": self.now()}, pk="assistant_id")
        return self.get_retrain_policy(assistant_id)

    def get_retrain_policy(self, assistant_id: int) -> RetrainPolicy | None:
        row = next(iter(self.db["retrain_policies"].rows_where("assistant_id = ?", [assistant_id])), None)
        return from_row(RetrainPolicy, row) if row else None

    def list_retrain_policies(self) -> list[RetrainPolicy]:
        return [from_row(RetrainPolicy, r) for r in self.db["retrain_policies"].rows_where("enabled = 1")]

    def mark_policy_run(self, assistant_id: int) -> None:
        self.db["retrain_policies"].update(assistant_id, {"last_run_at": self.now()})
