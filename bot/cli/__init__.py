"""The `tunebot` command line: one console script, subcommands registered by feature modules."""

from __future__ import annotations

import argparse
import importlib
import sys

from bot.config import SettingsError, load_settings
from tuning import exitcodes

# Each module defines `register(subparsers)`, adding its subcommands with `set_defaults(func=...)`;
# a command function takes (args, app) and returns an exit code.
COMMAND_MODULES = [
    "bot.cli.data",
    "bot.cli.generate",
    "bot.cli.serve",
    "bot.cli.run",
    "bot.cli.jobs",
    "bot.cli.train",
    "bot.cli.export",
    "bot.cli.customers",
]

EXIT_USAGE = exitcodes.USAGE


class CommandError(Exception):
    """A CLI-level error with a one-line message (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunebot",
        description="Tunebot: build your own chat assistant from question-answer pairs, "
                    "fine-tune it with LoRA, and try it in Telegram or the terminal.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is shown as a one-line error with exit code 2."""
    from storage import StorageError
    from tuning.errors import TuningError

    return (CommandError, SettingsError, StorageError, TuningError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        from bot.app import App, configure_logging, configure_threads

        settings = load_settings()
        configure_logging(settings)
        configure_threads(settings)
        return int(args.func(args, App(settings)) or 0)
    except user_errors() as exc:
        print(f"tunebot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
