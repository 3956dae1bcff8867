"""Owners publish an assistant for customers: /publish shows the link, (un)publishes, makes a new link, turns each
channel on or off and sets the greeting; /publish in a group makes the assistant answer there."""

from __future__ import annotations

import re

from telegram import Update
from telegram.constants import ChatType
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, app_of, awaiting, button_invalid, callback_match, current_assistant, reply,
                                 requires, role_at_least, short, store_of, tr, tr_error, with_thread_store)
from storage import StorageError
from storage.records import CHANNELS
from tuning.customers import customer_link, customer_report, plot_customer_stats

# Callback data is untrusted: only this shape is accepted (fullmatch), for the owner's current assistant.
PUBLISH_BUTTON = re.compile(rf"pub:(publish|unpublish|revoke|greeting|{'|'.join(CHANNELS)}):(?P<id>{ID})")
GREETING_DEFAULT = "-"


def publication_text(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, publication) -> str:
    if publication is None:
        return tr(update, context, "publish_not_yet", name=assistant.name)
    mark = {True: "✅", False: "❌"}
    return tr(update, context, "publish_status", name=assistant.name,
              state=tr(update, context, "publish_state_on" if publication.active else "publish_state_off"),
              link=customer_link(context.bot.username, publication.token),
              link_on=mark[bool(publication.link)], groups_on=mark[bool(publication.groups)],
              business_on=mark[bool(publication.business)],
              greeting=short(publication.greeting, 200) if publication.greeting
              else tr(update, context, "publish_greeting_default"))


def publication_buttons(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int,
                        publication) -> list[list[tuple[str, str]]]:
    if publication is None:
        return [[(tr(update, context, "btn_pub_publish"), f"pub:publish:{assistant_id}")]]
    mark = {True: " ✅", False: " ❌"}
    on_off = ("unpublish", "btn_pub_unpublish") if publication.active else ("publish", "btn_pub_publish")
    return [
        [(tr(update, context, on_off[1]), f"pub:{on_off[0]}:{assistant_id}"),
         (tr(update, context, "btn_pub_revoke"), f"pub:revoke:{assistant_id}")],
        [(tr(update, context, f"btn_pub_{c}") + mark[bool(getattr(publication, c))], f"pub:{c}:{assistant_id}")
         for c in CHANNELS],
        [(tr(update, context, "btn_pub_greeting"), f"pub:greeting:{assistant_id}")],
    ]


async def _show(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, *, edit: bool) -> None:
    publication = store_of(context).get_publication(assistant.id)
    await reply(update, publication_text(update, context, assistant, publication),
                buttons=publication_buttons(update, context, assistant.id, publication), edit=edit)


@requires("owner")
async def publish(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """/publish: the customer link and its switches (private chat); in a group, answer customers there."""
    if update.effective_chat.type != ChatType.PRIVATE:
        await link_group(update, context, assistant)
        return
    await _show(update, context, assistant, edit=False)


async def link_group(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant) -> None:
    """An owner's /publish in a group: the assistant answers there (mentions and replies only)."""
    store = store_of(context)
    publication = store.get_publication(assistant.id)
    if publication is None or not publication.answers_on("groups"):
        await reply(update, tr(update, context, "customer_group_not_published"))
        return
    chat = update.effective_chat
    store.link_group(chat.id, assistant.id, by=update.effective_user.id, title=chat.title or "")
    await reply(update, tr(update, context, "customer_group_linked", name=assistant.name))


@requires("owner")
async def publish_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Publish, unpublish, a new link, a channel on/off, or the greeting (asked next)."""
    match = callback_match(update, PUBLISH_BUTTON)
    if match is None or int(match.group("id")) != assistant.id:
        await button_invalid(update, context)
        return
    action, uid, aid = match.group(1), update.effective_user.id, assistant.id
    store = store_of(context)
    try:
        if action == "publish":
            await with_thread_store(context, lambda s: s.publish(aid, by=uid))
        elif action == "unpublish":
            await with_thread_store(context, lambda s: s.unpublish(aid, by=uid))
        elif action == "revoke":
            await with_thread_store(context, lambda s: s.regenerate_token(aid, by=uid))
            await reply(update, tr(update, context, "publish_revoked"))
        elif action == "greeting":
            store.get_publication(aid) or store.publish(aid, by=uid)
            awaiting(context, "publish_greeting", assistant_id=aid)
            await reply(update, tr(update, context, "publish_greeting_ask"))
            return
        else:
            on = not getattr(store.get_publication(aid), action, 0)
            await with_thread_store(context, lambda s: s.set_channel(aid, action, on, by=uid))
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    await _show(update, context, assistant, edit=action != "revoke")


async def greeting_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The greeting customers see ("-": the standard one)."""
    store = store_of(context)
    uid = update.effective_user.id
    if store.role_of(pending["assistant_id"], uid) != "owner":
        await reply(update, tr(update, context, "not_member"))
        return
    text = update.message.text.strip()
    try:
        await with_thread_store(context, lambda s: s.set_greeting(pending["assistant_id"],
                                                                  "" if text == GREETING_DEFAULT else text, by=uid))
    except StorageError as exc:
        awaiting(context, "publish_greeting", assistant_id=pending["assistant_id"])
        await reply(update, tr_error(update, context, exc))
        return
    await reply(update, tr(update, context, "publish_greeting_saved"))
    assistant, _ = current_assistant(update, context)
    if assistant is not None and assistant.id == pending["assistant_id"]:
        await _show(update, context, assistant, edit=False)


def customer_stats_text(update: Update, context: ContextTypes.DEFAULT_TYPE, stats: dict) -> str:
    """The customers' part of /stats for owners and experts."""
    wait = stats["team_answer_minutes_median"]
    text = tr(update, context, "stats_customers", days=stats["days"], questions=stats["questions"],
              answered=stats["answered"], dont_know=stats["dont_know"], up=stats["thumbs_up"],
              down=stats["thumbs_down"], team=stats["team_answers"],
              wait="—" if wait is None else f"{wait:g} min", open=stats["open_customer_questions"])
    frequent = [g for g in stats["frequent_unanswered"] if g["count"] > 1][:5]
    if frequent:
        text += tr(update, context, "stats_frequent",
                   items="\n".join(f"• {short(g['question'], 120)} ×{g['count']}" for g in frequent))
    return text


async def customer_report_for(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> dict | None:
    """The customers' report for /stats when the assistant is published and the user is an owner or expert."""
    if not role_at_least(role, "expert") or store_of(context).get_publication(assistant.id) is None:
        return None
    indexes = app_of(context).indexes
    return await with_thread_store(context, lambda s: customer_report(s, assistant.id, indexes=indexes))


async def send_customer_chart(update: Update, context: ContextTypes.DEFAULT_TYPE, report: dict) -> None:
    """The owner's chart of customers' questions per day (drawn off the event loop)."""
    import asyncio
    import io

    buffer = io.BytesIO()
    await asyncio.to_thread(plot_customer_stats, report, buffer)
    buffer.seek(0)
    await update.effective_chat.send_photo(buffer, caption=tr(update, context, "stats_chart_caption"))


def handlers() -> list:
    return [
        CommandHandler("publish", publish),
        CallbackQueryHandler(publish_button, pattern=r"^pub:"),
    ]
