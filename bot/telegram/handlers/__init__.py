"""Telegram handlers by feature; `all_handlers()` returns them in the order they must be tried."""

from __future__ import annotations

import warnings

from telegram import Update
from telegram.warnings import PTBUserWarning
from telegram.ext import CallbackQueryHandler, ContextTypes, MessageHandler, filters

from bot.telegram.common import button_invalid, current_assistant, reply, role_at_least, tr
from bot.telegram.handlers import (admin, chat, customers, examples, firstrun, generate, onboarding, publish, review,
                                   training)

# Our conversations are per user and chat on purpose: a button tapped on an older message still counts.
warnings.filterwarnings("ignore", message="If 'per_message=False'", category=PTBUserWarning)

# What the next plain text means when a button asked for it (kept in user_data, so it survives restarts).
AWAITING = {
    "edit_example": examples.edit_example_text,
    "forward_answer": examples.forward_answer,
    "edit_variation": review.edit_variation_text,
    "answer_unanswered": review.answer_unanswered_text,
    "reword_unanswered": review.reword_unanswered_text,
    "train_time": training.train_time_text,
    "correction": chat.correction_text,
    "publish_greeting": publish.greeting_text,
}


async def text_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Plain text: an answer to a pending question, a chat question, the quick form, or a hint."""
    pending = context.user_data.pop("awaiting", None)
    if pending and pending.get("kind") in AWAITING:
        await AWAITING[pending["kind"]](update, context, pending)
        return
    if update.message.forward_origin is not None:
        await examples.forwarded(update, context)
        return
    session = context.user_data.get("chat")
    if session:
        await chat.stream_answer(update, context, session)
        return
    if examples.parse_quick_form(update.message.text):
        await examples.quick_form(update, context)
        return
    assistant, role = current_assistant(update, context)
    if assistant is None:
        await reply(update, tr(update, context, "stray_stranger"))
    elif role_at_least(role, "expert"):
        await reply(update, tr(update, context, "stray_expert"))
    else:
        await reply(update, tr(update, context, "stray_tester"))


async def unknown_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A command we do not have."""
    await reply(update, tr(update, context, "unknown_command"))


async def other_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Stickers, photos, voice: say what the bot understands."""
    await reply(update, tr(update, context, "unsupported_message"))


async def unknown_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Callback data no handler takes: an unknown prefix, or a dialogue's button after the dialogue ended."""
    await update.callback_query.answer()
    await button_invalid(update, context)


class NoDataCallbackHandler(CallbackQueryHandler):
    """A callback query without data, which python-telegram-bot would hand to the first handler with a pattern."""

    def check_update(self, update: object) -> bool:
        return isinstance(update, Update) and update.callback_query is not None and not update.callback_query.data


def all_handlers() -> list:
    return [
        NoDataCallbackHandler(unknown_button),
        *onboarding.handlers(),
        *examples.handlers(),
        *review.handlers(),
        *generate.handlers(),
        *training.handlers(),
        *chat.handlers(),
        *admin.handlers(),
        *publish.handlers(),
        *customers.handlers(),
        *firstrun.handlers(),
        CallbackQueryHandler(unknown_button),
        MessageHandler(filters.Document.ALL, examples.upload),
        MessageHandler(filters.TEXT & ~filters.COMMAND, text_message),
        MessageHandler(filters.COMMAND, unknown_command),
        MessageHandler(filters.ALL & ~filters.StatusUpdate.ALL, other_message),
    ]
