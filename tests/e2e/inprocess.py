"""The bot's real Application (bot.telegram.build_application) in the test process, talking to the emulator.

Updates are handed to `Application.process_update` directly instead of being polled, so a test can send
hundreds of crafted callbacks in seconds and see every exception a handler raised. Everything the bot sends
still goes over HTTP to the Bot API emulator, where the test reads it back.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from emulator import BotMessage, Emulator
from telegram import Update

from bot.app import App
from bot.config import Settings
from bot.telegram.application import build_application

BOT_USER = {"id": 666, "is_bot": True, "first_name": "Tunebot Test", "username": "TunebotTestBot"}


class InProcessBot:
    """`build_application(App(settings))` on its own event loop; `errors` collects what reached the error handlers."""

    def __init__(self, emulator: Emulator, data_dir: Path, *, engine_factory=None, **settings):
        self.emu = emulator
        settings.setdefault("preload_models", False)  # models load on first use unless a test asks
        self.app = App(Settings(data_dir=data_dir, telegram_token=emulator.token,
                                telegram_base_url=emulator.bot_api_url, unanswered_notify_minutes=0, **settings),
                       engine_factory=engine_factory)
        self.application = build_application(self.app)
        self.errors: list[BaseException] = []
        self._ids = itertools.count(1)
        self._runner = asyncio.Runner()

        async def record(update, context) -> None:
            self.errors.append(context.error)

        self.application.add_error_handler(record)
        self._runner.run(self.application.initialize())

    def close(self) -> None:
        self._runner.run(self.application.shutdown())
        self._runner.close()
        self.app.close_engines()

    @property
    def store(self):
        return self.app.store

    def user_data(self, user_id: int) -> dict:
        return self.application.user_data[user_id]

    # ------------------------------------------------------------ updates
    @staticmethod
    def _user(user_id: int, language: str) -> dict:
        return {"id": user_id, "is_bot": False, "first_name": f"U{user_id}", "language_code": language}

    @staticmethod
    def _chat(user_id: int, chat_id: int | None) -> dict:
        if chat_id is None or chat_id == user_id:
            return {"id": user_id, "type": "private", "first_name": f"U{user_id}"}
        return {"id": chat_id, "type": "group", "title": "A group"}

    def process(self, payload: dict) -> None:
        """Handle one update, and what its handlers started in the background (customers' answers)."""
        async def handle() -> None:
            await self.application.process_update(Update.de_json(payload, self.application.bot))
            running = self.application.bot_data.get("customer_answers", set())
            while pending := [task for task in running if not task.done()]:
                await asyncio.gather(*pending, return_exceptions=True)

        self._runner.run(handle())

    def send(self, user_id: int, text: str, *, language: str = "en", chat_id: int | None = None) -> int:
        """A text (a command when it starts with '/') from the user; the history mark before it."""
        mark = self.emu.last_message_id()
        n = next(self._ids)
        message = {"message_id": 10_000 + n, "date": int(time.time()), "chat": self._chat(user_id, chat_id),
                   "from": self._user(user_id, language), "text": text}
        if text.startswith("/"):
            message["entities"] = [{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]
        self.process({"update_id": n, "message": message})
        return mark

    def tap(self, user_id: int, data: str, *, language: str = "en", chat_id: int | None = None) -> int:
        """A callback query with `data` (crafted or from a real button) on a bot message; the mark before it."""
        mark = self.emu.last_message_id()
        n = next(self._ids)
        # A message id the emulator never gave out: an edit of "the tapped message" fails and the bot sends a
        # new message instead, which replies() sees.
        message = {"message_id": 10 ** 9, "date": int(time.time()), "chat": self._chat(user_id, chat_id),
                   "from": BOT_USER, "text": "…"}
        self.process({"update_id": n, "callback_query": {
            "id": str(n), "from": self._user(user_id, language), "chat_instance": str(user_id), "data": data,
            "message": message}})
        return mark

    # ------------------------------------------------------------ replies
    def replies(self, chat_id: int, mark: int) -> list[BotMessage]:
        """The bot's messages in the chat newer than `mark` (edits of older ones are not new messages)."""
        return [m for m in self.emu.bot_messages(chat_id) if m.message_id > mark]

    def ask(self, user_id: int, text: str, **kw) -> list[BotMessage]:
        mark = self.send(user_id, text, **kw)
        return self.replies(kw.get("chat_id") or user_id, mark)

    def press(self, user_id: int, data: str, **kw) -> list[BotMessage]:
        mark = self.tap(user_id, data, **kw)
        return self.replies(kw.get("chat_id") or user_id, mark)
