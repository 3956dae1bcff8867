"""Job progress in Telegram: one message per job, edited in place at a bounded rate, and the finish report."""

from __future__ import annotations

import logging
import time
from html import escape
from pathlib import Path

from telegram.ext import ContextTypes

from bot.telegram.checklist import refresh_checklist
from bot.telegram.common import keyboard, store_of
from bot.telegram.texts import catalogue, t
from storage import NotFound
from storage.records import Job, ModelVersion
from tuning.training.progress import TrainProgress

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
        tp = TrainProgress.of_job(p)
        lines = [t(lang, "job_running", id=job.id), progress_bar(tp.fraction if tp else 0.0)]
        if tp is not None:
            lines.append(t(lang, "job_epoch", epoch=_num(tp.epoch), step=tp.step, total=tp.total_steps))
            if tp.loss is not None:
                lines.append(t(lang, "job_loss", loss=_num(tp.loss), val_loss=_num(tp.val_loss)))
            if tp.eta_s is not None:
                lines.append(t(lang, "job_eta", eta=_duration(tp.eta_s, lang)))
            if tp.processes > 1:
                lines.append(t(lang, "job_parallel", n=tp.processes))
        if p.get("node"):  # a Ray task: the cluster node it runs on
            lines.append(t(lang, "job_node", node=p["node"]))
        return "\n".join(lines)
    if job.status == "succeeded":
        return t(lang, "job_succeeded", id=job.id)
    if job.status == "cancelled":
        return t(lang, "job_cancelled", id=job.id)
    return t(lang, "job_failed", id=job.id, error=failure_reason(job, lang))


def failure_reason(job: Job, lang: str) -> str:
    """Why a job failed, in `lang`: from result["failure"] (a catalogue code the job layer wrote), else the
    English `error` text of jobs from before it."""
    failure = (job.result or {}).get("failure") or {}
    code, params = failure.get("code"), failure.get("params") or {}
    reason = None
    if code == "domain":
        error = failure.get("error") or {}
        key = f"error_{error.get('code')}"
        if error.get("code") and key in catalogue("en"):
            try:
                reason = t(lang, key).format(**(error.get("params") or {}))
            except (KeyError, IndexError):
                reason = None
    elif code and f"jobfail_{code}" in catalogue("en"):
        reason = t(lang, f"jobfail_{code}", **params)
    if reason is None:
        return (job.error or "")[:500]
    if failure.get("attempts", 1) > 1:
        reason = t(lang, "jobfail_attempts", reason=reason, attempts=failure["attempts"])
    return reason


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
            if job.kind == "train":
                await refresh_checklist(context.bot, store, job.assistant_id)
        if finished:
            done.add(job.id)
            store.set_state("tg:finished_jobs", sorted(done)[-500:])
            if job.status == "succeeded":
                await send_finish_report(context, job, lang)


async def send_finish_report(context: ContextTypes.DEFAULT_TYPE, job: Job, lang: str) -> None:
    """The loss curve, the before/after table, and Try it / Make active / Discard."""
    if job.kind != "train":
        return
    store = store_of(context)
    result = job.result or {}
    out_dir = result.get("out_dir") or result.get("adapter_dir") or result.get("adapter_path")
    curve = result.get("loss_curve") or (str(Path(out_dir) / "loss_curve.png") if out_dir else None)
    if curve and Path(curve).exists():
        with open(curve, "rb") as fp:
            await context.bot.send_photo(job.tg_chat_id, fp, caption=t(lang, "train_curve_caption", id=job.id))
    version = None
    if result.get("version_id"):
        try:
            version = store.get_model_version(result["version_id"])
        except NotFound:
            version = None
    assistant = store.get_assistant(job.assistant_id) if job.assistant_id else None
    text, rows = render_finish_report(
        job, lang, version=version, active_version_id=assistant.active_version_id if assistant else None,
        has_examples=bool(assistant and store.count_examples(assistant.id, status="approved")))
    await context.bot.send_message(job.tg_chat_id, text, parse_mode="HTML", reply_markup=keyboard(rows) if rows else None)


def render_finish_report(job: Job, lang: str, *, version: ModelVersion | None, active_version_id: int | None,
                         has_examples: bool = True) -> tuple[str, list[list[tuple[str, str]]]]:
    """The finish report of a training job as Telegram HTML, and its button rows."""
    result = job.result or {}
    metrics = result.get("metrics") or {}
    parts = [f"<b>{escape(t(lang, 'train_finished', id=job.id))}</b>"]
    parts += _evaluation_parts(metrics, lang, version_id=version.id if version else result.get("version_id"))
    rows: list[list[tuple[str, str]]] = []
    if version is not None:
        try_it = (t(lang, "btn_try"), f"tv:t:{version.id}")
        if version.status == "active":
            key = "report_first_active" if result.get("first_version") else "report_now_active"
            parts.append(t(lang, key, id=version.id))
            rows = [[try_it]]
        elif version.status == "discarded":
            parts.append(t(lang, "report_discarded", id=version.id))
        else:
            if active_version_id:
                current = t(lang, "report_current_version", id=active_version_id)
            else:
                current = t(lang, "report_current_fewshot" if has_examples else "report_current_base")
            parts.append(t(lang, "report_ask_activate", id=version.id, current=current))
            rows = [[try_it, (t(lang, "btn_activate"), f"tv:a:{version.id}"),
                     (t(lang, "btn_discard"), f"tv:d:{version.id}")]]
    text = "\n\n".join(parts)
    if len(text) > MAX_REPORT:  # examples are the long part; never cut inside an HTML tag
        parts = [p for p in parts if not p.startswith("❓")]
        text = "\n\n".join(parts)
    return text, rows


MAX_REPORT = 4000
TABLE_ORDER = ("lookup", "base", "fewshot", "tuned", "grounded")


def _evaluation_parts(metrics: dict, lang: str, *, version_id: int | None) -> list[str]:
    """What the run was checked on, the per-mode table in <pre>, one plain sentence, and examples."""
    correct, n = metrics.get("eval_correct") or {}, metrics.get("n_test") or 0
    on = metrics.get("eval_on")
    if not correct or not n:
        return [t(lang, "report_no_eval_test" if on == "test" else "report_no_eval")]
    answer_mode = metrics.get("answer_mode") or "tuned"
    parts = [t(lang, f"report_on_{on}" if on in ("test", "variations", "examples") else "report_on_test", n=n)]
    names = {m: t(lang, f"mode_{m}") + (" *" if m == answer_mode else "") for m in TABLE_ORDER if m in correct}
    width = max(len(v) for v in names.values())
    head = f"{t(lang, 'report_col_mode'):<{width}}  {t(lang, 'report_col_correct')}"
    lines = [head] + [f"{names[m]:<{width}}  {correct[m]:>3}/{n:<3} {round(100 * correct[m] / n):>3}%"
                      for m in names]
    parts.append("<pre>" + escape("\n".join(lines)) + "</pre>")
    ref = version_id if version_id is not None else "?"
    parts.append(t(lang, "report_marker", id=ref, mode=t(lang, f"mode_{answer_mode}")))
    parts.append(t(lang, "report_summary", id=ref, correct=correct.get(answer_mode, 0), n=n,
                   base=correct.get("base", 0)))
    if metrics.get("eval_by_overlap", 0 if on == "test" else n):
        parts.append(t(lang, "report_judged"))
    for ex in metrics.get("eval_examples") or []:
        parts.append("❓ " + t(lang, "report_example", question=escape(ex.get("question") or ""),
                                before=escape(ex.get("before") or "—"), after=escape(ex.get("after") or "—"),
                                expected=escape(ex.get("expected") or "")))
    return parts
