"""Showing an answer while it is generated.

In a private chat the growing text is streamed as a message draft (`sendMessageDraft`, Bot API 9.3+): Telegram
animates it in the input area, and the finished answer is then sent as one ordinary message with its buttons.
Elsewhere (groups), or when the Bot API server refuses drafts (an older self-hosted one), a placeholder message is
sent and edited as the text grows, at most once per `EDIT_EVERY_S` (Telegram allows about one edit a second per
chat). A refused draft switches this process to edits for good and is logged once.
"""

from __future__ import annotations

import logging
import time

from telegram.error import BadRequest, EndPointNotFound, Forbidden, InvalidToken, TelegramError

from bot.telegram.common import MAX_MESSAGE, split_text

log = logging.getLogger("tunebot.telegram")
EDIT_EVERY_S = 1.5
DRAFT_EVERY_S = 0.4  # drafts are meant for streaming; Telegram animates the change
DRAFTS_REFUSED = "telegram_drafts_refused"  # bot_data key: this Bot API server does not take sendMessageDraft


class AnswerStream:
    """One answer on its way to a chat: `start()`, `grow(text)` as tokens arrive, `finish(text, markup)`."""

    def __init__(self, bot, chat, bot_data: dict, *, drafts: bool, draft_id: int, placeholder: str,
                 clock=time.monotonic):
        self.bot, self.chat, self.bot_data = bot, chat, bot_data
        self.drafts = drafts and chat.type == "private" and not bot_data.get(DRAFTS_REFUSED) and draft_id > 0
        self.draft_id = draft_id
        self.placeholder = placeholder
        self.clock = clock
        self.message = None  # the edited placeholder (edit mode only)
        self.last = float("-inf")
        self.shown = ""

    @property
    def mode(self) -> str:
        return "draft" if self.drafts else "edit"

    async def start(self) -> None:
        if self.drafts and await self._draft(self.placeholder):
            return
        self.message = await self.chat.send_message(self.placeholder)
        self.last = self.clock()

    async def grow(self, text: str) -> None:
        """The answer so far; shown when enough time has passed since the last update."""
        every = DRAFT_EVERY_S if self.drafts else EDIT_EVERY_S
        if not text.strip() or len(text) >= MAX_MESSAGE or text == self.shown or self.clock() - self.last < every:
            return
        if self.drafts and await self._draft(text + " …"):
            self.shown = text
            return
        if self.message is None:  # drafts were refused just now: carry on with an edited message
            self.message = await self.chat.send_message(text + " …")
        else:
            await self.message.edit_text(text + " …")
        self.shown, self.last = text, self.clock()

    async def finish(self, text: str, markup=None):
        """The finished answer as a message of its own (drafts) or the placeholder's last edit; the buttons go
        under its last part. Returns the message that carries them."""
        parts = split_text(text)
        sent = None
        for i, part in enumerate(parts):
            buttons = markup if i == len(parts) - 1 else None
            if i == 0 and self.message is not None:
                try:
                    sent = await self.message.edit_text(part, reply_markup=buttons)
                    continue
                except BadRequest as exc:  # "message is not modified" and no buttons to add
                    if "not modified" not in str(exc).lower():
                        raise
                    sent = self.message
                    continue
            sent = await self.chat.send_message(part, reply_markup=buttons)
        return sent

    async def _draft(self, text: str) -> bool:
        """Whether the draft was shown. A refusal (an older Bot API server, a chat that takes none) switches
        this process to edits; a passing failure (a timeout, flood control) only skips this update."""
        try:
            await self.bot.send_message_draft(self.chat.id, self.draft_id, text)
        except (BadRequest, EndPointNotFound, Forbidden, InvalidToken) as exc:  # PTB reads a 404 as InvalidToken
            log.warning("the Bot API server refused sendMessageDraft (%s); streaming by editing messages", exc)
            self.bot_data[DRAFTS_REFUSED] = True
            self.drafts = False
            return False
        except TelegramError as exc:
            log.debug("draft update skipped: %s", exc)
            self.last = self.clock()
            return True
        self.last = self.clock()
        return True
