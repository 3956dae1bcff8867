"""Domain errors of the tuning layer; their messages tell the user what to do."""


class TuningError(Exception):
    """Base class: shown to the user as is by the CLI and the bot."""


class FormatError(TuningError):
    """A file cannot be read at all (wrong type, too big, not text)."""


class ModelLoadError(TuningError):
    """A base model or adapter cannot be loaded."""


class TrainingError(TuningError):
    """Training cannot start or failed for a reason the user can fix."""


class GenerationError(TuningError):
    """The larger model could not produce variations (endpoint, budget, format)."""
