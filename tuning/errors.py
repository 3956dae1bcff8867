"""Domain errors of the tuning layer; their messages tell the user what to do."""

from __future__ import annotations


class TuningError(Exception):
    """Base class: shown to the user as is by the CLI and the bot.

    The message is the English text. An optional `code` and `params` say the same thing in a form a
    front end can render in the user's language (the bot's catalogue key is "error_<code>").
    """

    def __init__(self, *args: object, code: str = "", params: dict[str, object] | None = None):
        super().__init__(*args)
        self.code = code
        self.params = {name: str(value) for name, value in (params or {}).items()}


class FormatError(TuningError):
    """A file cannot be read at all (wrong type, too big, not text)."""


class ModelLoadError(TuningError):
    """A base model or adapter cannot be loaded."""


class TrainingError(TuningError):
    """Training cannot start or failed for a reason the user can fix."""


class GenerationError(TuningError):
    """The larger model could not produce variations (endpoint, budget, format)."""
