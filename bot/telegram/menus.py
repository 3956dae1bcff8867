"""The command menu (setMyCommands) in each language: the same commands, described by the texts catalogues."""

from __future__ import annotations

from telegram import Bot, BotCommand

from bot.telegram.texts import LANGUAGES, t

# In menu order; each has a "cmd_<name>" text in every catalogue. Every CommandHandler the bot registers is here
# or in HIDDEN (a test checks both ways).
MENU = ("start", "help", "create", "add", "examples", "review", "generate", "train", "jobs", "chat", "stop",
        "compare", "export", "stats", "use", "invite", "members", "schedule", "apikey", "apikeys", "publish", "lang", "cancel")
HIDDEN: tuple[str, ...] = ("forget",)  # commands that work but are not offered in the menu
DEFAULT_MENU_LANGUAGE = "en"  # for clients whose language has no menu of its own


def menu_commands(lang: str) -> list[BotCommand]:
    """The menu in `lang`."""
    return [BotCommand(name, t(lang, f"cmd_{name}")) for name in MENU]


async def set_command_menus(bot: Bot) -> None:
    """One menu per language we speak, and the default one (no language_code) in English."""
    await bot.set_my_commands(menu_commands(DEFAULT_MENU_LANGUAGE))
    for lang in LANGUAGES:
        await bot.set_my_commands(menu_commands(lang), language_code=lang)
