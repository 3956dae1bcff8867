"""The composition root: builds the services from Settings, once, for the CLI and the bot."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from bot.config import Settings
from storage import Store, open_db


@dataclass
class App:
    """Lazily built services shared by CLI commands and Telegram handlers."""

    settings: Settings
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def store(self) -> Store:
        return Store(open_db(self.settings.database_path))


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request URL, and Telegram's URLs contain the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
