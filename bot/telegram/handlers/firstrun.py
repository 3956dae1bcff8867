"""The first-run checklist's buttons: each one does what its command does (➕ is an entry of /add's dialogue, and
💬 is the finish report's Try it)."""

from __future__ import annotations

import re

from telegram import Update
from telegram.ext import CallbackQueryHandler, ContextTypes

from bot.telegram.common import button_invalid, callback_match
from bot.telegram.handlers import generate, review, training

# Callback data is untrusted: only these shapes are accepted (fullmatch).
CHECKLIST_BUTTON = re.compile(r"fr:(gen|rv|tr)")
ACTIONS = {"gen": generate.generate, "rv": review.review, "tr": training.train}


async def checklist_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """✨ variations, 📝 review or 🚀 train, as /generate, /review and /train would."""
    match = callback_match(update, CHECKLIST_BUTTON)
    if match is None:
        await update.callback_query.answer()
        await button_invalid(update, context)
        return
    await ACTIONS[match.group(1)](update, context)  # each checks the role and answers the query


def handlers() -> list:
    return [CallbackQueryHandler(checklist_button, pattern=r"^fr:")]
