"""Small exception classes whose messages a user can act on."""


class StorageError(Exception):
    """Base class for storage errors."""


class NotFound(StorageError):
    """A record that was asked for does not exist (or was deleted)."""


class InvalidValue(StorageError):
    """A value outside its allowed set (role, status, split, …)."""


class LastOwner(InvalidValue):
    """Removing or demoting this member would leave the assistant without an owner."""

    code = "last_owner"  # the bot shows its own text for this (error_last_owner)

    def __init__(self):
        super().__init__("the last owner cannot be removed or demoted; make someone else owner first")


class DuplicateExample(StorageError):
    """An example with the same normalized question already exists in the assistant."""

    def __init__(self, existing_id: int, question: str):
        self.existing_id = existing_id
        self.question = question
        super().__init__(f"duplicate of example #{existing_id}: {question[:80]!r}")


class NotOpen(StorageError):
    """An unanswered question that was already answered or dismissed."""
