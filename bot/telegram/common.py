"""What every handler shares: the services, the user's language and assistant, role checks, replies."""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Awaitable, Callable

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ChatType
from telegram.ext import ContextTypes

from bot.telegram.texts import catalogue, pick_language, t
from storage import NotFound, Store
from storage.records import ROLES, Assistant

log = logging.getLogger("tunebot.telegram")
MAX_MESSAGE = 4000  # Telegram's limit is 4096; leave room for entities
MAX_CALLBACK = 64
ID = r"[0-9]{1,18}"  # a row id in callback data: digits only, and within SQLite's 64-bit integers

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Awaitable[Any]]


def app_of(context: ContextTypes.DEFAULT_TYPE):
    """The composition root (bot.app.App) kept in bot_data."""
    return context.bot_data["app"]


def store_of(context: ContextTypes.DEFAULT_TYPE) -> Store:
    return app_of(context).store


def lang_of(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The user's language: /lang choice, else the Telegram client's language, else the default."""
    chosen = context.user_data.get("lang") if context.user_data is not None else None
    if chosen:
        return chosen
    user = update.effective_user
    return pick_language(user.language_code if user else None, app_of(context).settings.default_language)


def tr(update: Update, context: ContextTypes.DEFAULT_TYPE, key: str, **params: object) -> str:
    """The text `key` in this user's language."""
    return t(lang_of(update, context), key, **params)


def error_reason(exc: BaseException, lang: str) -> str:
    """A domain error in `lang`: the catalogue's "error_<code>" filled with its params, else its English message."""
    code = getattr(exc, "code", "")
    key = f"error_{code}"
    if code and key in catalogue("en"):
        try:
            return t(lang, key).format(**getattr(exc, "params", {}))
        except (KeyError, IndexError):  # the text needs a param this error lacks (a file without a name)
            log.debug("error %s lacks params for %s; showing it in English", code, lang)
    return str(exc)


def tr_error(update: Update, context: ContextTypes.DEFAULT_TYPE, exc: BaseException) -> str:
    """The "⚠️ reason" reply for a domain error (TuningError, StorageError), in this user's language."""
    return tr(update, context, "error_user", reason=error_reason(exc, lang_of(update, context)))


def role_at_least(role: str | None, needed: str) -> bool:
    """Owner > expert > tester."""
    return role is not None and ROLES.index(role) <= ROLES.index(needed)


def can_edit(store, assistant_id: int, user_id: int) -> bool:
    """Whether this user may change the assistant's examples (an owner or expert of it): the check every handler
    makes before it saves what a user typed for an assistant named in its pending state or callback."""
    return role_at_least(store.role_of(assistant_id, user_id), "expert")


def current_assistant(update: Update, context: ContextTypes.DEFAULT_TYPE) -> tuple[Assistant | None, str | None]:
    """The assistant this user works on (chosen with /use, or their only one) and their role in it."""
    store = store_of(context)
    uid = update.effective_user.id
    chosen = context.user_data.get("assistant_id")
    if chosen is not None:
        role = store.role_of(chosen, uid)
        if role is not None:
            try:
                return store.get_assistant(chosen), role
            except Exception:  # deleted meanwhile
                pass
        context.user_data.pop("assistant_id", None)
    mine = store.list_assistants(user_id=uid)
    if not mine:
        return None, None
    assistant = mine[-1]
    context.user_data["assistant_id"] = assistant.id
    return assistant, store.role_of(assistant.id, uid)


def requires(role: str) -> Callable[[Handler], Handler]:
    """Run the handler only for members with at least `role`; pass (assistant, role) in context.user_data."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def checked(update: Update, context: ContextTypes.DEFAULT_TYPE):
            if update.callback_query:
                await update.callback_query.answer()
            assistant, have = current_assistant(update, context)
            if assistant is None:
                await reply(update, tr(update, context, "not_member"))
                return None
            if not role_at_least(have, role):
                await reply(update, tr(update, context, "forbidden", role=tr(update, context, f"role_{role}"),
                                       have=tr(update, context, f"role_{have}")))
                return None
            context.chat_data["assistant"] = assistant.id
            return await fn(update, context, assistant, have)

        return checked

    return wrap


def private_only(fn: Handler) -> Handler:
    """Run the handler only in a private chat: API keys and exported data must not land in a group."""

    @functools.wraps(fn)
    async def checked(update: Update, context: ContextTypes.DEFAULT_TYPE):
        chat = update.effective_chat
        if chat is not None and chat.type != ChatType.PRIVATE:
            if update.callback_query:
                await update.callback_query.answer()
            await reply(update, tr(update, context, "private_only"))
            return None
        return await fn(update, context)

    return checked


def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Pieces under Telegram's limit, cut at paragraph, line or word boundaries where possible."""
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = max(rest.rfind("\n\n", 0, limit), rest.rfind("\n", 0, limit), rest.rfind(" ", 0, limit))
        if cut < limit // 2:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    pieces.append(rest)
    return [p for p in pieces if p] or [""]


async def reply(update: Update, text: str, *, buttons: list[list[tuple[str, str]]] | None = None,
                edit: bool = False):
    """Answer in the user's chat (editing the tapped message when `edit`); long texts are split."""
    markup = keyboard(buttons) if buttons else None
    if edit and update.callback_query and len(text) <= MAX_MESSAGE:
        try:
            return await update.callback_query.edit_message_text(text, reply_markup=markup)
        except Exception as exc:  # not modified, or too old to edit: send a new message instead
            log.debug("edit failed (%s); sending a new message", exc)
    chat = update.effective_chat
    parts = split_text(text)
    sent = None
    for i, part in enumerate(parts):
        sent = await chat.send_message(part, reply_markup=markup if i == len(parts) - 1 else None)
    return sent


def keyboard(rows: list[list[tuple[str, str]]]) -> InlineKeyboardMarkup:
    """Inline keyboard from (label, callback data) rows; data over 64 bytes is a bug, caught here."""
    for row in rows:
        for _, data in row:
            if len(data.encode("utf-8")) > MAX_CALLBACK:
                raise ValueError(f"callback data over {MAX_CALLBACK} bytes: {data!r}")
    return InlineKeyboardMarkup([[InlineKeyboardButton(label, callback_data=data) for label, data in row]
                                 for row in rows])


def callback_match(update: Update, pattern: re.Pattern) -> re.Match | None:
    """The callback data matched in full against the shape its buttons have (None for anything else)."""
    return pattern.fullmatch(update.callback_query.data or "")


def button_object(update: Update, pattern: re.Pattern, getter: Callable[[int], Any], *,
                  assistant_id: int) -> tuple[re.Match | None, Any]:
    """The callback data matched against `pattern`, and the object its `(?P<id>…)` group names when that exists
    and belongs to the assistant (None otherwise)."""
    match = callback_match(update, pattern)
    if match is None:
        return None, None
    try:
        found = getter(int(match.group("id")))
    except NotFound:
        return match, None
    return match, found if found.assistant_id == assistant_id else None


async def button_invalid(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The reply to callback data that no button offers now: crafted, stale, or about another assistant's object."""
    await reply(update, tr(update, context, "button_invalid"))


def awaiting(context: ContextTypes.DEFAULT_TYPE, kind: str | None = None, **params: Any) -> None:
    """Remember that the next plain text of this user answers a question (or clear that)."""
    if kind is None:
        context.user_data.pop("awaiting", None)
    else:
        context.user_data["awaiting"] = {"kind": kind, **params}


def short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


async def with_thread_store(context: ContextTypes.DEFAULT_TYPE, fn: Callable[[Store], Any]) -> Any:
    """Run fn(store) in a worker thread with that thread's own database connection (sqlite connections stay in
    their thread; asyncio's pool threads keep theirs between calls)."""
    import asyncio

    return await asyncio.to_thread(lambda: fn(_thread_stores(app_of(context).settings.database_path)()))


@functools.lru_cache(maxsize=8)
def _thread_stores(path: str):
    from storage import ThreadStores

    return ThreadStores(path)
