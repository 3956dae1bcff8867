"""Synthetic data in chat: /generate, documents to pairs, and /review cards."""

from __future__ import annotations

import importlib
import logging

from telegram import Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (app_of, awaiting, callback_args, reply, requires, short, store_of, tr,
                                 with_thread_store)
from storage import Store, StorageError
from storage.records import Example

log = logging.getLogger("tunebot.telegram")
COUNTS = (3, 5, 10)
TOKENS_PER_VARIATION = 120  # prompt share + completion, for the cost estimate shown before generating


def _review_module():
    """Helper C's tuning.review when it exists (None otherwise: the Store is used directly)."""
    try:
        return importlib.import_module("tuning.review")
    except ImportError:
        return None


# ------------------------------------------------------------------------ review actions
def pending_queue(store: Store, assistant_id: int, *, skipped: list[int], run_id: int | None = None) -> list[Example]:
    """Pending examples in review order, skipped ones last."""
    items = store.list_examples(assistant_id, status="pending", generation_run_id=run_id)
    return [e for e in items if e.id not in skipped] + [e for e in items if e.id in skipped]


def review_progress(store: Store, assistant_id: int, run_id: int | None) -> tuple[int, int]:
    review = _review_module()
    if review is not None and hasattr(review, "review_progress"):
        return review.review_progress(store, assistant_id, run_id)
    items = [e for e in store.list_examples(assistant_id, generation_run_id=run_id) if e.parent_id is not None
             or e.source in ("synthetic", "document", "feedback")]
    return sum(e.status != "pending" for e in items), len(items)


def apply_decision(store: Store, example_id: int, decision: str, *, by: int, text: str | None = None) -> None:
    review = _review_module()
    if decision == "approve":
        (review.approve_variation(store, example_id, by=by) if review else store.approve(example_id, by=by))
    elif decision == "reject":
        (review.reject_variation(store, example_id, by=by) if review else store.reject(example_id, by=by))
    elif decision == "edit":
        if review is not None and hasattr(review, "edit_variation"):
            review.edit_variation(store, example_id, question=text, by=by)
        else:
            store.edit_example(example_id, question=text, by=by)
            store.approve(example_id, by=by)


def approve_all(store: Store, run_id: int, *, by: int) -> int:
    review = _review_module()
    if review is not None:
        return review.approve_all_in_run(store, run_id, by=by)
    n = 0
    for ex in store.list_examples(store.get_generation_run(run_id).assistant_id, status="pending",
                                  generation_run_id=run_id):
        store.approve(ex.id, by=by)
        n += 1
    return n


async def _show_card(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, *, edit: bool) -> None:
    store = store_of(context)
    skipped = context.user_data.get("review_skip", [])
    queue = pending_queue(store, assistant.id, skipped=skipped)
    if not queue:
        context.user_data.pop("review_skip", None)
        await reply(update, tr(update, context, "review_done"), edit=edit)
        return
    ex = queue[0]
    done, total = review_progress(store, assistant.id, ex.generation_run_id)
    parent = None
    if ex.parent_id:
        try:
            parent = store.get_example(ex.parent_id)
        except StorageError:
            parent = None
    text = tr(update, context, "review_card", done=done, total=total, left=len(queue),
              source=short(parent.question, 300) if parent else "—", question=short(ex.question, 800),
              answer=short(ex.answer, 1200), method=ex.method or ex.source,
              score="—" if ex.judge_score is None else f"{ex.judge_score:.2f}")
    rows = [[("✅", f"rv:a:{ex.id}"), ("✏️", f"rv:e:{ex.id}"), ("❌", f"rv:r:{ex.id}"), ("⏭", f"rv:s:{ex.id}")]]
    if ex.generation_run_id:
        rows.append([(tr(update, context, "btn_approve_run"), f"rv:all:{ex.generation_run_id}")])
    await reply(update, text, buttons=rows, edit=edit)


@requires("expert")
async def review(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Show the next pending card."""
    await _show_card(update, context, assistant, edit=False)


@requires("expert")
async def review_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Approve, edit, reject, skip, or approve the whole run."""
    action, ref = callback_args(update)
    store = store_of(context)
    uid = update.effective_user.id
    try:
        if action == "all":
            n = approve_all(store, int(ref), by=uid)
            await reply(update, tr(update, context, "review_approved_all", n=n))
            await _show_card(update, context, assistant, edit=False)
            return
        ex = store.get_example(int(ref))
        if ex.assistant_id != assistant.id:
            await reply(update, tr(update, context, "not_member"))
            return
        if action == "e":
            awaiting(context, "edit_variation", example_id=ex.id)
            await reply(update, tr(update, context, "review_edit_ask", question=ex.question))
            return
        if action == "s":
            context.user_data.setdefault("review_skip", []).append(ex.id)
        elif ex.status == "pending":
            apply_decision(store, ex.id, "approve" if action == "a" else "reject", by=uid)
    except StorageError as exc:
        await reply(update, tr(update, context, "error_user", reason=str(exc)))
        return
    await _show_card(update, context, assistant, edit=True)


async def edit_variation_text(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: dict) -> None:
    """The corrected question of a variation: saved and approved."""
    store = store_of(context)
    ex = store.get_example(pending["example_id"])
    if store.role_of(ex.assistant_id, update.effective_user.id) not in ("owner", "expert"):
        await reply(update, tr(update, context, "not_member"))
        return
    try:
        apply_decision(store, ex.id, "edit", by=update.effective_user.id, text=update.message.text)
    except StorageError as exc:
        await reply(update, tr(update, context, "error_user", reason=str(exc)))
        return
    await reply(update, tr(update, context, "review_edited", id=ex.id))
    await _show_card(update, context, store.get_assistant(ex.assistant_id), edit=False)


# ---------------------------------------------------------------------------- /generate
@requires("expert")
async def generate(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Choose a method and a count; each button shows the estimated cost."""
    settings = app_of(context).settings
    roots = len(store_of(context).list_examples(assistant.id, status="approved", roots_only=True))
    if not roots:
        await reply(update, tr(update, context, "generate_no_examples"))
        return
    rows = [[(tr(update, context, "btn_mutate", n=n, total=n * roots), f"gen:m:{n}") for n in COUNTS]]
    has_llm = bool(settings.openai_api_key or settings.openai_base_url)
    if has_llm:
        rows.append([(tr(update, context, "btn_paraphrase", n=n,
                         cost=f"{n * roots * TOKENS_PER_VARIATION / 1000 * settings.price_per_1k_tokens:.3f}"),
                      f"gen:p:{n}") for n in COUNTS])
    await reply(update, tr(update, context, "generate_choose", roots=roots, model=settings.generator_model
                           if has_llm else tr(update, context, "generate_no_llm")), buttons=rows)


@requires("expert")
async def generate_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Run the chosen generation, then offer the review."""
    method, count = callback_args(update)
    count = int(count)
    uid = update.effective_user.id
    await reply(update, tr(update, context, "generate_started"), edit=True)
    if method == "m":
        from tuning.mutate import mutate_assistant

        run = await with_thread_store(context, lambda s: mutate_assistant(s, assistant.id, per_example=count,
                                                                          author_id=uid))
    else:
        run = await _llm_generate(context, assistant.id, count)
    await reply(update, tr(update, context, "generate_done", kept=run.kept, requested=run.requested,
                           cost=f"{run.cost_usd:.4f}"), buttons=[[(tr(update, context, "btn_review"), "rvgo:")]])


async def _llm_generate(context: ContextTypes.DEFAULT_TYPE, assistant_id: int, count: int):
    from tuning.synthetic import generate as llm_generate

    settings = app_of(context).settings
    config = {"api_key": settings.openai_api_key, "base_url": settings.openai_base_url or None,
              "model": settings.generator_model, "concurrency": settings.generator_concurrency,
              "max_requests": settings.generator_max_requests, "max_tokens": settings.generator_max_tokens,
              "timeout_s": settings.generator_timeout_s, "price_per_1k_tokens": settings.price_per_1k_tokens}
    return await llm_generate(store_of(context), assistant_id, method="paraphrase", per_example=count,
                              client_config=config)


@requires("expert")
async def review_go(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """'Review now' under a generation report."""
    await _show_card(update, context, assistant, edit=False)


async def document_to_pairs(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, filename: str,
                            data: bytes) -> None:
    """Extract the document's text, store it, and queue pairs from it for review."""
    settings = app_of(context).settings
    documents = importlib.import_module("tuning.documents")
    text = documents.extract_text(filename, data, max_bytes=int(settings.max_upload_mb * 1024 * 1024))
    doc = store_of(context).add_document(assistant.id, filename, text, uploaded_by=update.effective_user.id)
    make_pairs = getattr(documents, "pairs_from_document", None)
    if make_pairs is None:
        await reply(update, tr(update, context, "document_stored", name=filename, chars=len(text)))
        return
    run = await make_pairs(store_of(context), assistant.id, doc.id, client_config={
        "api_key": settings.openai_api_key, "base_url": settings.openai_base_url or None,
        "model": settings.generator_model})
    await reply(update, tr(update, context, "document_pairs", name=filename, n=run.kept),
                buttons=[[(tr(update, context, "btn_review"), "rvgo:")]])


def handlers() -> list:
    return [
        CommandHandler("review", review),
        CommandHandler("generate", generate),
        CallbackQueryHandler(review_button, pattern=r"^rv:"),
        CallbackQueryHandler(generate_button, pattern=r"^gen:"),
        CallbackQueryHandler(review_go, pattern=r"^rvgo:"),
    ]
