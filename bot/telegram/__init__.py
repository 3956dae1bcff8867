"""The Telegram bot: handlers, texts (en, ru), persistence in the database, job progress messages."""

from bot.telegram.application import build_application

__all__ = ["build_application"]
