"""Building the python-telegram-bot Application from the composition root."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import secrets
import signal
import threading
import traceback

from telegram import Update
from telegram.ext import AIORateLimiter, Application, ContextTypes, TypeHandler

from bot.telegram.checklist import refresh_after_update
from bot.telegram.common import reply, tr, tr_error
from bot.telegram.handlers import all_handlers, business, customers
from bot.telegram.handlers.review import notify_unanswered
from bot.telegram.menus import set_command_menus
from bot.telegram.persistence import StorePersistence
from bot.telegram.progress import POLL_S, poll_jobs
from storage import StorageError
from tuning.errors import TuningError

log = logging.getLogger("tunebot.telegram")


class BotConfigError(Exception):
    """The bot cannot start with these settings (the message says which one to set)."""


async def error_handler(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Domain errors are shown in the user's language; anything else is logged with a reference the user can quote."""
    exc = context.error
    if isinstance(update, Update) and update.effective_chat and isinstance(exc, (StorageError, TuningError)):
        await reply(update, tr_error(update, context, exc))
        return
    ref = secrets.token_hex(4)
    log.error("unhandled error ref=%s: %s\n%s", ref, type(exc).__name__,
              "".join(traceback.format_exception(exc)) if exc else "")
    if isinstance(update, Update) and update.effective_chat:
        try:
            await reply(update, tr(update, context, "error_internal", ref=html.escape(ref)))
        except Exception:  # the chat may be unreachable; the log has the reference
            log.exception("could not tell the user about error ref=%s", ref)


def _catch_stop_signals(application: Application) -> None:
    """SIGINT/SIGTERM: flag bot_data["stopping"] for long background work (a generation), then stop as PTB does.

    PTB waits for every create_task task before it stops; a generation sees the flag and ends within
    a fraction of a second, its items saved and the run resumable, instead of holding the shutdown.
    """
    def on_signal() -> None:
        application.bot_data["stopping"].set()
        raise SystemExit  # what run_polling's own handler does

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)


async def post_init(application: Application) -> None:
    """Catch the stop signals; register the command menu (both languages)."""
    _catch_stop_signals(application)
    await set_command_menus(application.bot)


def build_application(app) -> Application:
    """The bot for this App: token and Bot API URL from settings, DB persistence, rate limiter, repeating jobs."""
    settings = app.settings
    if not settings.telegram_token:
        raise BotConfigError("no Telegram bot token")
    builder = (Application.builder().token(settings.telegram_token)
               .persistence(StorePersistence(app.store))
               .rate_limiter(AIORateLimiter(max_retries=2))
               .concurrent_updates(8)
               .post_init(post_init))
    if settings.telegram_base_url:
        base = settings.telegram_base_url.rstrip("/")
        builder = builder.base_url(base if base.endswith("/bot") else base + "/bot")
        builder = builder.base_file_url((base[: -len("/bot")] if base.endswith("/bot") else base) + "/file/bot")
    application = builder.build()
    application.bot_data["app"] = app
    application.bot_data["stopping"] = threading.Event()  # set when the bot begins to shut down
    # Customers' updates are answered before the team's handlers see them, and go no further: business chats
    # first, then the link's private chats and customers' groups.
    application.add_handler(TypeHandler(Update, business.route), group=-2)
    application.add_handler(TypeHandler(Update, customers.route), group=-1)
    for handler in all_handlers():
        application.add_handler(handler)
    application.add_handler(TypeHandler(Update, refresh_after_update), group=1)  # after the handler that answered
    application.add_error_handler(error_handler)
    application.job_queue.run_repeating(poll_jobs, interval=POLL_S, first=POLL_S, name="job-progress")
    application.job_queue.run_repeating(customers.deliver_job, interval=customers.DELIVER_EVERY_S,
                                        first=customers.DELIVER_EVERY_S, name="team-answers")
    if settings.unanswered_notify_minutes > 0:
        every_s = settings.unanswered_notify_minutes * 60
        application.job_queue.run_repeating(notify_unanswered, interval=every_s, first=every_s,
                                            name="unanswered-notify")
    return application
