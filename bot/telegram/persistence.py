"""python-telegram-bot persistence in our database (bot_state), so conversations survive restarts."""

from __future__ import annotations

import json
from collections import defaultdict
from copy import deepcopy
from typing import Any

from telegram.ext import BasePersistence, PersistenceInput

from storage import Store

_PREFIX = "ptb:"


class StorePersistence(BasePersistence):
    """User data, chat data and conversation states as JSON rows in `bot_state`.

    Values must be JSON-serializable (the handlers keep only ids and short strings there); bot_data
    holds the services and is not persisted.
    Writes go to the database when PTB flushes (every `update_interval` seconds and at shutdown).
    """

    def __init__(self, store: Store, *, update_interval: float = 1.0):
        super().__init__(store_data=PersistenceInput(bot_data=False, chat_data=True, user_data=True,
                                                     callback_data=False), update_interval=update_interval)
        self.store = store

    def _load(self, name: str) -> Any:
        return self.store.get_state(_PREFIX + name)

    def _save(self, name: str, value: Any) -> None:
        self.store.set_state(_PREFIX + name, value)

    def _load_keyed(self, name: str) -> dict[int, dict]:
        raw = self._load(name) or {}
        return defaultdict(dict, {int(k): v for k, v in raw.items()})

    def _save_keyed(self, name: str, key: int, data: dict | None) -> None:
        raw = self._load(name) or {}
        if data is None:
            raw.pop(str(key), None)
        else:
            raw[str(key)] = data
        self._save(name, raw)

    # ------------------------------------------------------------- reading
    async def get_user_data(self) -> dict[int, dict]:
        return self._load_keyed("user_data")

    async def get_chat_data(self) -> dict[int, dict]:
        return self._load_keyed("chat_data")

    async def get_bot_data(self) -> dict:
        return self._load("bot_data") or {}

    async def get_callback_data(self) -> None:
        return None

    async def get_conversations(self, name: str) -> dict:
        raw = self._load(f"conv:{name}") or {}
        return {tuple(json.loads(key)): state for key, state in raw.items()}

    # ------------------------------------------------------------- writing
    async def update_conversation(self, name: str, key: tuple, new_state: object | None) -> None:
        raw = self._load(f"conv:{name}") or {}
        skey = json.dumps(list(key))
        if new_state is None:
            raw.pop(skey, None)
        else:
            raw[skey] = new_state
        self._save(f"conv:{name}", raw)

    async def update_user_data(self, user_id: int, data: dict) -> None:
        self._save_keyed("user_data", user_id, deepcopy(data))

    async def update_chat_data(self, chat_id: int, data: dict) -> None:
        self._save_keyed("chat_data", chat_id, deepcopy(data))

    async def update_bot_data(self, data: dict) -> None:
        self._save("bot_data", deepcopy(data))

    async def update_callback_data(self, data: Any) -> None:
        return None

    async def drop_chat_data(self, chat_id: int) -> None:
        self._save_keyed("chat_data", chat_id, None)

    async def drop_user_data(self, user_id: int) -> None:
        self._save_keyed("user_data", user_id, None)

    async def refresh_user_data(self, user_id: int, user_data: dict) -> None:
        return None

    async def refresh_chat_data(self, chat_id: int, chat_data: dict) -> None:
        return None

    async def refresh_bot_data(self, bot_data: dict) -> None:
        return None

    async def flush(self) -> None:
        return None
