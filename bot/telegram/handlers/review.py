"""Reviewing pending examples in chat: /review cards with approve, edit, reject, skip and approve-the-run."""

from __future__ import annotations

from telegram import Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import awaiting, callback_args, reply, requires, short, store_of, tr, with_thread_store
from storage import StorageError
from tuning.review import (approve_all_in_run, approve_variation, edit_variation, next_pending, parent_of,
                           reject_variation, review_progress)


def _scope(context: ContextTypes.DEFAULT_TYPE) -> dict:
    """Where this user's review stands: {"run_id": run or None, "after": the last skipped id or None}."""
    return context.user_data.setdefault("review", {"run_id": None, "after": None})


def next_card_example(store, assistant_id: int, scope: dict):
    """The next pending example after the last skipped one, wrapping around so skipped ones come back last."""
    ex = next_pending(store, assistant_id, run_id=scope.get("run_id"), after_id=scope.get("after"))
    if ex is None and scope.get("after") is not None:
        scope["after"] = None
        ex = next_pending(store, assistant_id, run_id=scope.get("run_id"))
    return ex


def _source_line(update: Update, context: ContextTypes.DEFAULT_TYPE, store, ex) -> str:
    """Where a pending example came from: its parent question, its document chunk, or new content."""
    parent = parent_of(store, ex)
    if parent is not None:
        return short(parent.question, 300)
    if ex.document_id is not None:
        try:
            name = store.get_document(ex.document_id).filename
        except StorageError:
            name = "?"
        ref = (ex.chunk_ref or "").split(": ", 1)[-1]  # the run's key is "doc 7: chunk 2 (chars …)"
        return tr(update, context, "review_from_document", name=name, ref=ref)
    if ex.method == "new":
        return tr(update, context, "review_new_content")
    if ex.source == "feedback":
        return tr(update, context, "review_from_feedback")
    return "—"


async def _show_card(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, *, edit: bool) -> None:
    store = store_of(context)
    scope = _scope(context)
    ex = next_card_example(store, assistant.id, scope)
    if ex is None:
        context.user_data.pop("review", None)
        await reply(update, tr(update, context, "review_done"), edit=edit)
        return
    done, total = review_progress(store, assistant.id, ex.generation_run_id)
    left = len(store.list_examples(assistant.id, status="pending", generation_run_id=scope.get("run_id")))
    text = tr(update, context, "review_card", done=done, total=total, left=left,
              source=_source_line(update, context, store, ex), question=short(ex.question, 800),
              answer=short(ex.answer, 1200), method=ex.method or ex.source,
              score="—" if ex.judge_score is None else f"{ex.judge_score:.2f}")
    rows = [[("✅", f"rv:a:{ex.id}"), ("✏️", f"rv:e:{ex.id}"), ("❌", f"rv:r:{ex.id}"), ("⏭", f"rv:s:{ex.id}")]]
    if ex.generation_run_id:
        rows.append([(tr(update, context, "btn_approve_run"), f"rv:all:{ex.generation_run_id}")])
    await reply(update, text, buttons=rows, edit=edit)


@requires("expert")
async def review(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Show the next pending card (of every run)."""
    context.user_data["review"] = {"run_id": None, "after": None}
    await _show_card(update, context, assistant, edit=False)


@requires("expert")
async def review_go(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """'Review now' under a generation report: the cards of that run."""
    ref = callback_args(update)[0] if callback_args(update) else ""
    run_id = int(ref) if ref.isdigit() else None
    if run_id is not None and store_of(context).get_generation_run(run_id).assistant_id != assistant.id:
        await reply(update, tr(update, context, "not_member"))
        return
    context.user_data["review"] = {"run_id": run_id, "after": None}
    await _show_card(update, context, assistant, edit=False)


@requires("expert")
async def review_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Approve, edit, reject, skip, or approve the whole run."""
    action, ref = callback_args(update)
    store = store_of(context)
    uid = update.effective_user.id
    try:
        if action == "all":
            if store.get_generation_run(int(ref)).assistant_id != assistant.id:
                await reply(update, tr(update, context, "not_member"))
                return
            n = await with_thread_store(context, lambda s: approve_all_in_run(s, int(ref), by=uid))
            await reply(update, tr(update, context, "review_approved_all", n=n))
            await _show_card(update, context, assistant, edit=False)
            return
        ex = store.get_example(int(ref))
        if ex.assistant_id != assistant.id:
            await reply(update, tr(update, context, "not_member"))
            return
        if action == "e":
            awaiting(context, "edit_variation", example_id=ex.id)
            await reply(update, tr(update, context, "review_edit_ask", question=ex.question))
            return
        if action == "s":
            _scope(context)["after"] = ex.id
        elif ex.status == "pending":
            (approve_variation if action == "a" else reject_variation)(store, ex.id, by=uid)
    except StorageError as exc:
        await reply(update, tr(update, context, "error_user", reason=str(exc)))
        return
    await _show_card(update, context, assistant, edit=True)


async def edit_variation_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The corrected question of a variation: saved and approved."""
    store = store_of(context)
    ex = store.get_example(pending["example_id"])
    if store.role_of(ex.assistant_id, update.effective_user.id) not in ("owner", "expert"):
        await reply(update, tr(update, context, "not_member"))
        return
    try:
        edit_variation(store, ex.id, question=update.message.text, by=update.effective_user.id)
    except StorageError as exc:
        await reply(update, tr(update, context, "error_user", reason=str(exc)))
        return
    await reply(update, tr(update, context, "review_edited", id=ex.id))
    await _show_card(update, context, store.get_assistant(ex.assistant_id), edit=False)


def handlers() -> list:
    return [
        CommandHandler("review", review),
        CallbackQueryHandler(review_button, pattern=r"^rv:"),
        CallbackQueryHandler(review_go, pattern=r"^rvgo:"),
    ]
