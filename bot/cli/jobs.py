"""CLI commands for jobs: `worker`, `jobs`, `versions`, `promote`, `rollback`, `schedule`, and `train --assistant`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import signal
import sys
import time

from bot.cli import CommandError
from tuning.training.progress import TrainProgress

DONE = ("succeeded", "failed", "cancelled")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse turns the error into exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the job commands to the `tunebot` parser."""
    w = subparsers.add_parser(
        "worker", help="run queued jobs (training, evaluation, generation) and the scheduler",
        description="Run jobs from the queue, each in its own process: one at a time per GPU (or the number of "
                    "CPU slots), retrying crashed ones and resuming training from its last checkpoint. Also "
                    "queues scheduled jobs at their time and runs the periodic retraining policies. Stop with "
                    "Ctrl-C or SIGTERM: running jobs are stopped and requeued.")
    w.add_argument("--gpus", metavar="N|LIST",
                   help="GPUs to use: a count or a comma-separated list of indices (default: all visible; "
                        "none = CPU)")
    w.add_argument("--slots", type=positive_int, default=None, metavar="N",
                   help="concurrent jobs (CPU) or GPUs used (default: the worker_slots setting)")
    w.add_argument("--poll", type=float, default=0.5, metavar="SECONDS", help="how often to look for work")
    w.set_defaults(func=cmd_worker)

    jobs = subparsers.add_parser("jobs", help="list, show, watch or cancel jobs",
                                 description="List jobs (newest first), or show, watch or cancel one.")
    jobs.add_argument("--assistant", metavar="NAME", help="only this assistant's jobs")
    jobs.add_argument("--status", choices=("scheduled", "queued", "running", "succeeded", "failed", "cancelled"))
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--json", action="store_true", help="print a JSON array")
    jobs.set_defaults(func=cmd_jobs_list)
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    cancel = jsub.add_parser("cancel", help="cancel a job", description="Cancel a job: a waiting one never starts, a "
                             "running one is stopped within seconds.")
    cancel.add_argument("id", type=int, metavar="ID")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(func=cmd_jobs_cancel)
    show = jsub.add_parser("show", help="show one job", description="Show one job with its progress and result.")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_jobs_show)
    watch = jsub.add_parser("watch", help="follow a job until it ends",
                            description="Print a job's progress until it ends (exit 0 if it succeeded).")
    watch.add_argument("id", type=int, metavar="ID")
    watch.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    watch.set_defaults(func=cmd_jobs_watch)

    versions = subparsers.add_parser("versions", help="list an assistant's model versions",
                                     description="List the trained versions of an assistant with their metrics.")
    versions.add_argument("--assistant", required=True, metavar="NAME")
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(func=cmd_versions)

    promote = subparsers.add_parser("promote", help="make a model version the active one",
                                    description="Make a version the one that answers; the previous one is archived.")
    promote.add_argument("version", type=int, metavar="VERSION")
    promote.set_defaults(func=cmd_promote)

    rollback = subparsers.add_parser("rollback", help="go back to an earlier model version",
                                     description="Activate the version that was active before the current one, "
                                                 "or the one given with --to.")
    rollback.add_argument("--assistant", required=True, metavar="NAME")
    rollback.add_argument("--to", type=int, metavar="VERSION")
    rollback.set_defaults(func=cmd_rollback)

    schedule = subparsers.add_parser(
        "schedule", help="retrain an assistant periodically",
        description="Set a periodic retraining policy: at each cron time (read in the timezone setting) a "
                    "training run starts if at least --min-new approved examples were added since the active "
                    "version. Without --cron, show the policy.")
    schedule.add_argument("--assistant", required=True, metavar="NAME")
    schedule.add_argument("--cron", help='5 fields: minute hour day month weekday, e.g. "0 3 * * 1" (Mondays 03:00)')
    schedule.add_argument("--min-new", type=int, default=1, metavar="N")
    schedule.add_argument("--disable", action="store_true", help="turn the policy off")
    schedule.add_argument("--json", action="store_true")
    schedule.set_defaults(func=cmd_schedule)


# ------------------------------------------------------------------ train --assistant
def train_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (other than the base model, which has its own default):
    what `train --data` runs with and what `train --assistant` puts in the job's params."""
    from tuning.training.config import TrainConfig

    given = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "base_model" and value != f.default:
            given[f.name] = value
    return given


def add_assistant_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` options for queueing a run of an assistant (bot.cli.train calls this)."""
    parser.add_argument("--assistant", metavar="NAME",
                        help="queue a training run of this assistant's approved examples")
    parser.add_argument("--at", metavar="TIME",
                        help='start at this time (timezone setting): "2026-12-01 02:00" or "02:00"')
    parser.add_argument("--wait", action="store_true", help="follow the progress until the run ends")
    parser.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    parser.add_argument("--gpus", type=int, default=0, metavar="N",
                        help="GPUs the run needs on a GPU worker (default 1; ignored on a CPU worker); "
                             "with several, the run trains data-parallel, one process per GPU")


def parse_at(text: str, *, timezone: str, now: dt.datetime | None = None) -> dt.datetime:
    """'YYYY-MM-DD HH:MM[:SS]' or 'HH:MM' (the next such time) in `timezone`, as an aware datetime."""
    from tuning.jobs.scheduler import next_clock_time, zone

    tz = zone(timezone)
    text = text.strip()
    for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=tz)
        except ValueError:
            pass
    try:
        clock = dt.time.fromisoformat(text)
    except ValueError:
        raise CommandError(f'--at: expected "YYYY-MM-DD HH:MM" or "HH:MM", got {text!r}') from None
    return next_clock_time(clock.hour, clock.minute, timezone=timezone, now=now)


def train_assistant(args: argparse.Namespace, app) -> int:
    """`tunebot train --assistant NAME [--at TIME] [--wait]`: queue a run; with --wait, follow it to the end."""
    from tuning.jobs import enqueue_training

    store = app.store
    assistant = store.assistant_by_name(args.assistant)
    params: dict = {}
    options = train_options(args)
    if options:
        params["config"] = options
    if getattr(args, "base_model", None):
        params["base_model"] = args.base_model
    at = parse_at(args.at, timezone=app.settings.timezone) if getattr(args, "at", None) else None
    job = enqueue_training(store, assistant.id, at=at, priority=getattr(args, "priority", 0) or 0, params=params,
                           gpus=getattr(args, "gpus", 0) or 0, max_attempts=app.settings.job_max_attempts)
    as_json = getattr(args, "json", False)
    if not as_json:
        when = f"scheduled for {job.scheduled_at} UTC" if job.status == "scheduled" else "queued"
        print(f"training of {assistant.name!r} {when} as job #{job.id}", file=sys.stderr)
    if not getattr(args, "wait", False):
        if as_json:
            print(json.dumps(_job_dict(job), ensure_ascii=False))
        return 0
    return follow(app, job.id, as_json=as_json)


# ------------------------------------------------------------------ worker
def build_worker(app, *, gpus=None, slots: int | None = None, poll: float = 0.5):
    """A Worker configured from the settings (shared by `tunebot worker` and `train --wait`)."""
    return app.new_worker(gpus=gpus, slots=slots, poll=poll)


def _parse_gpus(text: str | None):
    if text is None:
        return None
    text = text.strip().lower()
    if text in ("none", "cpu", ""):
        return 0
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise CommandError(f"--gpus: expected a count or a list like 0,1, got {text!r}") from None


def cmd_worker(args: argparse.Namespace, app) -> int:
    """Run the worker in the foreground until Ctrl-C or SIGTERM."""
    worker = build_worker(app, gpus=_parse_gpus(args.gpus), slots=args.slots, poll=args.poll)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    where = f"GPUs {worker.gpus}" if worker.gpu_mode else f"{worker.cpu_slots} CPU slot(s)"
    if worker.executor == "ray":
        where = f"training and evaluation on the Ray cluster at {app.settings.ray_address or 'auto'}"
    print(f"worker {worker.id} ready: {where}; Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        worker.run_forever()
    except KeyboardInterrupt:
        worker.stop()
        worker.shutdown()
    return 0


# ------------------------------------------------------------------ jobs
def _job_dict(job) -> dict:
    return dataclasses.asdict(job)


def _progress_text(job) -> str:
    p, tp = job.progress or {}, TrainProgress.of_job(job.progress)
    parts = [f"job #{job.id} {job.status}"]
    if p.get("phase") == "evaluating" and p.get("eval_total"):
        parts.append(f"evaluating {p.get('eval_mode')} {p.get('eval_done')}/{p['eval_total']}")
    elif p.get("phase") and p.get("phase") != "training":
        parts.append(p["phase"])
    if tp is not None:
        parts.append(f"step {tp.step}/{tp.total_steps}")
        if tp.epochs:
            parts.append(f"epoch {tp.epoch}/{tp.epochs}")
        if tp.loss is not None:
            parts.append(f"loss {tp.loss:.4g}")
        if tp.val_loss is not None:
            parts.append(f"val {tp.val_loss:.4g}")
        if tp.eta_s:
            parts.append(f"eta {int(tp.eta_s)}s")
    if job.error and job.status != "succeeded":
        parts.append(f"({job.error})")
    return " · ".join(parts)


def _result_text(store, job) -> str:
    result = job.result or {}
    if job.status != "succeeded" or not result.get("version_id"):
        return _progress_text(job)
    version = store.get_model_version(result["version_id"])
    m = version.metrics or {}
    scores = ", ".join(f"{k} {m[k]}" for k in ("accuracy", "base_accuracy", "f1", "best_val_loss", "steps")
                       if m.get(k) is not None)
    state = "promoted to active" if version.status == "active" else f"candidate ({result.get('promotion', '')})"
    return (f"version #{version.id} registered: {state}\n  {scores}\n  adapter: {version.adapter_path}\n"
            f"  promote it with `tunebot promote {version.id}`" if version.status != "active" else
            f"version #{version.id} registered: {state}\n  {scores}\n  adapter: {version.adapter_path}")


def follow(app, job_id: int, *, interval: float = 1.0, as_json: bool = False) -> int:
    """Print a job's progress until it ends (tqdm on a terminal); start a worker here if none is alive."""
    from tuning.jobs import live_workers, watch_job

    store = app.store
    worker = None
    checked = [0.0]

    def ensure_worker() -> None:
        """Run a worker here when none is alive (checked every few seconds: one may stop while we watch)."""
        nonlocal worker
        if worker is not None or time.monotonic() - checked[0] < 5:
            return
        checked[0] = time.monotonic()
        if not live_workers(store) and store.get_job(job_id).status in ("queued", "running"):
            print("no worker is running: running the job in this process (or start `tunebot worker`)",
                  file=sys.stderr)
            worker = build_worker(app)
            worker.start()

    def sleep(seconds: float) -> None:
        ensure_worker()
        time.sleep(seconds)

    ensure_worker()
    bar = None
    tty = sys.stderr.isatty() and not as_json
    last_line = None
    job = store.get_job(job_id)
    try:
        for job in watch_job(store, job_id, interval=interval, sleep=sleep):
            tp = TrainProgress.of_job(job.progress)
            if tty and tp is not None and job.status == "running":
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=tp.total_steps, desc=f"job #{job.id}", unit="step", file=sys.stderr)
                bar.n = min(tp.total_steps, tp.step)
                bar.set_postfix_str(_progress_text(job).split(" · ", 1)[-1], refresh=True)
            elif not as_json:
                line = _progress_text(job)
                if line != last_line:
                    print(line, file=sys.stderr, flush=True)
                    last_line = line
    except KeyboardInterrupt:
        print(f"stopped watching; job #{job_id} goes on (`tunebot jobs watch {job_id}`)", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
        if worker is not None:
            worker.stop(timeout=30)
    job = store.get_job(job_id)
    if as_json:
        print(json.dumps(_job_dict(job), ensure_ascii=False))
    else:
        print(_result_text(store, job))
    return 0 if job.status == "succeeded" else 1


def _assistant_id(app, name: str | None) -> int | None:
    return app.store.assistant_by_name(name).id if name else None


def cmd_jobs_list(args: argparse.Namespace, app) -> int:
    """List jobs, newest first."""
    jobs = app.store.list_jobs(assistant_id=_assistant_id(app, args.assistant), status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([_job_dict(j) for j in jobs], ensure_ascii=False))
        return 0
    if not jobs:
        print("no jobs")
        return 0
    names = {a.id: a.name for a in app.store.list_assistants()}
    for job in jobs:
        tp = TrainProgress.of_job(job.progress)
        step = f"{tp.step}/{tp.total_steps}" if tp is not None else ""
        when = job.scheduled_at if job.status == "scheduled" else job.created_at
        extra = job.error if job.status in ("failed", "cancelled") else (
            f"version #{job.result['version_id']}" if job.result.get("version_id") else "")
        print(f"#{job.id:<4} {job.kind:<8} {names.get(job.assistant_id, '-'):<12} {job.status:<9} "
              f"{step:<8} try {job.attempts}/{job.max_attempts}  {when}  {extra or ''}".rstrip())
    return 0


def cmd_jobs_show(args: argparse.Namespace, app) -> int:
    job = app.store.get_job(args.id)
    if args.json:
        print(json.dumps(_job_dict(job), ensure_ascii=False))
    else:
        for key, value in _job_dict(job).items():
            if value not in (None, {}, ""):
                print(f"{key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value}")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace, app) -> int:
    from tuning.jobs import cancel_job

    job = cancel_job(app.store, args.id)
    print(json.dumps(_job_dict(job), ensure_ascii=False) if args.json else f"job #{job.id} cancelled")
    return 0


def cmd_jobs_watch(args: argparse.Namespace, app) -> int:
    app.store.get_job(args.id)
    return follow(app, args.id, interval=args.interval)


# ------------------------------------------------------------------ versions
def cmd_versions(args: argparse.Namespace, app) -> int:
    assistant = app.store.assistant_by_name(args.assistant)
    versions = app.store.list_model_versions(assistant.id)
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in versions], ensure_ascii=False))
        return 0
    if not versions:
        print(f"{assistant.name} has no trained versions yet; run `tunebot train --assistant {assistant.name}`")
        return 0
    for v in versions:
        m = v.metrics or {}
        acc = f"accuracy {m['accuracy']}" if m.get("accuracy") is not None else "not evaluated"
        mark = "*" if v.id == assistant.active_version_id else " "
        print(f"{mark} #{v.id:<4} {v.status:<9} {acc:<18} job #{v.job_id}  {v.created_at}  {v.adapter_path}")
    return 0


def cmd_promote(args: argparse.Namespace, app) -> int:
    from tuning.jobs import promote_version

    version = promote_version(app.store, args.version)
    print(f"version #{version.id} is now active for {app.store.get_assistant(version.assistant_id).name}")
    return 0


def cmd_rollback(args: argparse.Namespace, app) -> int:
    from tuning.jobs import rollback

    assistant = app.store.assistant_by_name(args.assistant)
    version = rollback(app.store, assistant.id, to=args.to)
    print(f"{assistant.name} rolled back: version #{version.id} is active")
    return 0


def cmd_schedule(args: argparse.Namespace, app) -> int:
    from storage.common import parse_time
    from tuning.jobs import new_examples_since_active, next_fire, set_policy

    store = app.store
    assistant = store.assistant_by_name(args.assistant)
    tz = app.settings.timezone
    if args.cron:
        set_policy(store, assistant.id, cron=args.cron, min_new=args.min_new, enabled=not args.disable, timezone=tz)
    elif args.disable:
        policy = store.get_retrain_policy(assistant.id)
        if policy is None:
            raise CommandError(f"{assistant.name} has no retraining policy")
        store.set_retrain_policy(assistant.id, cron=policy.cron, min_new=policy.min_new, enabled=False)
    policy = store.get_retrain_policy(assistant.id)
    if policy is None:
        raise CommandError(f"{assistant.name} has no retraining policy; set one with --cron")
    nxt = next_fire(policy.cron, parse_time(policy.last_run_at or policy.created_at), tz) if policy.enabled else None
    info = {"assistant": assistant.name, "cron": policy.cron, "min_new": policy.min_new,
            "enabled": bool(policy.enabled), "timezone": tz, "next_check": nxt.isoformat() if nxt else None,
            "new_examples": new_examples_since_active(store, assistant.id), "last_run_at": policy.last_run_at}
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    elif not policy.enabled:
        print(f"{assistant.name}: periodic retraining is off ({policy.cron!r})")
    else:
        print(f"{assistant.name}: retrain at {policy.cron!r} ({tz}) when at least {policy.min_new} new approved "
              f"examples; next check {nxt:%Y-%m-%d %H:%M %Z}; {info['new_examples']} new now")
    return 0
