"""Getting things out: /export (dataset and adapter), /apikey and /apikeys, /stats."""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from pathlib import Path

from telegram import InputFile, Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, button_invalid, callback_match, lang_of, private_only, reply, requires, store_of,
                                 tr, with_thread_store)
from bot.telegram.texts import labelled_counts

EXPORT_FORMATS = ("jsonl", "openai")
# Callback data is untrusted: only these shapes are accepted (fullmatch).
EXPORT_BUTTON = re.compile(rf"xp:({'|'.join(EXPORT_FORMATS)})")
REVOKE_BUTTON = re.compile(rf"ak:({ID}):({ID})")  # assistant, key


@private_only
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


@private_only
@requires("expert")
async def export_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Send the approved examples as a file, then the active adapter as a zip."""
    from tuning.importing import export_examples

    match = callback_match(update, EXPORT_BUTTON)
    if match is None:
        await button_invalid(update, context)
        return
    fmt = match.group(1)
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


@private_only
@requires("owner")
async def apikey(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Create a key for the OpenAI-compatible API (shown once)."""
    name = " ".join(context.args or []) or f"telegram:{update.effective_user.id}"
    record, key = store_of(context).create_api_key(assistant.id, name=name, created_by=update.effective_user.id)
    await reply(update, tr(update, context, "apikey_created", api_key=key, prefix=record.prefix, model=assistant.name))


@private_only
@requires("owner")
async def apikeys(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """The assistant's API keys (prefix, name, last use) with a revoke button for each live one."""
    keys = store_of(context).list_api_keys(assistant.id)
    if not keys:
        await reply(update, tr(update, context, "apikeys_none", name=assistant.name))
        return
    never = tr(update, context, "apikey_never_used")
    lines = [tr(update, context, "apikeys_header", name=assistant.name)]
    rows = []
    for k in keys:
        state = (tr(update, context, "apikey_state_revoked", when=k.revoked_at) if k.revoked_at
                 else tr(update, context, "apikey_state_live", when=k.last_used_at or never))
        lines.append(f"• {k.prefix}… {k.name or ''} — {state}")
        if not k.revoked_at:
            rows.append([(tr(update, context, "btn_revoke_key", prefix=k.prefix), f"ak:{assistant.id}:{k.id}")])
    await reply(update, "\n".join(lines), buttons=rows or None)


@private_only
@requires("owner")
async def revoke_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Revoke one of this assistant's API keys: requests with it get 401 from then on."""
    match = callback_match(update, REVOKE_BUTTON)
    store = store_of(context)
    key = None
    if match is not None and int(match.group(1)) == assistant.id:
        key = next((k for k in store.list_api_keys(assistant.id) if k.id == int(match.group(2))), None)
    if key is None:
        await button_invalid(update, context)
        return
    revoked = store.revoke_api_key(key.id, by=update.effective_user.id)
    await reply(update, tr(update, context, "apikey_revoked" if revoked else "apikey_already_revoked",
                           prefix=key.prefix))


@requires("tester")
async def stats(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Counts of examples, versions, jobs and feedback."""
    store = store_of(context)
    counts = store.example_counts(assistant.id)
    versions = store.list_model_versions(assistant.id)
    feedback = store.feedback_counts(assistant.id)
    lang = lang_of(update, context)
    await reply(update, tr(update, context, "stats", name=assistant.name,
                           by_status=labelled_counts(lang, "status", counts["status"]),
                           by_source=labelled_counts(lang, "source", counts["source"]),
                           by_split=labelled_counts(lang, "split", counts["split"]), versions=len(versions),
                           active=assistant.active_version_id or "—",
                           jobs=len(store.list_jobs(assistant_id=assistant.id)),
                           up=feedback.get("up", 0), down=feedback.get("down", 0)))


def handlers() -> list:
    return [
        CommandHandler("export", export),
        CommandHandler("apikey", apikey),
        CommandHandler("apikeys", apikeys),
        CommandHandler("stats", stats),
        CallbackQueryHandler(export_button, pattern=r"^xp:"),
        CallbackQueryHandler(revoke_button, pattern=r"^ak:"),
    ]
