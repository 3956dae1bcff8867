"""Training from chat: /train, /jobs, /schedule, and the finished version's buttons."""

from __future__ import annotations

import datetime as dt
import re

from telegram import Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, app_of, awaiting, button_invalid, button_object, callback_match, can_edit, lang_of,
                                 reply, requires, store_of, tr, tr_error, with_thread_store)
from bot.telegram.progress import render_progress
from bot.telegram.texts import label, labelled_counts
from tuning.jobs.scheduler import next_clock_time
from tuning.training.progress import TrainProgress
from storage import StorageError
from storage.common import fmt_time

TOKENS_PER_S_CPU = 200  # first guess before any run of a model here: the bundled model on 2 cores (DESIGN.md)
TONIGHT_HOUR = 2
# Callback data is untrusted: only these shapes are accepted (fullmatch).
TRAIN_BUTTON = re.compile(r"tr:(now|night|pick)")
JOB_BUTTON = re.compile(rf"jb:c:(?P<id>{ID})")
VERSION_BUTTON = re.compile(rf"tv:([tad]):(?P<id>{ID})")  # try, activate, discard


def _jobs():
    from tuning import jobs

    return jobs


def _enqueue(store, assistant_id: int, *, at, by: int, chat_id: int, settings):
    return _jobs().enqueue_training(store, assistant_id, at=at, created_by=by, tg_chat_id=chat_id,
                                    gpus=settings.train_gpus, max_attempts=settings.job_max_attempts)


@requires("expert")
async def train(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """The dataset, the settings and an estimate, with start now / tonight / pick a time."""
    from tuning.data.importing import dataset_stats

    stats = await with_thread_store(context, lambda store: dataset_stats(store, assistant.id))
    approved = stats["by_status"].get("approved", 0)
    if approved < 2:
        await reply(update, tr(update, context, "train_too_few", n=approved))
        return
    from tuning.training.hparams import choose, plan_size
    from tuning.jobs.versions import measured_tokens_per_s

    # The epochs the run will plan for this much data (early stopping may end it sooner).
    facts = max(1, stats.get("approved_facts") or approved)
    rows, epoch_tokens = plan_size(n_facts=facts, n_items=approved, n_tokens=stats["approved_tokens_estimate"])
    epochs = choose(n_facts=facts, n_items=rows, n_tokens=epoch_tokens, recipe="grounded").epochs
    model = assistant.base_model or app_of(context).settings.base_model
    measured = await with_thread_store(context, lambda store: measured_tokens_per_s(store, model))
    estimate = training_estimate(epoch_tokens * epochs, measured, lang=lang_of(update, context))
    by_source = labelled_counts(lang_of(update, context), "source", stats["by_source"])
    by_split = labelled_counts(lang_of(update, context), "split", stats["by_split"])
    await reply(update, tr(update, context, "train_summary", name=assistant.name, approved=approved,
                           pending=stats["by_status"].get("pending", 0), by_source=by_source, by_split=by_split,
                           tokens=stats["approved_tokens_estimate"],
                           model=model, estimate=estimate),
                buttons=[[(tr(update, context, "btn_train_now"), "tr:now")],
                         [(tr(update, context, "btn_train_tonight"), "tr:night"),
                          (tr(update, context, "btn_train_pick"), "tr:pick")]])


def training_estimate(tokens: int, measured: tuple[float, int] | None, *, lang: str) -> str:
    """How long the run will take: from the throughput earlier runs of this model measured here (the median),
    else from the first guess, said to be rough."""
    from bot.telegram.texts import t

    rate = measured[0] if measured else TOKENS_PER_S_CPU
    minutes = f"{max(tokens / rate / 60, 0.1):.1f}"
    if measured is None:
        return t(lang, "train_estimate_rough", minutes=minutes)
    return t(lang, "train_estimate_measured", minutes=minutes, rate=f"{rate:.0f}", n=measured[1])


def scheduled_training(store, assistant_id: int, at: dt.datetime):
    """The training of this assistant already scheduled for `at`, if any (a second tap must not add another)."""
    when = fmt_time(at.replace(second=0, microsecond=0))
    return next((j for j in store.list_jobs(assistant_id=assistant_id, status="scheduled")
                 if j.kind == "train" and j.scheduled_at == when), None)


async def _start_job(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, at: dt.datetime | None) -> None:
    store = store_of(context)
    # No await between the check and the insert: taps are handled on one event loop, so none comes in between.
    existing = scheduled_training(store, assistant.id, at) if at is not None else None
    if existing is not None:
        await reply(update, tr(update, context, "train_already_scheduled", id=existing.id, name=assistant.name,
                               when=existing.scheduled_at))
        return
    job = _enqueue(store, assistant.id, at=at, by=update.effective_user.id, chat_id=update.effective_chat.id,
                   settings=app_of(context).settings)
    store.upsert_user(update.effective_user.id, language=lang_of(update, context))
    msg = await update.effective_chat.send_message(render_progress(job, lang_of(update, context)),
                                                   reply_markup=None)
    store.update_job(job.id, tg_chat_id=update.effective_chat.id, tg_message_id=msg.message_id)


@requires("expert")
async def train_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Start now, tonight, or ask for a time."""
    match = callback_match(update, TRAIN_BUTTON)
    if match is None:
        await button_invalid(update, context)
        return
    choice = match.group(1)
    if choice == "pick":
        awaiting(context, "train_time", assistant_id=assistant.id)
        await reply(update, tr(update, context, "train_pick_ask", tz=app_of(context).settings.timezone))
        return
    at = None
    if choice == "night":  # on the server's clock (the timezone setting), as `tunebot train --at` reads times
        at = next_clock_time(TONIGHT_HOUR, 0, timezone=app_of(context).settings.timezone)
    await _start_job(update, context, assistant, at)


async def train_time_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """A time like 23:30 (on the clock of the timezone setting, today or tomorrow) for the training."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", update.message.text or "")
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        awaiting(context, "train_time", **{k: v for k, v in pending.items() if k != "kind"})
        await reply(update, tr(update, context, "train_pick_bad"))
        return
    store = store_of(context)
    if not can_edit(store, pending["assistant_id"], update.effective_user.id):
        await reply(update, tr(update, context, "not_member"))
        return
    at = next_clock_time(int(match.group(1)), int(match.group(2)), timezone=app_of(context).settings.timezone)
    await _start_job(update, context, store.get_assistant(pending["assistant_id"]), at)


@requires("expert")
async def jobs_list(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Recent jobs with cancel buttons for the unfinished ones."""
    jobs = store_of(context).list_jobs(assistant_id=assistant.id, limit=10)
    if not jobs:
        await reply(update, tr(update, context, "jobs_empty"))
        return
    lines, rows = [tr(update, context, "jobs_header", name=assistant.name)], []
    for job in jobs:
        tp = TrainProgress.of_job(job.progress)
        extra = f" {tp.step}/{tp.total_steps}" if job.status == "running" and tp is not None else ""
        lines.append(f"#{job.id} {label(lang_of(update, context), 'jobkind', job.kind)}: "
                     f"{tr(update, context, 'jobstate_' + job.status)}{extra}"
                     + (f" ({job.scheduled_at})" if job.status == "scheduled" else ""))
        if job.status in ("scheduled", "queued", "running"):
            rows.append([(tr(update, context, "btn_cancel_job", id=job.id), f"jb:c:{job.id}")])
    await reply(update, "\n".join(lines), buttons=rows or None)


@requires("expert")
async def jobs_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Cancel a job of this assistant."""
    store = store_of(context)
    _, job = button_object(update, JOB_BUTTON, store.get_job, assistant_id=assistant.id)
    if job is None:
        await button_invalid(update, context)
        return
    job_id = job.id
    try:
        _jobs().cancel_job(store, job_id, by=update.effective_user.id)
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    await reply(update, tr(update, context, "job_cancel_requested", id=job_id), edit=True)


@requires("owner")
async def schedule(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """/schedule daily HH:MM [min_new] | weekly HH:MM [min_new] | off."""
    store = store_of(context)
    args = context.args or []
    if args and args[0].lower() == "off":
        policy = store.get_retrain_policy(assistant.id)
        if policy:
            store.set_retrain_policy(assistant.id, cron=policy.cron, min_new=policy.min_new, enabled=False)
        await reply(update, tr(update, context, "schedule_off"))
        return
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", args[1]) if len(args) >= 2 else None
    if not args or args[0].lower() not in ("daily", "weekly") or not match:
        policy = store.get_retrain_policy(assistant.id)
        current = policy.cron if policy and policy.enabled else tr(update, context, "schedule_none")
        await reply(update, tr(update, context, "schedule_usage", current=current))
        return
    hour, minute = int(match.group(1)), int(match.group(2))
    if hour > 23 or minute > 59:
        await reply(update, tr(update, context, "train_pick_bad"))
        return
    min_new = int(args[2]) if len(args) > 2 and args[2].isdigit() else 1
    cron = f"{minute} {hour} * * *" if args[0].lower() == "daily" else f"{minute} {hour} * * 0"
    tz = app_of(context).settings.timezone
    _jobs().set_policy(store, assistant.id, cron=cron, min_new=min_new, timezone=tz)
    await reply(update, tr(update, context, "schedule_set", cron=cron, min_new=min_new, tz=tz))


@requires("expert")
async def version_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Try it, Make active, or Discard a freshly trained version."""
    store = store_of(context)
    match, version = button_object(update, VERSION_BUTTON, store.get_model_version, assistant_id=assistant.id)
    if version is None:
        await button_invalid(update, context)
        return
    action = match.group(1)
    try:
        if action == "a":
            _jobs().promote_version(store, version.id, by=update.effective_user.id)
            await reply(update, tr(update, context, "version_activated", id=version.id))
        elif action == "d":
            store.set_version_status(version.id, "discarded", by=update.effective_user.id)
            await reply(update, tr(update, context, "version_discarded", id=version.id))
        else:
            context.user_data["chat"] = {"assistant_id": assistant.id, "mode": "version", "version_id": version.id}
            await reply(update, tr(update, context, "chat_started_version", id=version.id))
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))


def handlers() -> list:
    return [
        CommandHandler("train", train),
        CommandHandler("jobs", jobs_list),
        CommandHandler("schedule", schedule),
        CallbackQueryHandler(train_button, pattern=r"^tr:"),
        CallbackQueryHandler(jobs_button, pattern=r"^jb:"),
        CallbackQueryHandler(version_button, pattern=r"^tv:"),
    ]
