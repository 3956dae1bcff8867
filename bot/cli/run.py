"""`tunebot run`: the Telegram bot, with the job worker and scheduler (and the API when a port is set)."""

from __future__ import annotations

import logging
import threading

from bot.cli import CommandError

log = logging.getLogger("tunebot.run")

NO_TOKEN = ("no Telegram bot token. Create a bot with @BotFather in Telegram (send /newbot), then set "
            "TELEGRAM_BOT_TOKEN=<token> (or TUNEBOT_TELEGRAM_TOKEN, or telegram_token in tunebot.toml) and run again")


def register(sub) -> None:
    p = sub.add_parser("run", help="run the Telegram bot with the job worker and scheduler",
                       description="Run the Telegram bot. Needs TELEGRAM_BOT_TOKEN (from @BotFather). The job "
                                   "worker and the retraining scheduler run in the same process; the "
                                   "OpenAI-compatible API too when TUNEBOT_API_PORT is set.")
    p.add_argument("--no-worker", action="store_true", help="do not run jobs in this process (run `tunebot worker`)")
    p.set_defaults(func=run)


def _start_worker(app):
    """The job worker (which also runs the scheduler) on a background thread."""
    worker = app.new_worker()
    worker.start()
    return worker


def _start_api(app):
    """The OpenAI-compatible API on settings.api_host:api_port, sharing the bot's engine, on a thread."""
    import uvicorn

    from storage import Store, open_db
    from tuning.answering.api import create_api_app

    s = app.settings

    api = create_api_app(Store(open_db(s.database_path)), app.engine, engine_for=app.engine_for,
                         indexes=app.indexes)
    server = uvicorn.Server(uvicorn.Config(api, host=s.api_host, port=s.api_port, log_level="warning"))
    threading.Thread(target=server.run, name="tunebot-api", daemon=True).start()
    return server


def run(args, app) -> int:
    from bot.telegram.application import BotConfigError, build_application

    if not app.settings.telegram_token:
        raise CommandError(NO_TOKEN)
    try:
        application = build_application(app)
    except BotConfigError as exc:
        raise CommandError(str(exc)) from None
    app.preload()  # the first question after a start is answered from a warm engine
    worker = None if args.no_worker else _start_worker(app)
    api = _start_api(app) if app.settings.api_port else None
    log.info("bot starting (worker: %s, api: %s)", "on" if worker else "off",
             f"{app.settings.api_host}:{app.settings.api_port}" if api else "off")
    try:
        application.run_polling(poll_interval=0.0, timeout=10, drop_pending_updates=False)
    finally:
        if api is not None:
            api.should_exit = True
        if worker is not None:
            worker.stop(timeout=10)
            worker.shutdown()
        app.close_engines()
    return 0
