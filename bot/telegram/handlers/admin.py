"""Getting things out: /export (dataset and adapter), /apikey and /apikeys, /stats."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import time
import zipfile
from pathlib import Path

from telegram import InputFile, Update
from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

from bot.telegram.common import (ID, app_of, button_invalid, callback_match, error_reason, lang_of, private_only, reply,
                                 requires, store_of, tr, with_thread_store)
from bot.telegram.texts import labelled_counts
from bot.telegram.handlers.publish import customer_report_for, customer_stats_text, send_customer_chart
from tuning.errors import TuningError

EXPORT_FORMATS = ("jsonl", "openai")
# Callback data is untrusted: only these shapes are accepted (fullmatch).
EXPORT_BUTTON = re.compile(rf"xp:({'|'.join(EXPORT_FORMATS)})")
MODEL_EXPORT_BUTTON = re.compile(r"xm:gguf")
TELEGRAM_FILE_LIMIT = 50 * 1024 * 1024  # what a bot may send (the Bot API's limit for documents)
EXPORT_PROBES = 20
REVOKE_BUTTON = re.compile(rf"ak:({ID}):({ID})")  # assistant, key


@private_only
@requires("expert")
async def export(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Choose the dataset format (the active adapter comes along); owners may also export the active version
    for llama.cpp and Ollama."""
    rows = [[("JSONL", "xp:jsonl"), ("OpenAI", "xp:openai")]]
    if role == "owner" and assistant.active_version_id:
        rows.append([(tr(update, context, "btn_export_gguf"), "xm:gguf")])
    await reply(update, tr(update, context, "export_choose"), buttons=rows)


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
    from tuning.data.importing import export_examples

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
async def export_model_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """The active version for llama.cpp and Ollama, checked on probe questions before it is sent: the GGUF
    adapter with a Modelfile (small enough for Telegram); the merged GGUF stays on the server."""
    from tuning.artifacts import local_dir
    from tuning.export import Probe, export_model
    from tuning.export_assistant import chat_answers, source_from_version

    if callback_match(update, MODEL_EXPORT_BUTTON) is None:
        await button_invalid(update, context)
        return
    store, settings = store_of(context), app_of(context).settings
    if not assistant.active_version_id:
        await reply(update, tr(update, context, "export_no_adapter"))
        return
    version = store.get_model_version(assistant.active_version_id)
    pool = (store.list_examples(assistant.id, status="approved", split="test")
            or store.list_examples(assistant.id, status="approved"))[:EXPORT_PROBES]
    probes = [Probe(e.question, tuple(e.must_contain or ()), answer=e.answer) for e in pool]
    await reply(update, tr(update, context, "export_gguf_started", id=version.id, n=len(probes)))
    out = settings.data_dir / "exports" / f"{assistant.id}-v{version.id}-{int(time.time())}"
    base_model = version.base_model or assistant.base_model or settings.base_model
    try:
        adapter = await asyncio.to_thread(local_dir, version.adapter_path, cache_dir=settings.models_cache)
        source = await with_thread_store(context, lambda thread_store: dataclasses.replace(source_from_version(
            thread_store, assistant, version, adapter_dir=adapter, indexes=app_of(context).indexes),
            base_model=base_model))  # the index may be built (embedded) now: not on the event loop
        report = await asyncio.to_thread(
            export_model, adapter, base_model=base_model, out_dir=out, fmt="ollama", probes=probes,
            system_prompt=assistant.system_prompt or "", cache_dir=settings.models_cache,
            chat=lambda engine, questions: chat_answers(source, engine, questions, cache_dir=settings.models_cache))
    except TuningError as exc:
        await reply(update, tr(update, context, "export_gguf_unavailable", reason=error_reason(exc, lang_of(update, context))))
        return
    lines = [tr(update, context, "export_gguf_check", artifact=c.artifact.split()[0], same=c.same, n=report.probes)
             for c in report.checks]
    if report.grounded_right is not None:  # what leaves is the model alone; /chat answers from the examples
        lines.append(tr(update, context, "export_gguf_compare", closed=report.closed_book_right,
                        grounded=report.grounded_right, n=report.scored, name=assistant.name))
    if report.flagged:
        lines.append(tr(update, context, "export_gguf_flagged"))
    data = await asyncio.to_thread(_gguf_zip, out)
    size_mb = round((out / "model.gguf").stat().st_size / 2 ** 20)
    caption = tr(update, context, "export_gguf_done", id=version.id, checks="\n".join(lines), size=size_mb,
                 path=str(out / "model.gguf"))
    if len(data) > TELEGRAM_FILE_LIMIT:
        await reply(update, caption + "\n\n" + tr(update, context, "export_gguf_too_big", path=str(out)))
        return
    await update.effective_chat.send_document(
        InputFile(io.BytesIO(data), filename=f"{assistant.name}-v{version.id}-gguf.zip"))
    await reply(update, caption)


def _gguf_zip(folder: Path) -> bytes:
    """The parts of an Ollama export that fit a message: the GGUF adapter, its Modelfile, the check's report."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("adapter.gguf", "Modelfile.adapter", "export_report.json"):
            if (folder / name).exists():
                zf.write(folder / name, name)
    return buf.getvalue()


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
    report = await customer_report_for(update, context, assistant, role)
    await reply(update, tr(update, context, "stats", name=assistant.name,
                           by_status=labelled_counts(lang, "status", counts["status"]),
                           by_source=labelled_counts(lang, "source", counts["source"]),
                           by_split=labelled_counts(lang, "split", counts["split"]), versions=len(versions),
                           active=assistant.active_version_id or "—",
                           jobs=len(store.list_jobs(assistant_id=assistant.id)),
                           up=feedback.get("up", 0), down=feedback.get("down", 0))
                + (customer_stats_text(update, context, report) if report else ""))
    if report and report["questions"]:
        await send_customer_chart(update, context, report)


def handlers() -> list:
    return [
        CommandHandler("export", export),
        CommandHandler("apikey", apikey),
        CommandHandler("apikeys", apikeys),
        CommandHandler("stats", stats),
        CallbackQueryHandler(export_button, pattern=r"^xp:"),
        CallbackQueryHandler(export_model_button, pattern=r"^xm:"),
        CallbackQueryHandler(revoke_button, pattern=r"^ak:"),
    ]
