"""Reviewing in chat: the questions the assistant could not answer first, then the pending example cards
(approve, edit, reject, skip, approve-the-run); batched notices of new unanswered questions."""

from __future__ import annotations

import logging
import re
from itertools import groupby
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from telegram import Update
from telegram.error import BadRequest, Forbidden, TelegramError
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, app_of, awaiting, button_invalid, button_object, can_edit, lang_of, reply,
                                 requires, role_at_least, short, store_of, tr, tr_error, with_thread_store)
from bot.telegram.handlers.customers import deliver_team_answers
from bot.telegram.import_report import plural_form
from bot.telegram.texts import label, t
from storage import NotFound, NotOpen, StorageError, Store
from storage.records import Unanswered
from storage.common import parse_time
from tuning.data.review import (approve_all_in_run, approve_variation, edit_variation, next_pending, parent_of,
                           reject_variation, review_progress)

log = logging.getLogger("tunebot.telegram")
# Callback data is untrusted: only these shapes are accepted (fullmatch).
UNANSWERED_BUTTON = re.compile(rf"un:([adsq]):(?P<id>{ID})")  # q: reword a customer's question first
CARD_BUTTON = re.compile(rf"rv:([aers]):(?P<id>{ID})")  # approve, edit, reject, skip one example
RUN_BUTTON = re.compile(rf"rv:all:(?P<id>{ID})")
REVIEW_RUN_BUTTON = re.compile(rf"rvgo:(?P<id>{ID})")
NOTICE_ITEMS = 10  # questions listed in one notice; the rest are counted


def _scope(context: ContextTypes.DEFAULT_TYPE) -> dict:
    """Where this user's review stands: {"run_id": run or None, "after": the last skipped id or None,
    "un_after": the last skipped unanswered question, if any}."""
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


def next_unanswered(store: Store, assistant_id: int, after_id: int | None) -> Unanswered | None:
    """The oldest open unanswered question after the last skipped one."""
    return next((u for u in store.list_unanswered(assistant_id) if after_id is None or u.id > after_id), None)


def asked_at(created_at: str | None, timezone: str) -> str:
    """'2026-01-01 15:00 Europe/Berlin': when a question was asked, in the configured timezone."""
    if not created_at:
        return "—"
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        tz, timezone = ZoneInfo("UTC"), "UTC"
    return parse_time(created_at).astimezone(tz).strftime("%Y-%m-%d %H:%M ") + timezone


async def _show_unanswered(update: Update, context: ContextTypes.DEFAULT_TYPE, store: Store, assistant,
                           item: Unanswered, *, edit: bool) -> None:
    text = tr(update, context, "review_unanswered_card", question=short(item.question, 1500),
              when=asked_at(item.created_at, app_of(context).settings.timezone),
              left=store.count_unanswered(assistant.id))
    rows = [[(tr(update, context, "btn_un_answer"), f"un:a:{item.id}"),
             (tr(update, context, "btn_un_dismiss"), f"un:d:{item.id}"),
             (tr(update, context, "btn_un_skip"), f"un:s:{item.id}")]]
    if item.customer_id is not None:  # a customer's own words: the FAQ may want them in a general form
        rows.append([(tr(update, context, "btn_un_reword"), f"un:q:{item.id}")])
    await reply(update, text, buttons=rows, edit=edit)


async def _show_card(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, *, edit: bool) -> None:
    store = store_of(context)
    scope = _scope(context)
    if scope.get("run_id") is None:  # a run's own cards ("Review now") are not interrupted
        item = next_unanswered(store, assistant.id, scope.get("un_after"))
        if item is not None:
            await _show_unanswered(update, context, store, assistant, item, edit=edit)
            return
    ex = next_card_example(store, assistant.id, scope)
    if ex is None:
        context.user_data.pop("review", None)
        await reply(update, tr(update, context, "review_done"), edit=edit)
        return
    done, total = review_progress(store, assistant.id, ex.generation_run_id)
    left = len(store.list_examples(assistant.id, status="pending", generation_run_id=scope.get("run_id")))
    text = tr(update, context, "review_card", done=done, total=total, left=left,
              source=_source_line(update, context, store, ex), question=short(ex.question, 800),
              answer=short(ex.answer, 1200),
              method=label(lang_of(update, context), "method", ex.method) if ex.method
              else label(lang_of(update, context), "source", ex.source),
              score="—" if ex.judge_score is None else f"{ex.judge_score:.2f}")
    rows = [[("✅", f"rv:a:{ex.id}"), ("✏️", f"rv:e:{ex.id}"), ("❌", f"rv:r:{ex.id}"), ("⏭", f"rv:s:{ex.id}")]]
    if ex.generation_run_id:
        rows.append([(tr(update, context, "btn_approve_run"), f"rv:all:{ex.generation_run_id}")])
    await reply(update, text, buttons=rows, edit=edit)


@requires("expert")
async def review(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Show the unanswered questions, then the next pending card (of every run)."""
    context.user_data["review"] = {"run_id": None, "after": None}
    store_of(context).upsert_user(update.effective_user.id, language=lang_of(update, context))  # for notices
    await _show_card(update, context, assistant, edit=False)


@requires("expert")
async def review_go(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """'Review now' under a generation report: the cards of that run."""
    store = store_of(context)
    _, run = button_object(update, REVIEW_RUN_BUTTON, store.get_generation_run, assistant_id=assistant.id)
    if run is None:
        await button_invalid(update, context)
        return
    context.user_data["review"] = {"run_id": run.id, "after": None}
    await _show_card(update, context, assistant, edit=False)


@requires("expert")
async def review_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Approve, edit, reject, skip, or approve the whole run."""
    store = store_of(context)
    uid = update.effective_user.id
    all_match, run = button_object(update, RUN_BUTTON, store.get_generation_run, assistant_id=assistant.id)
    if all_match:
        if run is None:
            await button_invalid(update, context)
            return
        run_id = run.id
        n = await with_thread_store(context, lambda s: approve_all_in_run(s, run_id, by=uid))
        await reply(update, tr(update, context, "review_approved_all", n=n))
        await _show_card(update, context, assistant, edit=False)
        return
    card, ex = button_object(update, CARD_BUTTON, store.get_example, assistant_id=assistant.id)
    if ex is None:
        await button_invalid(update, context)
        return
    action = card.group(1)
    try:
        if action == "e":
            awaiting(context, "edit_variation", example_id=ex.id)
            await reply(update, tr(update, context, "review_edit_ask", question=ex.question))
            return
        if action == "s":
            _scope(context)["after"] = ex.id
        elif ex.status == "pending":
            (approve_variation if action == "a" else reject_variation)(store, ex.id, by=uid)
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    await _show_card(update, context, assistant, edit=True)


async def _may_edit(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int) -> bool:
    """Whether this user may still save what they typed for the assistant (else they are told they may not)."""
    if can_edit(store_of(context), assistant_id, update.effective_user.id):
        return True
    await reply(update, tr(update, context, "not_member"))
    return False


async def edit_variation_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The corrected question of a variation: saved and approved."""
    store = store_of(context)
    ex = store.get_example(pending["example_id"])
    if not await _may_edit(update, context, ex.assistant_id):
        return
    try:
        edit_variation(store, ex.id, question=update.message.text, by=update.effective_user.id)
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    await reply(update, tr(update, context, "review_edited", id=ex.id))
    await _show_card(update, context, store.get_assistant(ex.assistant_id), edit=False)


@requires("expert")
async def unanswered_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """✍️ answer (the next text is the answer), 🗑 dismiss, or ⏭ skip an unanswered question."""
    store = store_of(context)
    match, item = button_object(update, UNANSWERED_BUTTON, store.get_unanswered, assistant_id=assistant.id)
    if item is None:
        await button_invalid(update, context)
        return
    action = match.group(1)
    if action == "s":
        _scope(context)["un_after"] = item.id
    elif item.status != "open":
        await reply(update, tr(update, context, "un_closed"))
    elif action == "a":
        awaiting(context, "answer_unanswered", item_id=item.id)
        await reply(update, tr(update, context, "un_answer_ask", question=short(item.question, 800)))
        return
    elif action == "q":
        awaiting(context, "reword_unanswered", item_id=item.id)
        await reply(update, tr(update, context, "un_reword_ask", question=short(item.question, 800)))
        return
    else:
        uid = update.effective_user.id
        try:
            await with_thread_store(context, lambda s: s.dismiss_unanswered(item.id, by=uid))
        except NotOpen:
            await reply(update, tr(update, context, "un_closed"))
    await _show_card(update, context, assistant, edit=True)


async def reword_unanswered_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The general form of a customer's question: the example will have it; then the answer is asked for."""
    item = store_of(context).get_unanswered(pending["item_id"])
    if not await _may_edit(update, context, item.assistant_id):
        return
    question = update.message.text.strip()
    awaiting(context, "answer_unanswered", item_id=item.id, question=question)
    await reply(update, tr(update, context, "un_answer_ask", question=short(question, 800)))


async def answer_unanswered_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The expert's answer to an unanswered question: saved as an approved example, then the next card."""
    store = store_of(context)
    uid = update.effective_user.id
    item = store.get_unanswered(pending["item_id"])
    if not await _may_edit(update, context, item.assistant_id):
        return
    answer, question = update.message.text, pending.get("question")
    try:
        ex = await with_thread_store(context, lambda s: s.answer_unanswered(item.id, answer, by=uid,
                                                                            question=question))
    except NotOpen:
        await reply(update, tr(update, context, "un_closed"))
        return
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    await reply(update, tr(update, context, "un_answered", id=ex.id, question=short(ex.question, 800),
                           answer=short(ex.answer, 1500)))
    if item.customer_id is not None:  # a customer asked: the answer goes back to their chat now
        await deliver_team_answers(context)
    await _show_card(update, context, store.get_assistant(item.assistant_id), edit=False)


def unanswered_notices(store: Store, default_language: str) -> tuple[list[tuple[int, str]], list[int]]:
    """One (chat id, text) per owner and expert of each assistant with new unanswered questions, and their ids."""
    items = store.unnotified_unanswered()
    notices: list[tuple[int, str]] = []
    by_assistant = groupby(sorted(items, key=lambda u: (u.assistant_id, u.id)), key=lambda u: u.assistant_id)
    for assistant_id, group in by_assistant:
        questions = [u.question for u in group]
        try:
            name = store.get_assistant(assistant_id).name
        except NotFound:  # deleted meanwhile: nobody to tell
            continue
        for member in store.list_members(assistant_id):
            if not role_at_least(member.role, "expert"):
                continue
            user = store.get_user(member.user_id)
            lang = user.language if user and user.language else default_language
            lines = [f"• {short(q, 200)}" for q in questions[:NOTICE_ITEMS]]
            if len(questions) > NOTICE_ITEMS:
                lines.append(t(lang, "un_notify_more", n=len(questions) - NOTICE_ITEMS))
            n = len(questions)
            notices.append((member.user_id, t(lang, f"un_notify_{plural_form(lang, n)}", n=n, name=name,
                                              items="\n".join(lines))))
    return notices, [u.id for u in items]


async def notify_unanswered(context: ContextTypes.DEFAULT_TYPE) -> None:
    """PTB repeating job: each owner and expert gets one message listing the new unanswered questions."""
    language = app_of(context).settings.default_language
    notices, ids = await with_thread_store(context, lambda s: unanswered_notices(s, language))
    delivered, unreachable = 0, False
    for chat_id, text in notices:
        try:
            await context.bot.send_message(chat_id, text)
            delivered += 1
        except (Forbidden, BadRequest) as exc:  # blocked the bot or never started it: the others are still told
            log.info("could not notify %s about unanswered questions: %s", chat_id, exc)
        except TelegramError as exc:
            unreachable = True
            log.warning("could not notify %s about unanswered questions: %s", chat_id, exc)
    if ids and (delivered or not unreachable):  # Telegram unreachable for everyone: the next run tries again
        await with_thread_store(context, lambda s: s.mark_unanswered_notified(ids))


def handlers() -> list:
    return [
        CommandHandler("review", review),
        CallbackQueryHandler(unanswered_button, pattern=r"^un:"),
        CallbackQueryHandler(review_button, pattern=r"^rv:"),
        CallbackQueryHandler(review_go, pattern=r"^rvgo:"),
    ]
