"""The first-run checklist: one message per new assistant (examples · review · training · try it) that edits itself
as the owner gets on, with the button for the next step. Its state is computed from the store each time; only
where the message lives is kept (bot_state "tg:checklist:<assistant id>")."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from telegram import Bot, Update
from telegram.error import BadRequest, Forbidden, TelegramError
from telegram.ext import ContextTypes

from bot.telegram.common import keyboard, lang_of, store_of
from bot.telegram.texts import t
from storage import NotFound, Store

log = logging.getLogger("tunebot.telegram")
MIN_EXAMPLES = 2  # what /train asks for
REVIEWED_SOURCES = ("synthetic", "document", "feedback")  # examples that come in pending and get reviewed
ACTIVE_JOB = ("scheduled", "queued", "running")
DONE, RUNNING, TODO = "✅", "⏳", "☐"


def _key(assistant_id: int) -> str:
    return f"tg:checklist:{assistant_id}"


@dataclass(frozen=True)
class Progress:
    """Where an assistant's first run stands, from the store."""

    name: str
    approved: int
    pending: int
    reviewable: int
    job_id: int | None  # a training that is scheduled, queued or running
    version_id: int | None  # the newest trained version (not discarded)
    tried: bool  # a trained version has answered in chat

    @property
    def next_step(self) -> str:
        """examples | wait | review | generate | train | try | done."""
        if self.approved < MIN_EXAMPLES:
            return "examples"
        if self.job_id is not None:
            return "wait"
        if self.pending:
            return "review"
        if self.version_id is None:
            return "generate" if not self.reviewable else "train"
        return "done" if self.tried else "try"


def progress_of(store: Store, assistant_id: int) -> Progress:
    """The checklist's facts: a few counts, the active training job, the newest version."""
    assistant = store.get_assistant(assistant_id)
    counts = store.example_counts(assistant_id)
    jobs = [j for j in store.list_jobs(assistant_id=assistant_id, status=ACTIVE_JOB) if j.kind == "train"]
    versions = [v for v in store.list_model_versions(assistant_id) if v.status != "discarded"]
    return Progress(name=assistant.name, approved=counts["status"].get("approved", 0),
                    pending=counts["status"].get("pending", 0),
                    reviewable=sum(counts["source"].get(s, 0) for s in REVIEWED_SOURCES),
                    job_id=jobs[-1].id if jobs else None, version_id=versions[-1].id if versions else None,
                    tried=store.count_version_answers(assistant_id) > 0)


def render(p: Progress, lang: str) -> tuple[str, list[list[tuple[str, str]]]]:
    """The checklist text and its buttons (the next step's)."""
    step = p.next_step
    examples = DONE if p.approved >= MIN_EXAMPLES else TODO
    if p.pending:
        review = t(lang, "checklist_review_pending", mark=RUNNING, n=p.pending)
    else:
        review = t(lang, "checklist_review", mark=DONE if p.reviewable else TODO)
    if p.job_id is not None:
        training = t(lang, "checklist_training_running", mark=RUNNING, id=p.job_id)
    elif p.version_id is not None:
        training = t(lang, "checklist_training_done", mark=DONE, id=p.version_id)
    else:
        training = t(lang, "checklist_training", mark=TODO)
    lines = [t(lang, "checklist_title", name=p.name), "",
             t(lang, "checklist_examples", mark=examples, n=p.approved), review, training,
             t(lang, "checklist_try", mark=DONE if p.tried else TODO), "",
             t(lang, f"checklist_next_{step}", n=p.pending, least=MIN_EXAMPLES)]
    buttons = {"examples": [("btn_cl_add", "fr:add")], "review": [("btn_cl_review", "fr:rv")],
               "generate": [("btn_cl_generate", "fr:gen"), ("btn_cl_train", "fr:tr")],
               "train": [("btn_cl_train", "fr:tr")],
               "try": [("btn_cl_try", f"tv:t:{p.version_id}")]}.get(step, [])  # chat with that version
    return "\n".join(lines), [[(t(lang, key), data)] for key, data in buttons]


async def show_checklist(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int) -> None:
    """Send the checklist of a new assistant into this chat and remember where it is."""
    store = store_of(context)
    lang = lang_of(update, context)
    text, rows = render(progress_of(store, assistant_id), lang)
    try:
        message = await update.effective_chat.send_message(text, reply_markup=keyboard(rows) if rows else None)
    except TelegramError as exc:  # the assistant exists all the same; the checklist is a help, not a step
        log.debug("checklist of assistant %s not sent: %s", assistant_id, exc)
        return
    store.set_state(_key(assistant_id), {"chat_id": message.chat_id, "message_id": message.message_id,
                                         "lang": lang, "user_id": update.effective_user.id, "text": text})


async def refresh_checklist(bot: Bot, store: Store, assistant_id: int | None, *, lang: str | None = None) -> None:
    """Edit the assistant's checklist if what it says changed. A message that is gone is forgotten; any other failure
    to edit is ignored (the next action tries again)."""
    if assistant_id is None:
        return
    state = store.get_state(_key(assistant_id))
    if not state or state.get("done"):
        return
    lang = lang or state.get("lang") or "en"
    try:
        progress = progress_of(store, assistant_id)
    except NotFound:  # the assistant is gone
        store.set_state(_key(assistant_id), {**state, "done": True})
        return
    text, rows = render(progress, lang)
    if text == state.get("text"):
        return
    try:
        await bot.edit_message_text(text, chat_id=state["chat_id"], message_id=state["message_id"],
                                    reply_markup=keyboard(rows) if rows else None)
    except BadRequest as exc:
        if "not modified" not in str(exc).lower():  # deleted, too old, not ours: stop trying
            log.debug("checklist of assistant %s cannot be edited (%s); forgetting it", assistant_id, exc)
            store.set_state(_key(assistant_id), {**state, "done": True})
            return
    except (Forbidden, TelegramError) as exc:  # blocked, network: the next action tries again
        log.debug("checklist of assistant %s not edited: %s", assistant_id, exc)
        return
    store.set_state(_key(assistant_id), {**state, "lang": lang, "text": text,
                                         "done": progress.next_step == "done"})


async def refresh_after_update(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """After every update (handler group 1): refresh the checklist of the assistant this user works on; its owner's
    updates also bring it into their current language."""
    if not isinstance(update, Update) or update.effective_user is None or context.user_data is None:
        return
    assistant_id = context.user_data.get("assistant_id")
    if assistant_id is None:
        return
    store = store_of(context)
    state = store.get_state(_key(assistant_id))
    if not state or state.get("done"):
        return
    mine = state.get("user_id") == update.effective_user.id
    await refresh_checklist(context.bot, store, assistant_id, lang=lang_of(update, context) if mine else None)
