"""Trying the model: /chat with streamed answers and feedback, /compare side by side."""

from __future__ import annotations

import asyncio
import logging
import re

from telegram import Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, app_of, awaiting, button_invalid, callback_match, keyboard, reply,
                                 requires, role_at_least, short, store_of, tr, tr_error, with_thread_store)
from bot.telegram.streaming import AnswerStream
from storage import DuplicateExample, NotFound, StorageError

log = logging.getLogger("tunebot.telegram")
MAX_SOURCES = 20  # listed under 📚; retrieval gives far fewer
# Callback data is untrusted: only these shapes are accepted (fullmatch).
FEEDBACK_BUTTON = re.compile(rf"fb:([ude]):({ID})")
SOURCES_BUTTON = re.compile(rf"src:({ID})")


def engine_for(context: ContextTypes.DEFAULT_TYPE, base_model: str):
    """The shared inference engine of this base model (built once by the composition root)."""
    return app_of(context).engine_for(base_model)


@requires("tester")
async def chat(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Enter chat mode; the header names what answers: the active version, else few-shot from the examples."""
    context.user_data["chat"] = {"assistant_id": assistant.id, "mode": "tuned"}
    store = store_of(context)
    if assistant.active_version_id:
        version = store.get_model_version(assistant.active_version_id)
        mode = "grounded" if (version.hyperparameters or {}).get("recipe") == "grounded" else "tuned"
        await reply(update, tr(update, context, "chat_started_active", name=assistant.name, id=version.id,
                               mode=tr(update, context, f"mode_{mode}")))
        return
    key = "chat_started_fewshot" if store.count_examples(assistant.id, status="approved") else "chat_started_base"
    await reply(update, tr(update, context, key, name=assistant.name))


async def stop(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Leave chat mode."""
    context.user_data.pop("chat", None)
    awaiting(context, None)
    await reply(update, tr(update, context, "chat_stopped"))


async def stream_answer(update: Update, context: ContextTypes.DEFAULT_TYPE, session: dict) -> None:
    """Answer one question in chat mode: generation runs off the event loop; the reply is edited as it grows."""
    from tuning.answering.service import answer_question

    store = store_of(context)
    assistant = store.get_assistant(session["assistant_id"])
    role = store.role_of(assistant.id, update.effective_user.id)
    if role is None:
        context.user_data.pop("chat", None)
        await reply(update, tr(update, context, "not_member"))
        return
    question = update.message.text
    base_model = assistant.base_model or app_of(context).settings.base_model
    ready = app_of(context).engine_ready(base_model)  # else the answer waits for the model to load: say so
    engine = engine_for(context, base_model)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    mode = session.get("mode", "tuned")
    mode = "auto" if mode == "tuned" else mode
    user_id, conv_id = update.effective_user.id, session.get("conversation_id")
    abstain_text = tr(update, context, "chat_abstain")
    app = app_of(context)

    def produce(thread_store):
        try:
            return answer_question(thread_store, engine, assistant.id, question, mode=mode,
                                   version_id=session.get("version_id"), user_id=user_id, conversation_id=conv_id,
                                   abstain_text=abstain_text, indexes=app.indexes,  # built off the loop
                                   on_piece=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, None)

    await update.effective_chat.send_action("typing")
    producer = asyncio.create_task(with_thread_store(context, produce))
    stream = AnswerStream(context.bot, update.effective_chat, context.bot_data, drafts=app.settings.telegram_drafts,
                          draft_id=update.message.message_id,
                          placeholder="…" if ready else tr(update, context, "chat_loading_model"))
    await stream.start()
    text = ""
    while (piece := await pieces.get()) is not None:
        text += piece
        await stream.grow(text)
    answer = await producer  # raises what the generation raised; the error handler reports it
    session["conversation_id"] = answer.conversation_id
    rows = answer_buttons(answer, expert=role_at_least(role, "expert"))
    abstained = getattr(answer, "abstained", False)
    final = answer.text or tr(update, context, "chat_abstain" if abstained else "chat_empty_answer")
    await stream.finish(final, keyboard(rows) if rows else None)


def answer_buttons(answer, *, expert: bool) -> list[list[tuple[str, str]]]:
    """👍 👎 ✏️ under an answer (not when it abstained), and 📚 for owners and experts when it drew on examples."""
    mid = answer.message_id
    row = [] if getattr(answer, "abstained", False) else [("👍", f"fb:u:{mid}"), ("👎", f"fb:d:{mid}"),
                                                          ("✏️", f"fb:e:{mid}")]
    if expert and getattr(answer, "sources", ()) and mid is not None:
        row.append(("📚", f"src:{mid}"))
    return [row] if row else []


@requires("tester")
async def feedback_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """👍, 👎 (then ask for the right answer), or ✏️ on this assistant's answer (testers: on their own only)."""
    match = callback_match(update, FEEDBACK_BUTTON)
    store = store_of(context)
    if match is None or store.message_assistant(int(match.group(2))) != assistant.id or (
            role == "tester" and store.message_user(int(match.group(2))) != update.effective_user.id):
        await button_invalid(update, context)
        return
    action, msg = match.group(1), store.get_message(int(match.group(2)))
    if action == "u":
        store.set_feedback(msg["id"], "up")
        await reply(update, tr(update, context, "feedback_thanks"))
        return
    store.set_feedback(msg["id"], "down")
    awaiting(context, "correction", message_id=msg["id"], assistant_id=assistant.id)
    await reply(update, tr(update, context, "feedback_ask_correction"))


async def correction_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The right answer after 👎/✏️: a pending example from feedback, linked to the message."""
    store = store_of(context)
    if store.role_of(pending["assistant_id"], update.effective_user.id) is None:
        await reply(update, tr(update, context, "not_member"))
        return
    if store.message_assistant(pending["message_id"]) != pending["assistant_id"]:
        await button_invalid(update, context)
        return
    answer_msg = store.get_message(pending["message_id"])
    question = store.question_before(answer_msg["id"]) or ""
    correction = update.message.text.strip()
    try:
        ex = store.add_example(pending["assistant_id"], question, correction, source="feedback", status="pending",
                               author_id=update.effective_user.id)
        ex_id = ex.id
    except DuplicateExample as exc:
        ex = store.add_example(pending["assistant_id"], question, correction, source="feedback", status="pending",
                               author_id=update.effective_user.id, allow_duplicate=True)
        ex_id = ex.id
        log.info("correction for a question that exists as #%s", exc.existing_id)
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    store.set_feedback(answer_msg["id"], "down", correction=correction, correction_example_id=ex_id)
    await reply(update, tr(update, context, "feedback_correction_saved", id=ex_id))


@requires("expert")
async def sources_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """📚: the examples an answer drew on, each with its ✏️ edit button."""
    match = callback_match(update, SOURCES_BUTTON)
    store = store_of(context)
    if match is None or store.message_assistant(int(match.group(1))) != assistant.id:
        await button_invalid(update, context)
        return
    ids = store.message_sources(int(match.group(1)))[:MAX_SOURCES]
    if not ids:
        await reply(update, tr(update, context, "chat_sources_none"))
        return
    lines, rows = [tr(update, context, "chat_sources_header")], []
    gone = tr(update, context, "chat_source_deleted")
    for example_id in ids:
        try:
            ex = store.get_example(example_id)
        except NotFound:
            ex = None
        if ex is None or ex.assistant_id != assistant.id:
            lines.append(f"#{example_id} — {gone}")
            continue
        lines.append(f"#{ex.id} — {short(ex.question, 150)}")
        rows.append([(f"✏️ #{ex.id}", f"ex:e:{ex.id}:0")])  # the /examples edit flow
    await reply(update, "\n".join(lines), buttons=rows or None)


@requires("tester")
async def compare(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """/compare QUESTION: base, few-shot and tuned answers side by side."""
    question = " ".join(context.args or []).strip()
    if not question:
        await reply(update, tr(update, context, "compare_usage"))
        return
    from tuning.answering.service import compare_answers

    engine = engine_for(context, assistant.base_model or app_of(context).settings.base_model)
    await update.effective_chat.send_action("typing")
    uid = update.effective_user.id
    answers = await with_thread_store(context, lambda s: compare_answers(s, engine, assistant.id, question,
                                                                         user_id=uid, record=False,
                                                                         indexes=app_of(context).indexes))
    parts = [f"— {tr(update, context, 'mode_' + a.mode)} ({a.latency_ms:.0f} ms):\n{short(a.text, 1200)}"
             for a in answers]
    if not assistant.active_version_id:
        parts.append(tr(update, context, "compare_no_tuned"))
    await reply(update, "\n\n".join(parts))


def handlers() -> list:
    return [
        CommandHandler("chat", chat),
        CommandHandler("stop", stop),
        CommandHandler("compare", compare),
        CallbackQueryHandler(feedback_button, pattern=r"^fb:"),
        CallbackQueryHandler(sources_button, pattern=r"^src:"),
    ]
