"""Getting things out: /export (dataset and adapter), /apikey, /stats."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

from telegram import InputFile, Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import callback_args, reply, requires, store_of, tr, with_thread_store


@requires("expert")
async def export(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Choose the dataset format; the active adapter comes along."""
    await reply(update, tr(update, context, "export_choose"),
                buttons=[[("JSONL", "xp:jsonl"), ("OpenAI", "xp:openai")]])


def adapter_zip(folder: str | Path) -> bytes:
    """The adapter folder's files (not checkpoints) as a zip."""
    buf = io.BytesIO()
    folder = Path(folder)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "checkpoints" not in path.relative_to(folder).parts:
                zf.write(path, path.relative_to(folder))
    return buf.getvalue()


@requires("expert")
async def export_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Send the approved examples as a file, then the active adapter as a zip."""
    from tuning.importing import export_examples

    fmt = callback_args(update)[0]
    buf = io.StringIO()
    n = await with_thread_store(context, lambda store: export_examples(store, assistant.id, buf, format=fmt))
    name = f"{assistant.name}-{fmt}.jsonl"
    await update.effective_chat.send_document(InputFile(io.BytesIO(buf.getvalue().encode("utf-8")), filename=name),
                                              caption=tr(update, context, "export_dataset", n=n))
    if assistant.active_version_id:
        version = store_of(context).get_model_version(assistant.active_version_id)
        if Path(version.adapter_path).is_dir():
            data = await asyncio.to_thread(adapter_zip, version.adapter_path)
            await update.effective_chat.send_document(
                InputFile(io.BytesIO(data), filename=f"{assistant.name}-adapter-v{version.id}.zip"),
                caption=tr(update, context, "export_adapter", id=version.id, base=version.base_model))
            return
    await reply(update, tr(update, context, "export_no_adapter"))


@requires("owner")
async def apikey(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Create a key for the OpenAI-compatible API (shown once)."""
    name = " ".join(context.args or []) or f"telegram:{update.effective_user.id}"
    record, key = store_of(context).create_api_key(assistant.id, name=name, created_by=update.effective_user.id)
    await reply(update, tr(update, context, "apikey_created", api_key=key, prefix=record.prefix, model=assistant.name))


@requires("tester")
async def stats(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Counts of examples, versions, jobs and feedback."""
    store = store_of(context)
    counts = store.example_counts(assistant.id)
    versions = store.list_model_versions(assistant.id)
    feedback = store.feedback_counts(assistant.id)
    fmt = lambda d: ", ".join(f"{k}: {v}" for k, v in d.items()) or "—"  # noqa: E731
    await reply(update, tr(update, context, "stats", name=assistant.name, by_status=fmt(counts["status"]),
                           by_source=fmt(counts["source"]), by_split=fmt(counts["split"]), versions=len(versions),
                           active=assistant.active_version_id or "—",
                           jobs=len(store.list_jobs(assistant_id=assistant.id)),
                           up=feedback.get("up", 0), down=feedback.get("down", 0)))


def handlers() -> list:
    return [
        CommandHandler("export", export),
        CommandHandler("apikey", apikey),
        CommandHandler("stats", stats),
        CallbackQueryHandler(export_button, pattern=r"^xp:"),
    ]
