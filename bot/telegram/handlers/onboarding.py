"""Onboarding and membership: /start, /help, /lang, /use, creating assistants, invites, members."""

from __future__ import annotations

import math
import re

from telegram import Update
from telegram.ext import (CallbackQueryHandler, CommandHandler, ContextTypes, ConversationHandler, MessageHandler,
                          filters)

from bot.telegram.checklist import show_checklist
from bot.telegram.common import (ID, app_of, button_invalid, callback_match, current_assistant, error_reason,
                                 lang_of, reply, requires, store_of, tr, tr_error)
from bot.telegram.texts import LANGUAGES
from storage import StorageError
from storage.records import ROLES
from storage.common import INVITE_MAX_USES, INVITE_TTL_HOURS
from tuning.models import display_name, licence_of

CREATE_NAME, CREATE_DESCRIPTION, CREATE_PROMPT, CREATE_MODEL = range(4)
# Callback data is untrusted: only these shapes are accepted (fullmatch).
LANG_BUTTON = re.compile(rf"lang:({'|'.join(LANGUAGES)})")
USE_BUTTON = re.compile(rf"use:({ID})")
CREATE_MODEL_BUTTON = re.compile(r"cr:([0-9]{1,3}|default)")  # an index into the offered base models
MEMBER_BUTTON = re.compile(rf"mb:({ID}):([{''.join(r[0] for r in ROLES)}x]):({ID})")  # assistant, role or ✖, user


def _remember_user(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    user = update.effective_user
    store_of(context).upsert_user(user.id, name=user.full_name)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Greet; with a deep-link payload, redeem that invite."""
    _remember_user(update, context)
    if context.args:
        store = store_of(context)
        uid = update.effective_user.id
        roles_before = {a.id: store.role_of(a.id, uid) for a in store.list_assistants(user_id=uid)}
        try:
            member = store.redeem_invite(context.args[0], uid)
        except StorageError as exc:
            reason = error_reason(exc, lang_of(update, context))
            await reply(update, tr(update, context, "invite_invalid", reason=reason))
            return
        assistant = store.get_assistant(member.assistant_id)
        context.user_data["assistant_id"] = assistant.id
        key = "invite_already_member" if roles_before.get(assistant.id) == member.role else "invite_joined"
        await reply(update, tr(update, context, key, name=assistant.name,
                               role=tr(update, context, f"role_{member.role}")) + "\n\n"
                    + tr(update, context, f"help_{member.role}"))
        return
    await reply(update, tr(update, context, "start"),
                buttons=[[(tr(update, context, "btn_create"), "on:create")],
                         [(tr(update, context, "btn_join"), "on:join")]])


async def join_info(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Explain how invites work."""
    await update.callback_query.answer()
    await reply(update, tr(update, context, "join_info"))


async def help_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The commands this user may use, by role."""
    assistant, role = current_assistant(update, context)
    if assistant is None:
        await reply(update, tr(update, context, "help_stranger"))
        return
    await reply(update, tr(update, context, "help_header", name=assistant.name, role=tr(update, context, f"role_{role}"))
                + "\n\n" + tr(update, context, f"help_{role}"))


async def lang(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Switch the language (/lang ru) or show the choice."""
    if context.args and context.args[0].lower() in LANGUAGES:
        context.user_data["lang"] = context.args[0].lower()
        store_of(context).set_user_language(update.effective_user.id, context.user_data["lang"])
        await reply(update, tr(update, context, "lang_set"))
        return
    await reply(update, tr(update, context, "lang_choose"),
                buttons=[[("English", "lang:en"), ("Русский", "lang:ru")]])


async def lang_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A language button."""
    await update.callback_query.answer()
    match = callback_match(update, LANG_BUTTON)
    if match is None:
        await button_invalid(update, context)
        return
    context.user_data["lang"] = match.group(1)
    store_of(context).set_user_language(update.effective_user.id, match.group(1))
    await reply(update, tr(update, context, "lang_set"), edit=True)


async def use(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Switch between the assistants this user belongs to."""
    store = store_of(context)
    mine = store.list_assistants(user_id=update.effective_user.id)
    if not mine:
        await reply(update, tr(update, context, "not_member"))
        return
    if context.args:
        wanted = " ".join(context.args).strip().lower()
        for a in mine:
            if a.name.lower() == wanted:
                context.user_data["assistant_id"] = a.id
                await reply(update, tr(update, context, "use_switched", name=a.name))
                return
    current, _ = current_assistant(update, context)
    await reply(update, tr(update, context, "use_choose", name=current.name if current else "-"),
                buttons=[[(("• " if current and a.id == current.id else "") + a.name, f"use:{a.id}")] for a in mine])


async def use_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Pick an assistant from the /use list."""
    await update.callback_query.answer()
    match = callback_match(update, USE_BUTTON)
    store = store_of(context)
    if match is None or store.role_of(aid := int(match.group(1)), update.effective_user.id) is None:
        await button_invalid(update, context)
        return
    context.user_data["assistant_id"] = aid
    await reply(update, tr(update, context, "use_switched", name=store.get_assistant(aid).name), edit=True)


# --------------------------------------------------------------- create an assistant
def _may_create(update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
    admins = app_of(context).settings.admins
    return not admins or update.effective_user.id in admins


async def create_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Ask for the new assistant's name."""
    if update.callback_query:
        await update.callback_query.answer()
    if not _may_create(update, context):
        await reply(update, tr(update, context, "create_not_admin"))
        return ConversationHandler.END
    _remember_user(update, context)
    context.user_data["new_assistant"] = {}
    await reply(update, tr(update, context, "create_ask_name"))
    return CREATE_NAME


async def create_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Take the name."""
    name = update.message.text.strip()
    if not name or len(name) > 64 or store_of(context).find_assistant(name):
        await reply(update, tr(update, context, "create_bad_name"))
        return CREATE_NAME
    context.user_data["new_assistant"] = {"name": name}
    await reply(update, tr(update, context, "create_ask_description"))
    return CREATE_DESCRIPTION


async def create_description(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Take the short description."""
    context.user_data.setdefault("new_assistant", {})["description"] = update.message.text.strip()
    await reply(update, tr(update, context, "create_ask_prompt"))
    return CREATE_PROMPT


async def create_prompt(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Take the system prompt, then offer the base models the admin allows."""
    context.user_data.setdefault("new_assistant", {})["system_prompt"] = update.message.text.strip()
    await reply(update, tr(update, context, "create_ask_model") + _licences(update, context),
                buttons=_model_buttons(update, context))
    return CREATE_MODEL


def _licences(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The licence of each offered bundled model (Gemma's terms bind whoever picks it), one line each."""
    found = [(display_name(m), licence_of(m)) for m in app_of(context).settings.offered_base_models]
    lines = [tr(update, context, "create_model_licence", model=name, licence=lic[0], url=lic[1])
             for name, lic in found if lic is not None]
    return "\n\n" + "\n".join([tr(update, context, "create_model_licences"), *lines]) if lines else ""


def _model_buttons(update: Update, context: ContextTypes.DEFAULT_TYPE) -> list:
    """One button per offered base model (the default, then TUNEBOT_BASE_MODELS), shown by name, never by path."""
    offered = app_of(context).settings.offered_base_models
    return [[(tr(update, context, "btn_default_model", model=display_name(m)) if i == 0 else display_name(m),
              f"cr:{i}")] for i, m in enumerate(offered)]


def _chosen_model(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """The offered base model that the button or the typed name picks; None for anything else (a typed path,
    hub id or crafted button: users never make the server load what the admin did not offer)."""
    offered = app_of(context).settings.offered_base_models
    if update.callback_query:
        match = callback_match(update, CREATE_MODEL_BUTTON)
        index = -1 if match is None else 0 if match.group(1) == "default" else int(match.group(1))
        return offered[index] if 0 <= index < len(offered) else None
    typed = update.message.text.strip().lower()
    return next((m for m in offered if typed in (m.lower(), display_name(m).lower())), None)


async def create_model(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Take the base model (one of the offered ones) and create the assistant."""
    if "new_assistant" not in context.user_data and update.callback_query is None:
        # the dialogue is over, its last messages still being sent (updates run concurrently): what the user typed
        # after seeing them is an ordinary message (the quick form, a question), not a model name
        from bot.telegram.handlers import text_message

        await text_message(update, context)
        return ConversationHandler.END
    model = _chosen_model(update, context)
    if model is None:
        if update.callback_query:
            await update.callback_query.answer()
        await reply(update, tr(update, context, "create_bad_model"), buttons=_model_buttons(update, context))
        return CREATE_MODEL
    # the dialogue's state changes before the first await, so a message processed meanwhile finds it done
    draft = context.user_data.pop("new_assistant", {})
    try:
        assistant = store_of(context).create_assistant(
            draft.get("name", ""), description=draft.get("description", ""),
            system_prompt=draft.get("system_prompt", ""), base_model=model, owner_id=update.effective_user.id)
    except StorageError as exc:
        if update.callback_query:
            await update.callback_query.answer()
        await reply(update, tr_error(update, context, exc))
        return ConversationHandler.END
    context.user_data["assistant_id"] = assistant.id
    if update.callback_query:
        await update.callback_query.answer()
    app_of(context).preload([model])  # warm before its first question
    await reply(update, tr(update, context, "create_done", name=assistant.name, model=display_name(model)) + "\n\n"
                + tr(update, context, "help_owner"))
    await show_checklist(update, context, assistant.id)
    return ConversationHandler.END


async def cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Leave any guided dialogue."""
    context.user_data.pop("new_assistant", None)
    context.user_data.pop("draft", None)
    context.user_data.pop("awaiting", None)
    await reply(update, tr(update, context, "cancelled"))
    return ConversationHandler.END


def create_conversation() -> ConversationHandler:
    text = filters.TEXT & ~filters.COMMAND
    return ConversationHandler(
        entry_points=[CommandHandler("create", create_start), CallbackQueryHandler(create_start, pattern=r"^on:create$")],
        states={CREATE_NAME: [MessageHandler(text, create_name)],
                CREATE_DESCRIPTION: [MessageHandler(text, create_description)],
                CREATE_PROMPT: [MessageHandler(text, create_prompt)],
                CREATE_MODEL: [MessageHandler(text, create_model), CallbackQueryHandler(create_model, pattern=r"^cr:")]},
        fallbacks=[CommandHandler("cancel", cancel)],
        name="create_assistant", persistent=True, allow_reentry=True,
    )


# ------------------------------------------------------------------ invites and members
@requires("owner")
async def invite(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """/invite ROLE [USES] [HOURS]: a t.me deep link that makes its user a member."""
    args = context.args or []
    wanted = args[0].lower() if args else ""
    if wanted not in ROLES:
        await reply(update, tr(update, context, "invite_usage"))
        return
    try:
        uses = int(args[1]) if len(args) > 1 else 1
        hours = float(args[2]) if len(args) > 2 else 72
    except ValueError:
        await reply(update, tr(update, context, "invite_usage"))
        return
    if not 1 <= uses <= INVITE_MAX_USES:
        await reply(update, tr(update, context, "invite_bad_uses", most=INVITE_MAX_USES))
        return
    if not (math.isfinite(hours) and INVITE_TTL_HOURS[0] <= hours <= INVITE_TTL_HOURS[1]):
        await reply(update, tr(update, context, "invite_bad_hours", least=INVITE_TTL_HOURS[0],
                               most=INVITE_TTL_HOURS[1]))
        return
    inv = store_of(context).create_invite(assistant.id, wanted, uses=uses, ttl_hours=hours,
                                          created_by=update.effective_user.id)
    link = f"https://t.me/{context.bot.username}?start={inv.token}"
    await reply(update, tr(update, context, "invite_created", role=tr(update, context, f"role_{wanted}"), link=link,
                           uses=uses, expires=inv.expires_at, token=inv.token))


@requires("owner")
async def members(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """The member list with buttons to change roles or remove."""
    store = store_of(context)
    lines, rows = [], []
    for m in store.list_members(assistant.id):
        user = store.get_user(m.user_id)
        name = (user.name if user and user.name else str(m.user_id))
        lines.append(f"• {name} ({m.user_id}): {tr(update, context, f'role_{m.role}')}")
        if m.user_id != update.effective_user.id:
            data = f"mb:{assistant.id}:{{}}:{m.user_id}"
            rows.append([(f"{name[:12]}→{tr(update, context, 'role_' + r)}", data.format(r[0]))
                         for r in ROLES if r != m.role] + [(f"✖ {name[:12]}", data.format("x"))])
    await reply(update, tr(update, context, "members_header", name=assistant.name) + "\n" + "\n".join(lines),
                buttons=rows or None)


@requires("owner")
async def member_button(update: Update, context: ContextTypes.DEFAULT_TYPE, assistant, role) -> None:
    """Change a member's role or remove them (a member of this assistant; never its last owner)."""
    match = callback_match(update, MEMBER_BUTTON)
    store = store_of(context)
    if match is None or int(match.group(1)) != assistant.id \
            or store.get_member(assistant.id, uid := int(match.group(3))) is None:
        await button_invalid(update, context)
        return
    action = match.group(2)
    try:
        if action == "x":
            store.remove_member(assistant.id, uid, by=update.effective_user.id)
            await reply(update, tr(update, context, "member_removed", user=uid))
            return
        new_role = {r[0]: r for r in ROLES}[action]
        store.set_member_role(assistant.id, uid, new_role, by=update.effective_user.id)
        await reply(update, tr(update, context, "member_role_set", user=uid, role=tr(update, context, f"role_{new_role}")))
    except StorageError as exc:
        await reply(update, tr_error(update, context, exc))


def handlers() -> list:
    return [
        create_conversation(),
        CommandHandler("start", start),
        CommandHandler("help", help_command),
        CommandHandler("lang", lang),
        CommandHandler("use", use),
        CommandHandler("invite", invite),
        CommandHandler("members", members),
        CommandHandler("cancel", cancel),
        CallbackQueryHandler(join_info, pattern=r"^on:join$"),
        CallbackQueryHandler(lang_button, pattern=r"^lang:"),
        CallbackQueryHandler(use_button, pattern=r"^use:"),
        CallbackQueryHandler(member_button, pattern=r"^mb:"),
    ]
