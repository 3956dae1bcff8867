"""Tunebot storage: the SQLite schema, migrations and typed access (`Store`)."""

from storage.db import open_db, migrate, MIGRATIONS
from storage.errors import StorageError, NotFound, DuplicateExample, InvalidValue, NotOpen
from storage.records import (
    Assistant,
    Member,
    Invite,
    Example,
    ExampleRevision,
    NewExample,
    Document,
    GenerationRun,
    Job,
    ModelVersion,
    RetrainPolicy,
    ApiKey,
    AuditEntry,
    Unanswered,
    User,
    Publication,
    Customer,
    CHANNELS,
    ROLES,
    SOURCES,
    STATUSES,
    SPLITS,
    JOB_KINDS,
    JOB_STATES,
    UNANSWERED_STATES,
)
from storage.store import Store, ThreadStores
from storage.text import normalize_question, question_hash

__all__ = [
    "open_db", "migrate", "MIGRATIONS", "Store", "ThreadStores",
    "StorageError", "NotFound", "DuplicateExample", "InvalidValue", "NotOpen",
    "Assistant", "Member", "Invite", "Example", "ExampleRevision", "NewExample", "Document", "GenerationRun",
    "Job", "ModelVersion", "RetrainPolicy", "ApiKey", "AuditEntry", "Unanswered", "User",
    "Publication", "Customer", "CHANNELS",
    "ROLES", "SOURCES", "STATUSES", "SPLITS", "JOB_KINDS", "JOB_STATES", "UNANSWERED_STATES",
    "normalize_question", "question_hash",
]
