"""The command menu: every command the bot answers is offered (or hidden on purpose), described in every language."""

import re

from telegram.ext import CommandHandler, ConversationHandler

from bot.telegram.handlers import all_handlers
from bot.telegram.menus import HIDDEN, MENU, menu_commands
from bot.telegram.texts import LANGUAGES


def _commands(handlers) -> set[str]:
    found: set[str] = set()
    for h in handlers:
        if isinstance(h, CommandHandler):
            found |= set(h.commands)
        elif isinstance(h, ConversationHandler):
            found |= _commands(h.entry_points) | _commands(h.fallbacks)
            for state in h.states.values():
                found |= _commands(state)
    return found


def test_menu_matches_the_registered_commands():
    registered = _commands(all_handlers())
    assert "create" in registered and "add" in registered  # commands inside conversations count too
    assert registered - set(MENU) - set(HIDDEN) == set(), "registered but neither in the menu nor hidden"
    assert (set(MENU) | set(HIDDEN)) - registered == set(), "in the menu but no handler answers it"
    assert not set(MENU) & set(HIDDEN)
    assert len(MENU) == len(set(MENU)) <= 100  # Telegram's limit


def test_menu_is_described_in_every_language():
    for lang in LANGUAGES:
        commands = menu_commands(lang)
        assert [c.command for c in commands] == list(MENU)
        for c in commands:
            assert re.fullmatch(r"[a-z0-9_]{1,32}", c.command)
            assert 1 <= len(c.description) <= 256, (lang, c.command)
    russian = menu_commands("ru")
    assert all(re.search("[а-яё]", c.description) for c in russian), [c.description for c in russian]
    assert all(en.description != ru.description for en, ru in zip(menu_commands("en"), russian))
