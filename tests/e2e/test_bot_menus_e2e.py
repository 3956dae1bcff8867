"""The command menu as a client sees it after `tunebot run` starts: Russian for Russian users, English otherwise."""

from __future__ import annotations

import json

import pytest

from bot_process import BotProcess
from bot.telegram.menus import MENU

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _menu(emulator, **params) -> list[dict]:
    body = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()}
    resp = emulator.http.post(f"/bot{emulator.token}/getMyCommands", data=body)
    resp.raise_for_status()
    return resp.json()["result"]


def test_menus_per_language_after_start(emulator, tmp_path):
    bot = BotProcess(emulator, tmp_path / "data").start()
    try:
        ru = _menu(emulator, language_code="ru")
        en = _menu(emulator, language_code="en")
        default = _menu(emulator)
    finally:
        bot.stop()
    assert [c["command"] for c in ru] == list(MENU) == [c["command"] for c in en]
    described = {c["command"]: c["description"] for c in ru}
    assert described["train"] == "обучить модель" and described["create"] == "создать ассистента"
    assert default == en and {c["command"]: c["description"] for c in en}["train"] == "train a model"
    assert _menu(emulator, language_code="de") == []  # Telegram shows such clients the default menu
