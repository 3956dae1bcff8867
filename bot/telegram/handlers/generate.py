"""Synthetic data from chat: /generate (local mutations, paraphrases, new pairs) and pairs from uploaded documents.

Generation runs on a worker thread with its own database connection and event loop, as an application task:
the bot keeps answering everyone while it runs, and one message shows its progress, edited at a bounded rate.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from telegram import Message, Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.app import client_config, endpoint_configured
from bot.telegram.common import (ID, app_of, button_invalid, button_object, callback_match, error_reason, keyboard,
                                 lang_of, reply, requires, short, store_of, tr, with_thread_store)
from bot.telegram.texts import label, t
from storage import StorageError
from tuning.errors import TuningError

log = logging.getLogger("tunebot.telegram")
COUNTS = (3, 5, 10)
NEW_COUNTS = (3, 5)
PAIRS_PER_CHUNK = 3
DOCUMENT_BUTTONS = 3
EDIT_EVERY_S = 3.0
METHOD_CODES = {"m": "mutate", "p": "paraphrase", "n": "new", "d": "document"}
# Callback data is untrusted: only the counts the buttons offer (a huge one made mutate() loop for hours).
COUNT_BUTTON = re.compile(rf"gen:([mp]):({'|'.join(map(str, COUNTS))})|gen:n:({'|'.join(map(str, NEW_COUNTS))})")
DOCUMENT_BUTTON = re.compile(rf"gen:d:(?P<id>{ID})")


# ----------------------------------------------------------------------------- estimates
def estimate_cost(settings, tokens: int) -> str:
    return f"{tokens / 1000 * settings.price_per_1k_tokens:.4f}"


# ----------------------------------------------------------------------------- /generate
@requires("expert")
async def generate(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Choose a method and a count; each button of the larger model shows the estimated cost."""
    settings = app_of(context).settings
    store = store_of(context)
    roots = len(store.list_examples(assistant.id, status="approved", roots_only=True))
    documents = store.list_documents(assistant.id, limit=DOCUMENT_BUTTONS)
    if not roots and not documents:
        await reply(update, tr(update, context, "generate_no_examples"))
        return
    rows = []
    if roots:
        rows.append([(tr(update, context, "btn_mutate", n=n, total=n * roots), f"gen:m:{n}") for n in COUNTS])
    configured = endpoint_configured(settings)
    if configured:
        judge = settings.generator_judge

        def cost(method: str, n: int, document_id: int | None = None) -> str:
            from tuning.data.synthetic_prompts import estimate_tokens

            return estimate_cost(settings, estimate_tokens(store, assistant.id, method=method, per_example=n,
                                                           document_id=document_id, judge=judge))

        if roots:
            rows.append([(tr(update, context, "btn_paraphrase", n=n, cost=cost("paraphrase", n)), f"gen:p:{n}")
                         for n in COUNTS])
            rows.append([(tr(update, context, "btn_new_pairs", n=n, cost=cost("new", n)), f"gen:n:{n}")
                         for n in NEW_COUNTS])
        for doc in documents:
            rows.append([(tr(update, context, "btn_document_pairs", name=short(doc.filename, 24),
                             cost=cost("document", PAIRS_PER_CHUNK, doc.id)), f"gen:d:{doc.id}")])
    if not rows:  # documents only, and no larger model to read them
        await reply(update, tr(update, context, "generate_needs_llm"))
        return
    model = settings.generator_model if configured else tr(update, context, "generate_no_llm")
    await reply(update, tr(update, context, "generate_choose", roots=roots, model=model), buttons=rows)


@requires("expert")
async def generate_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Start the chosen generation in the background; its message shows progress, then the result."""
    document_id = None
    if count := callback_match(update, COUNT_BUTTON):
        method = METHOD_CODES[count.group(1) or "n"]
        per_example = int(count.group(2) or count.group(3))
    elif doc := button_object(update, DOCUMENT_BUTTON, store_of(context).get_document, assistant_id=assistant.id)[1]:
        method, per_example, document_id = "document", PAIRS_PER_CHUNK, doc.id
    else:
        await button_invalid(update, context)
        return
    if method != "mutate" and not endpoint_configured(app_of(context).settings):
        await reply(update, tr(update, context, "generate_needs_llm"))
        return
    status = await reply(update, tr(update, context, "generate_started"), edit=True)
    start_generation(update, context, status, assistant_id=assistant.id, method=method, per_example=per_example,
                     document_id=document_id)


def start_generation(update: Update, context: ContextTypes.DEFAULT_TYPE, status: Message | bool | None, *,
                     assistant_id: int, method: str, per_example: int, document_id: int | None = None,
                     title: str | None = None) -> None:
    """Run a generation as an application task (errors other than domain ones reach the global handler)."""
    chat_id = update.effective_chat.id
    message_id = status.message_id if isinstance(status, Message) else None
    context.application.create_task(
        _generation_task(context, chat_id=chat_id, message_id=message_id, lang=lang_of(update, context),
                         assistant_id=assistant_id, method=method, per_example=per_example,
                         document_id=document_id, user_id=update.effective_user.id, title=title),
        update=update, name=f"generate-{method}-{assistant_id}")


def _run_blocking(settings, store, *, assistant_id: int, method: str, per_example: int, document_id: int | None,
                  user_id: int, on_progress, should_stop=None):
    """One generation run, on a worker thread: the services of tuning, called as the CLI calls them."""
    if method == "mutate":
        from tuning.data.mutate import mutate_assistant

        return mutate_assistant(store, assistant_id, per_example=per_example, author_id=user_id,
                                on_progress=on_progress)
    from tuning.data.synthetic import Budget, generate as llm_generate

    return asyncio.run(llm_generate(
        store, assistant_id, method=method, per_example=per_example, client_config=client_config(settings),
        budget=Budget(max_requests=settings.generator_max_requests, max_tokens=settings.generator_max_tokens),
        on_progress=on_progress, judge=settings.generator_judge,
        auto_approve_above=settings.judge_auto_approve, document_id=document_id, author_id=user_id,
        max_chars=settings.max_field_chars, should_stop=should_stop))


async def _generation_task(context: ContextTypes.DEFAULT_TYPE, *, chat_id: int, message_id: int | None, lang: str,
                           assistant_id: int, method: str, per_example: int, document_id: int | None, user_id: int,
                           title: str | None) -> None:
    settings = app_of(context).settings
    loop = asyncio.get_running_loop()
    latest: dict = {}

    def on_progress(info: dict) -> None:  # called on the worker thread
        loop.call_soon_threadsafe(latest.update, dict(info))

    async def show(text: str, buttons=None) -> None:
        nonlocal message_id
        markup = keyboard(buttons) if buttons else None
        if message_id is not None:
            try:
                await context.bot.edit_message_text(text, chat_id=chat_id, message_id=message_id, reply_markup=markup)
                return
            except Exception as exc:  # deleted or unchanged: a new message carries the news
                log.debug("generation progress edit failed: %s", exc)
        sent = await context.bot.send_message(chat_id, text, reply_markup=markup)
        message_id = sent.message_id

    work = asyncio.ensure_future(with_thread_store(context, lambda store: _run_blocking(
        settings, store, assistant_id=assistant_id, method=method, per_example=per_example,
        document_id=document_id, user_id=user_id, on_progress=on_progress,
        should_stop=context.bot_data["stopping"].is_set if "stopping" in context.bot_data else None)))
    shown, last_edit = None, time.monotonic()
    while not work.done():
        await asyncio.wait({work}, timeout=EDIT_EVERY_S)
        if latest and not work.done() and time.monotonic() - last_edit >= EDIT_EVERY_S:
            text = t(lang, "generate_progress", done=latest.get("done", 0), total=latest.get("total", 0),
                     kept=latest.get("kept", 0))
            if text != shown:
                await show((title + "\n" if title else "") + text)
                shown, last_edit = text, time.monotonic()
    try:
        run = work.result()
    except (TuningError, StorageError) as exc:
        await show(t(lang, "generate_failed", reason=error_reason(exc, lang)))
        return
    tokens = run.prompt_tokens + run.completion_tokens
    key = "generate_done_document" if method == "document" else "generate_done"
    if not tokens and not run.cost_usd and method != "document":  # local mutations: nothing spent, nothing to say
        key = "generate_done_free"
    text = t(lang, key, kept=run.kept, requested=run.requested, cost=f"{run.cost_usd:.4f}", tokens=tokens,
             requests=run.requests)
    if run.status != "succeeded":
        text += "\n\n" + t(lang, "generate_stopped", status=label(lang, "runstate", run.status),
                              error=short(run.error or "", 600))
    pending = len(store_of(context).list_examples(assistant_id, status="pending", generation_run_id=run.id))
    buttons = [[(t(lang, "btn_review"), f"rvgo:{run.id}")]] if pending else None
    await show((title + "\n" if title else "") + text, buttons)


# ----------------------------------------------------------------------------- documents
async def document_uploaded(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, filename: str,
                            data: bytes) -> None:
    """Store the document's text; extract pairs for review with the larger model, or say how to enable that."""
    from tuning.data.documents import chunk_spans, import_document

    settings = app_of(context).settings
    uid = update.effective_user.id

    def store_it(store):
        doc = import_document(store, assistant.id, filename, data, uploaded_by=uid,
                              max_bytes=int(settings.max_upload_mb * 1024 * 1024))
        return doc, len(chunk_spans(doc.text))

    doc, chunks = await with_thread_store(context, store_it)
    if not endpoint_configured(settings):
        await reply(update, tr(update, context, "document_needs_llm", name=doc.filename, id=doc.id,
                               chars=len(doc.text)))
        return
    title = tr(update, context, "document_read", name=doc.filename, chars=len(doc.text), chunks=chunks)
    status = await reply(update, title + "\n" + tr(update, context, "generate_started"))
    start_generation(update, context, status, assistant_id=assistant.id, method="document",
                     per_example=PAIRS_PER_CHUNK, document_id=doc.id, title=title)


def handlers() -> list:
    return [
        CommandHandler("generate", generate),
        CallbackQueryHandler(generate_button, pattern=r"^gen:"),
    ]
