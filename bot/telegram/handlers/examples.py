"""Collecting examples: guided /add, the quick form, forwards, file uploads, and the /examples pager."""

from __future__ import annotations

import re

from telegram import Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes, ConversationHandler, MessageHandler, filters

from bot.telegram.common import (ID, app_of, awaiting, button_invalid, button_object, callback_match, can_edit,
                                 lang_of, reply, requires, short, store_of, tr, tr_error, with_thread_store)
from bot.telegram.handlers.generate import document_uploaded
from bot.telegram.texts import label
from storage import DuplicateExample, StorageError
from tuning.data.quickform import parse_quick_form

ADD_QUESTION, ADD_ANSWER, ADD_CONFIRM = range(3)
PAGE = 5
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf", ".docx")
# Callback data is untrusted: only these shapes are accepted (fullmatch).
ADD_BUTTON = re.compile(r"add:(save|q|a|cancel)")
PAGE_BUTTON = re.compile(r"ex:p:([0-9]{1,9})")
EXAMPLE_BUTTON = re.compile(rf"ex:([ed]):(?P<id>{ID}):([0-9]{{1,9}})")  # edit or delete, example, page to come back to


def save_example(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int, question: str,
                 answer: str, *, source: str = "expert", echo: bool = False) -> str:
    """Store one approved example from an expert; the reply text (saved or duplicate; with echo, a saved one
    shows the question and answer as they were stored)."""
    try:
        ex = store_of(context).add_example(assistant_id, question, answer, source=source, status="approved",
                                           author_id=update.effective_user.id)
    except DuplicateExample as exc:
        return tr(update, context, "example_duplicate", id=exc.existing_id, question=short(exc.question, 80))
    except StorageError as exc:
        return tr_error(update, context, exc)
    total = store_of(context).count_examples(assistant_id, status="approved")
    text = tr(update, context, "example_saved", id=ex.id, total=total)
    if echo:  # so a wrong split of the quick form is seen at once (and fixed with /examples)
        text += "\n" + tr(update, context, "quick_form_saved_as", question=short(question, 300),
                          answer=short(answer, 300))
    return text


# ------------------------------------------------------------------ guided /add
@requires("expert")
async def add_start(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> int:
    """Ask for the question."""
    context.user_data["draft"] = {"assistant_id": assistant.id}
    await reply(update, tr(update, context, "add_ask_question", name=assistant.name))
    return ADD_QUESTION


async def add_question(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Take the question, ask for the answer."""
    context.user_data.setdefault("draft", {})["question"] = update.message.text.strip()
    await reply(update, tr(update, context, "add_ask_answer"))
    return ADD_ANSWER


async def add_answer(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Take the answer, show both for confirmation."""
    draft = context.user_data.setdefault("draft", {})
    draft["answer"] = update.message.text.strip()
    await reply(update, tr(update, context, "add_confirm", question=draft.get("question", ""), answer=draft["answer"]),
                buttons=[[(tr(update, context, "btn_save"), "add:save")],
                         [(tr(update, context, "btn_edit_question"), "add:q"),
                          (tr(update, context, "btn_edit_answer"), "add:a")],
                         [(tr(update, context, "btn_cancel"), "add:cancel")]])
    return ADD_CONFIRM


async def add_confirm(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Save, go back to edit one part, or cancel."""
    await update.callback_query.answer()
    match = callback_match(update, ADD_BUTTON)
    if match is None:
        await button_invalid(update, context)
        return ADD_CONFIRM
    choice = match.group(1)
    draft = context.user_data.get("draft") or {}
    if choice == "q":
        await reply(update, tr(update, context, "add_ask_question_again"), edit=True)
        draft.pop("answer", None)
        return ADD_QUESTION
    if choice == "a":
        await reply(update, tr(update, context, "add_ask_answer"), edit=True)
        return ADD_ANSWER
    context.user_data.pop("draft", None)
    if choice == "cancel" or "answer" not in draft:
        await reply(update, tr(update, context, "cancelled"), edit=True)
        return ConversationHandler.END
    store = store_of(context)
    if not can_edit(store, draft["assistant_id"], update.effective_user.id):
        await reply(update, tr(update, context, "not_member"), edit=True)
        return ConversationHandler.END
    text = save_example(update, context, draft["assistant_id"], draft["question"], draft["answer"])
    await reply(update, text + "\n" + tr(update, context, "add_more"), edit=True)
    return ConversationHandler.END


async def add_cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Leave /add without saving."""
    context.user_data.pop("draft", None)
    await reply(update, tr(update, context, "cancelled"))
    return ConversationHandler.END


def add_conversation() -> ConversationHandler:
    text = filters.TEXT & ~filters.COMMAND
    return ConversationHandler(
        entry_points=[CommandHandler("add", add_start),
                      CallbackQueryHandler(add_start, pattern=r"^fr:add$")],  # the first-run checklist's ➕
        states={ADD_QUESTION: [MessageHandler(text, add_question)],
                ADD_ANSWER: [MessageHandler(text, add_answer)],
                ADD_CONFIRM: [CallbackQueryHandler(add_confirm, pattern=r"^add:")]},
        fallbacks=[CommandHandler("cancel", add_cancel)],
        name="add_example", persistent=True, allow_reentry=True,
    )


# ------------------------------------------------------------ quick form, forwards
@requires("expert")
async def quick_form(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """'Q: … A: …' in one message."""
    question, answer = parse_quick_form(update.message.text)
    await reply(update, save_example(update, context, assistant.id, question, answer, echo=True))


@requires("expert")
async def forwarded(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """A forwarded customer message becomes a question; the next text is its answer."""
    question = (update.message.text or update.message.caption or "").strip()
    if not question:
        await reply(update, tr(update, context, "forward_empty"))
        return
    awaiting(context, "forward_answer", assistant_id=assistant.id, question=question)
    await reply(update, tr(update, context, "forward_ask_answer", question=short(question, 200)))


async def forward_answer(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The answer to a forwarded question."""
    if not can_edit(store_of(context), pending["assistant_id"], update.effective_user.id):
        await reply(update, tr(update, context, "not_member"))
        return
    await reply(update, save_example(update, context, pending["assistant_id"], pending["question"],
                                     update.message.text))


# ------------------------------------------------------------------ uploads
@requires("expert")
async def upload(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """A JSONL/CSV file is imported; a txt/md/pdf/docx document becomes pairs for review."""
    doc = update.message.document
    settings = app_of(context).settings
    limit_bytes = int(settings.max_upload_mb * 1024 * 1024)
    if doc.file_size and doc.file_size > limit_bytes:
        await reply(update, tr(update, context, "upload_too_big", limit=f"{settings.max_upload_mb:g}"))
        return
    name = (doc.file_name or "upload").lower()
    if not name.endswith(TABLE_SUFFIXES + DOCUMENT_SUFFIXES):
        await reply(update, tr(update, context, "upload_unknown_type"))
        return
    data = bytes(await (await doc.get_file()).download_as_bytearray())
    if len(data) > limit_bytes:
        await reply(update, tr(update, context, "upload_too_big", limit=f"{settings.max_upload_mb:g}"))
        return
    if name.endswith(TABLE_SUFFIXES):
        from bot.telegram.import_report import import_summary
        from tuning.data.importing import import_file

        uid = update.effective_user.id
        report = await with_thread_store(context, lambda store: import_file(
            store, assistant.id, data, filename=doc.file_name, approve=True, author_id=uid,
            max_field_chars=settings.max_field_chars))
        await reply(update, import_summary(report, lang_of(update, context)))
        return
    await document_uploaded(update, context, assistant, doc.file_name, data)


# ------------------------------------------------------------------ /examples pager
def _page_view(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant_id: int, page: int):
    store = store_of(context)
    total = store.count_examples(assistant_id)
    pages = max(1, (total + PAGE - 1) // PAGE)
    page = min(max(page, 0), pages - 1)
    items = store.list_examples(assistant_id, limit=PAGE, offset=page * PAGE)
    if not items:
        return tr(update, context, "examples_empty"), None
    lines = [tr(update, context, "examples_header", page=page + 1, pages=pages, total=total)]
    lang = lang_of(update, context)
    rows = []
    for ex in items:
        lines.append(tr(update, context, "examples_item", id=ex.id, status=label(lang, "status", ex.status),
                        source=label(lang, "source", ex.source), question=short(ex.question, 200),
                        answer=short(ex.answer, 300)))
        rows.append([(f"✏️ #{ex.id}", f"ex:e:{ex.id}:{page}"), (f"🗑 #{ex.id}", f"ex:d:{ex.id}:{page}")])
    nav = []
    if page > 0:
        nav.append(("◀️", f"ex:p:{page - 1}"))
    if page < pages - 1:
        nav.append(("▶️", f"ex:p:{page + 1}"))
    if nav:
        rows.append(nav)
    return "\n".join(lines), rows


@requires("expert")
async def examples(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Page through the examples."""
    text, rows = _page_view(update, context, assistant.id, 0)
    await reply(update, text, buttons=rows)


@requires("expert")
async def examples_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Page, edit or delete."""
    store = store_of(context)
    if page_match := callback_match(update, PAGE_BUTTON):
        text, rows = _page_view(update, context, assistant.id, int(page_match.group(1)))
        await reply(update, text, buttons=rows, edit=True)
        return
    match, ex = button_object(update, EXAMPLE_BUTTON, store.get_example, assistant_id=assistant.id)
    if ex is None:
        await button_invalid(update, context)
        return
    action, example_id, page = match.group(1), ex.id, int(match.group(3))
    if action == "d":
        store.delete_example(example_id, by=update.effective_user.id)
        text, rows = _page_view(update, context, assistant.id, page)
        await reply(update, tr(update, context, "example_deleted", id=example_id) + "\n\n" + text, buttons=rows, edit=True)
    else:
        awaiting(context, "edit_example", example_id=example_id)
        await reply(update, tr(update, context, "example_edit_ask", id=example_id, question=ex.question, answer=ex.answer))


async def edit_example_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The new text of an example: 'Q: … A: …' changes both, plain text changes the answer."""
    store = store_of(context)
    ex = store.get_example(pending["example_id"])
    if not can_edit(store, ex.assistant_id, update.effective_user.id):
        await reply(update, tr(update, context, "not_member"))
        return
    pair = parse_quick_form(update.message.text)
    question, answer = pair if pair else (None, update.message.text)
    try:
        store.edit_example(ex.id, question=question, answer=answer, by=update.effective_user.id)
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))
        return
    await reply(update, tr(update, context, "example_edited", id=ex.id))


def handlers() -> list:
    return [
        add_conversation(),
        CommandHandler("examples", examples),
        CallbackQueryHandler(examples_button, pattern=r"^ex:"),
    ]
