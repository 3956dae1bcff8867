"""README stays true: every setting and every CLI command is documented."""

import dataclasses
import re
from pathlib import Path

from bot.cli import build_parser
from bot.config import Settings, env_name

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_configuration_table():
    aliases = {"telegram_token": "TELEGRAM_BOT_TOKEN", "openai_api_key": "OPENAI_API_KEY",
               "openai_base_url": "OPENAI_BASE_URL"}
    missing = [f.name for f in dataclasses.fields(Settings)
               if f"`{env_name(f.name)}`" not in README and f"`{aliases.get(f.name, '?')}`" not in README]
    assert not missing, f"settings missing from README: {missing}"


def test_every_command_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [name for name in sub.choices if not re.search(rf"`tunebot {re.escape(name)}\b", README)]
    assert not missing, f"commands missing from README: {missing}"


def test_quick_start_names_the_two_commands():
    assert "make run" in README and "make test" in README
