"""Job progress in Telegram: one message per job, edited in place at a bounded rate, and the finish report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from telegram.ext import ContextTypes

from bot.telegram.common import keyboard, store_of
from bot.telegram.texts import t
from storage.records import Job

log = logging.getLogger("tunebot.telegram")
POLL_S = 1.0
MIN_EDIT_S = 3.0
ACTIVE = ("scheduled", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


def progress_bar(fraction: float, width: int = 12) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return "▰" * full + "▱" * (width - full) + f" {fraction * 100:3.0f}%"


def render_progress(job: Job, lang: str) -> str:
    """The progress message text for a job in any state."""
    p = job.progress or {}
    if job.status in ("scheduled", "queued"):
        return t(lang, f"job_{job.status}", id=job.id, at=job.scheduled_at or "")
    if job.status == "running":
        step, total = p.get("step") or 0, p.get("total_steps") or 0
        lines = [t(lang, "job_running", id=job.id), progress_bar(step / total if total else 0.0)]
        if p.get("epoch") is not None:
            lines.append(t(lang, "job_epoch", epoch=_num(p.get("epoch")), step=step, total=total))
        if p.get("loss") is not None:
            lines.append(t(lang, "job_loss", loss=_num(p.get("loss")), val_loss=_num(p.get("val_loss"))))
        if p.get("eta_s") is not None:
            lines.append(t(lang, "job_eta", eta=_duration(p.get("eta_s"), lang)))
        if (p.get("processes") or 1) > 1:
            lines.append(t(lang, "job_parallel", n=p["processes"]))
        if p.get("node"):  # a Ray task: the cluster node it runs on
            lines.append(t(lang, "job_node", node=p["node"]))
        return "\n".join(lines)
    if job.status == "succeeded":
        return t(lang, "job_succeeded", id=job.id)
    if job.status == "cancelled":
        return t(lang, "job_cancelled", id=job.id)
    return t(lang, "job_failed", id=job.id, error=(job.error or "")[:500])


def _num(value) -> str:
    return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _duration(seconds, lang: str) -> str:
    from bot.telegram.texts import duration

    return duration(seconds, lang)


def _lang_for(context: ContextTypes.DEFAULT_TYPE, user_id: int | None) -> str:
    user = store_of(context).get_user(user_id) if user_id else None
    return (user.language if user and user.language else context.bot_data["app"].settings.default_language)


async def poll_jobs(context: ContextTypes.DEFAULT_TYPE) -> None:
    """PTB repeating job: edit each job's progress message when it changed (at most every MIN_EDIT_S)."""
    store = store_of(context)
    seen: dict = context.bot_data.setdefault("job_messages", {})
    done = set(store.get_state("tg:finished_jobs") or [])
    for job in store.list_jobs(status=ACTIVE + FINISHED, limit=50):
        if job.tg_chat_id is None or job.tg_message_id is None or job.id in done:
            continue
        lang = _lang_for(context, job.created_by)
        text = render_progress(job, lang)
        last = seen.get(job.id, {"text": None, "at": 0.0})
        finished = job.status in FINISHED
        if text != last["text"] and (finished or time.monotonic() - last["at"] >= MIN_EDIT_S):
            try:
                await context.bot.edit_message_text(text, chat_id=job.tg_chat_id, message_id=job.tg_message_id)
            except Exception as exc:  # message deleted or unchanged: the next report still goes out
                log.debug("progress edit for job %s failed: %s", job.id, exc)
            seen[job.id] = {"text": text, "at": time.monotonic()}
        if finished:
            done.add(job.id)
            store.set_state("tg:finished_jobs", sorted(done)[-500:])
            if job.status == "succeeded":
                await send_finish_report(context, job, lang)


async def send_finish_report(context: ContextTypes.DEFAULT_TYPE, job: Job, lang: str) -> None:
    """The loss curve, the before/after table, and Try it / Make active / Discard."""
    result = job.result or {}
    out_dir = result.get("out_dir") or result.get("adapter_dir") or result.get("adapter_path")
    curve = result.get("loss_curve") or (str(Path(out_dir) / "loss_curve.png") if out_dir else None)
    if curve and Path(curve).exists():
        with open(curve, "rb") as fp:
            await context.bot.send_photo(job.tg_chat_id, fp, caption=t(lang, "train_curve_caption", id=job.id))
    table = (result.get("markdown") or result.get("eval_table") or (result.get("metrics") or {}).get("eval_table")
             or _metrics_table(result.get("metrics") or {}))
    version_id = result.get("version_id")
    text = t(lang, "train_finished", id=job.id) + ("\n\n" + table if table else "")
    buttons = None
    if version_id:
        buttons = keyboard([[(t(lang, "btn_try"), f"tv:t:{version_id}"), (t(lang, "btn_activate"), f"tv:a:{version_id}"),
                             (t(lang, "btn_discard"), f"tv:d:{version_id}")]])
    await context.bot.send_message(job.tg_chat_id, text[:4000], reply_markup=buttons)


def _metrics_table(metrics: dict) -> str:
    """A small text table from {"modes": {"base": {...}, "tuned": {...}}} or flat metrics."""
    modes = metrics.get("modes") if isinstance(metrics, dict) else None
    if not modes:
        return "\n".join(f"{k}: {_num(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))
    cols = ("accuracy", "f1", "rouge_l")
    lines = ["mode      " + " ".join(f"{c:>8}" for c in cols)]
    for mode, row in modes.items():
        lines.append(f"{mode:<9} " + " ".join(f"{_num(row.get(c)):>8}" for c in cols))
    return "\n".join(lines)
