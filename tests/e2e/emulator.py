"""A Python client for the Telegram Bot API emulator (tests/emulator/server.js) and simulated users."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

EMULATOR_DIR = Path(__file__).resolve().parent.parent / "emulator"
POLL_S = 0.05


class EmulatorUnavailable(Exception):
    """Node or the emulator's node_modules are missing (run `make setup`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BotMessage:
    """One message the bot sent, as it is now (after any edits)."""

    message_id: int
    chat_id: int
    text: str
    buttons: list[list[dict]]
    document: dict | None
    photo: list | None
    edits: int
    raw: dict = field(repr=False)

    @property
    def button_texts(self) -> list[str]:
        return [b["text"] for row in self.buttons for b in row]

    def button(self, label_part: str) -> dict:
        for row in self.buttons:
            for b in row:
                if label_part.lower() in b["text"].lower():
                    return b
        raise AssertionError(f"no button containing {label_part!r} in {self.button_texts} on {self.text!r}")


class Emulator:
    """A running `node server.js` on a free 127.0.0.1 port."""

    def __init__(self, *, token: str = "123456:TEST-TOKEN", port: int | None = None):
        if not shutil.which("node"):
            raise EmulatorUnavailable("node is not installed")
        if not (EMULATOR_DIR / "node_modules" / "telegram-test-api").exists():
            raise EmulatorUnavailable("tests/emulator/node_modules is missing; run `make setup`")
        self.token = token
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["node", "server.js", "--port", str(self.port), "--host", "127.0.0.1"],
                                     cwd=EMULATOR_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.http = httpx.Client(base_url=self.base_url, timeout=10)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.http.post(f"/bot{token}/getMe")
                break
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise EmulatorUnavailable(f"emulator did not start: {self.proc.stdout.read() if self.proc.stdout else ''}")
                time.sleep(0.1)

    @property
    def bot_api_url(self) -> str:
        """The value for TUNEBOT_TELEGRAM_BASE_URL (python-telegram-bot appends the token)."""
        return f"{self.base_url}/bot"

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def post(self, path: str, payload: dict) -> Any:
        resp = self.http.post(path, json=payload)
        resp.raise_for_status()
        return resp.json().get("result")

    def history(self) -> list[dict]:
        return self.post("/getUpdatesHistory", {"token": self.token})

    def bot_messages(self, chat_id: int) -> list[BotMessage]:
        out = []
        for item in self.history():
            msg = item.get("message") or {}  # user callback queries have no "message"
            if "chat_id" not in msg or str(msg["chat_id"]) != str(chat_id):
                continue
            markup = msg.get("reply_markup") or {}
            out.append(BotMessage(message_id=int(item["messageId"]), chat_id=int(msg["chat_id"]),
                                  text=msg.get("text") or msg.get("caption") or "",
                                  buttons=markup.get("inline_keyboard") or [], document=msg.get("document"),
                                  photo=msg.get("photo"), edits=item.get("edits", 0), raw=item))
        return sorted(out, key=lambda m: m.message_id)

    def drafts(self, chat_id: int | None = None) -> list[dict]:
        """The sendMessageDraft calls so far (oldest first), of one chat when given."""
        return [d for d in self.post("/getDrafts", {"token": self.token})
                if chat_id is None or int(d["chat_id"]) == chat_id]

    def refuse_drafts(self, refuse: bool = True) -> None:
        """Answer sendMessageDraft with 404, as a Bot API server older than 9.3 does."""
        self.post("/refuseDrafts", {"token": self.token, "refuse": refuse})

    def last_message_id(self) -> int:
        return max((int(i["messageId"]) for i in self.history()), default=0)

    def bot_file(self, file_id: str) -> bytes:
        return base64.b64decode(self.post("/getBotFile", {"file_id": file_id})["content_base64"])

    def user(self, user_id: int, name: str = "User", *, language: str = "en") -> "TgUser":
        return TgUser(self, user_id, name, language)


class TgUser:
    """A simulated Telegram user in a private chat with the bot."""

    def __init__(self, emulator: Emulator, user_id: int, name: str, language: str):
        self.emu = emulator
        self.id = user_id
        self.name = name
        self.language = language

    def _from(self) -> dict:
        return {"id": self.id, "is_bot": False, "first_name": self.name, "language_code": self.language}

    def _chat(self) -> dict:
        return {"id": self.id, "type": "private", "first_name": self.name}

    def _base(self) -> dict:
        return {"botToken": self.emu.token, "from": self._from(), "chat": self._chat(), "date": int(time.time())}

    def send(self, text: str, **extra: Any) -> int:
        """Send a text (a command when it starts with '/'); return the history mark before it."""
        mark = self.emu.last_message_id()
        body = {**self._base(), "text": text, **extra}
        if text.startswith("/"):
            body["entities"] = [{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]
            self.emu.post("/sendCommand", body)
        else:
            self.emu.post("/sendMessage", body)
        return mark

    def forward(self, text: str, *, original_sender: str = "Customer") -> int:
        return self.send(text, forward_origin={"type": "hidden_user", "date": int(time.time()),
                                               "sender_user_name": original_sender},
                         forward_sender_name=original_sender, forward_date=int(time.time()))

    def send_document(self, filename: str, data: bytes, *, mime: str = "application/octet-stream",
                      caption: str | None = None) -> int:
        mark = self.emu.last_message_id()
        self.emu.post("/userDocument", {"token": self.emu.token, "filename": filename, "mime": mime,
                                        "caption": caption, "message": self._base(),
                                        "content_base64": base64.b64encode(data).decode()})
        return mark

    def tap(self, message: BotMessage, label_part: str) -> int:
        """Tap an inline button whose label contains `label_part`."""
        button = message.button(label_part)
        mark = self.emu.last_message_id()
        bot_msg = {"message_id": message.message_id, "date": int(time.time()), "chat": self._chat(),
                   "text": message.text, "from": {"id": 666, "is_bot": True, "first_name": "Bot"}}
        self.emu.post("/sendCallback", {"botToken": self.emu.token, "from": self._from(), "message": bot_msg,
                                        "data": button["callback_data"]})
        return mark

    def messages(self) -> list[BotMessage]:
        return self.emu.bot_messages(self.id)

    def message(self, message_id: int) -> BotMessage:
        for m in self.messages():
            if m.message_id == message_id:
                return m
        raise AssertionError(f"no bot message #{message_id} in chat {self.id}")

    def wait(self, mark: int, *, count: int = 1, timeout: float = 30,
             until: Callable[[list[BotMessage]], bool] | None = None) -> list[BotMessage]:
        """Bot messages in this chat newer than `mark`, once `count` exist (and `until` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            new = [m for m in self.messages() if m.message_id > mark]
            if len(new) >= count and (until is None or until(new)):
                return new
            if time.monotonic() > deadline:
                raise AssertionError(f"user {self.id}: expected {count} bot message(s) after #{mark}, "
                                     f"got {[m.text[:80] for m in new]}")
            time.sleep(POLL_S)

    def ask(self, text: str, *, count: int = 1, timeout: float = 30, contains: str | None = None) -> BotMessage:
        """Send a text and return the last of the bot's replies (waiting for `contains` when given)."""
        mark = self.send(text)
        until = (lambda ms: any(contains.lower() in m.text.lower() for m in ms)) if contains else None
        return self.wait(mark, count=count, timeout=timeout, until=until)[-1]

    def press(self, message: BotMessage, label_part: str, *, timeout: float = 30,
              contains: str | None = None) -> BotMessage:
        """Tap a button and return the bot's newest message in the chat (a new one or the edited one)."""
        mark = self.emu.last_message_id()
        before = {m.message_id: (m.text, m.edits) for m in self.messages()}
        self.tap(message, label_part)
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            changed = [m for m in msgs if m.message_id > mark or before.get(m.message_id) != (m.text, m.edits)]
            if contains:
                changed = [m for m in changed if contains.lower() in m.text.lower()]
            if changed:
                return changed[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply to tapping {label_part!r} (contains={contains!r})")
            time.sleep(POLL_S)

    def is_silent_after(self, mark: int, *, wait_s: float = 1.0) -> bool:
        time.sleep(wait_s)
        return not [m for m in self.messages() if m.message_id > mark]


def emulator_env(emulator: Emulator, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a `tunebot run` subprocess talking to the emulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEBOT_")}
    env.update({"TELEGRAM_BOT_TOKEN": emulator.token, "TUNEBOT_TELEGRAM_BASE_URL": emulator.bot_api_url,
                "TUNEBOT_DATA_DIR": str(data_dir), "TUNEBOT_PRELOAD_MODELS": "0", **extra})
    return env
