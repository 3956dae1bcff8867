"""Telegram Business: an owner connects the bot to their business account (Telegram's settings → Chatbots); the
bot answers that account's customer chats when it is sure and stays silent otherwise, and when the person answers
a customer themselves, the question and their reply become a pending example. Runs before every other handler
(group -2) and stops there for every business update."""

from __future__ import annotations

import logging

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import ApplicationHandlerStop, ContextTypes

from bot.telegram.common import app_of, store_of, with_thread_store
from bot.telegram.handlers.customers import in_background, limiter_of
from bot.telegram.texts import pick_language, t
from tuning.customers import answer_customer, asked_today

log = logging.getLogger("tunebot.telegram")


def can_reply(connection) -> bool:
    """The connection's right to reply (Bot API 9.0 `rights.can_reply`; before it, a top-level `can_reply`)."""
    if connection.rights is not None:
        return bool(connection.rights.can_reply)
    return bool(connection.api_kwargs.get("can_reply"))


async def route(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Group -2: business connections and business messages; nothing else of the bot sees them."""
    if not isinstance(update, Update):
        return
    if update.business_connection is not None:
        await connection_changed(update, context)
    elif update.business_message is not None:
        await business_message(update, context)
    elif update.edited_business_message is None and update.deleted_business_messages is None:
        return
    raise ApplicationHandlerStop  # edits and deletions in a customer's chat: the answer stands, nothing to do


def _assistant_for(store, user_id: int, preferred: int | None):
    """The assistant a business account's owner connects: their current one, else the last one they own, if it
    is published with the business channel on (None otherwise)."""
    owned = [a for a in store.list_assistants(user_id=user_id) if store.role_of(a.id, user_id) == "owner"]
    owned.sort(key=lambda a: a.id != preferred)
    for assistant in owned:
        publication = store.get_publication(assistant.id)
        if publication is not None and publication.answers_on("business"):
            return assistant
    return None


async def connection_changed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Connected, changed or disconnected: remember it, and tell the owner what the bot will do."""
    connection = update.business_connection
    store = store_of(context)
    user = connection.user
    preferred = (context.application.user_data.get(user.id) or {}).get("assistant_id")
    assistant = _assistant_for(store, user.id, preferred) if connection.is_enabled else None
    previous = store.business_connection(connection.id)
    assistant_id = assistant.id if assistant else (previous or {}).get("assistant_id")
    store.save_business_connection(connection.id, assistant_id=assistant_id, user_id=user.id,
                                   user_chat_id=connection.user_chat_id, can_reply=can_reply(connection),
                                   enabled=connection.is_enabled and assistant is not None)
    lang = pick_language(user.language_code, app_of(context).settings.default_language)
    if not connection.is_enabled:
        text = t(lang, "business_disconnected")
    elif assistant is None:
        text = t(lang, "business_not_published")
    elif not can_reply(connection):
        text = t(lang, "business_connected_no_reply", name=assistant.name)
    else:
        text = t(lang, "business_connected", name=assistant.name)
    try:
        await context.bot.send_message(connection.user_chat_id, text)
    except TelegramError as exc:  # the owner never started the bot: the connection still works
        log.info("could not tell business account %s about its connection: %s", user.id, exc)


async def business_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A message in a connected account's chat: the customer's question (answered only when sure and allowed),
    or the person's own reply (their answer to the customer's open question, for the experts)."""
    message = update.business_message
    store = store_of(context)
    connection = store.business_connection(message.business_connection_id or "")
    if connection is None or not connection["enabled"] or connection["assistant_id"] is None:
        return
    assistant_id = connection["assistant_id"]
    publication = store.get_publication(assistant_id)
    if publication is None or not publication.answers_on("business") or message.from_user is None:
        return
    sender, chat = message.from_user, message.chat
    if sender.id == connection["user_id"]:  # the person answers their customer themselves
        customer = store.find_customer(assistant_id, chat.id, chat.id)
        if customer is not None and message.text:
            await with_thread_store(context, lambda s: s.human_answered(customer.id, message.text, by=sender.id))
        return
    if not message.text or not message.text.strip() or not connection["can_reply"] or sender.is_bot:
        return  # stickers, photos, voice: the person answers those
    limiter = limiter_of(context)
    question = message.text.strip()
    if len(question) > limiter.limits.max_chars:
        return
    customer = store.find_customer(assistant_id, sender.id, chat.id) or store.open_customer(
        assistant_id, sender.id, chat.id, channel="business", business_connection_id=connection["id"],
        language=pick_language(sender.language_code, app_of(context).settings.default_language))
    if limiter.admit(assistant_id, sender.id, asked_today(store, customer)) is not None:
        return  # over the limit: the person sees the message and answers as usual

    async def answer() -> None:
        try:
            await _answer_if_sure(update, context, customer, question)
        finally:
            limiter.done(assistant_id, sender.id)

    in_background(context, answer(), update)


async def _answer_if_sure(update: Update, context: ContextTypes.DEFAULT_TYPE, customer, question: str) -> None:
    app = app_of(context)
    assistant = store_of(context).get_assistant(customer.assistant_id)
    engine = app.engine_for(assistant.base_model or app.settings.base_model)
    message = update.business_message
    answer = await with_thread_store(context, lambda s: answer_customer(
        s, engine, customer, question, abstain_text="", indexes=app.indexes))
    if answer.abstained or not answer.text.strip():
        if not answer.abstained and answer.message_id is not None:  # nothing said: the person answers it
            await with_thread_store(context, lambda s: s.queue_customer_question(answer.message_id))
        return
    try:
        sent = await context.bot.send_message(message.chat.id, answer.text[:4000],
                                              business_connection_id=message.business_connection_id)
    except TelegramError as exc:  # rights taken away a moment ago, or the connection closed
        log.info("could not answer in business chat %s: %s", message.chat.id, exc)
        return
    store_of(context).set_telegram_message(answer.message_id, sent.message_id)
