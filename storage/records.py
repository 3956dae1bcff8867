"""Plain frozen dataclasses for the rows other layers read."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("owner", "expert", "tester")
SOURCES = ("expert", "import", "document", "synthetic", "feedback")
STATUSES = ("pending", "approved", "rejected")
SPLITS = ("train", "val", "test")
JOB_KINDS = ("train", "eval", "generate")
JOB_STATES = ("scheduled", "queued", "running", "succeeded", "failed", "cancelled")
VERSION_STATES = ("candidate", "active", "archived", "discarded")
UNANSWERED_STATES = ("open", "answered", "dismissed")

_JSON_FIELDS = {"hyperparameters", "metrics", "params", "progress", "result", "details", "must_contain", "counts"}


def from_row(cls, row: dict[str, Any]):
    """Build a record from a sqlite row dict, decoding JSON columns and ignoring extra keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in row.items():
        if key not in names:
            continue
        if key in _JSON_FIELDS and isinstance(value, str):
            value = json.loads(value)
        values[key] = value
    return cls(**values)


@dataclass(frozen=True)
class User:
    id: int
    name: str | None = None
    language: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class Assistant:
    id: int
    name: str
    description: str = ""
    system_prompt: str = ""
    base_model: str = ""
    active_version_id: int | None = None
    created_by: int | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class Member:
    assistant_id: int
    user_id: int
    role: str
    added_at: str | None = None


@dataclass(frozen=True)
class Invite:
    token: str
    assistant_id: int
    role: str
    expires_at: str | None
    uses_left: int
    created_by: int | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class Example:
    id: int
    assistant_id: int
    question: str
    answer: str
    source: str = "expert"
    status: str = "approved"
    split: str = "train"
    parent_id: int | None = None
    method: str | None = None
    author_id: int | None = None
    reviewer_id: int | None = None
    generation_run_id: int | None = None
    document_id: int | None = None
    chunk_ref: str | None = None
    judge_score: float | None = None
    must_contain: list | None = None
    question_hash: str = ""
    created_at: str | None = None
    updated_at: str | None = None
    deleted_at: str | None = None


@dataclass(frozen=True)
class NewExample:
    """One example to add with `Store.add_examples`: the fields that differ from item to item."""

    question: str
    answer: str
    split: str = "train"
    must_contain: tuple[str, ...] | list[str] | None = None


@dataclass(frozen=True)
class ExampleRevision:
    id: int
    example_id: int
    action: str
    question: str
    answer: str
    status: str
    changed_by: int | None
    changed_at: str


@dataclass(frozen=True)
class Document:
    id: int
    assistant_id: int
    filename: str
    sha256: str
    text: str
    uploaded_by: int | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class GenerationRun:
    id: int
    assistant_id: int
    method: str
    model: str
    status: str = "running"
    requested: int = 0
    generated: int = 0
    kept: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    params: dict = field(default_factory=dict)
    created_at: str | None = None
    finished_at: str | None = None


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    assistant_id: int | None
    status: str
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 3
    gpus: int = 0
    params: dict = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    error: str | None = None
    scheduled_at: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    heartbeat_at: str | None = None
    worker_id: str | None = None
    pid: int | None = None
    devices: str | None = None
    created_by: int | None = None
    tg_chat_id: int | None = None
    tg_message_id: int | None = None


@dataclass(frozen=True)
class ModelVersion:
    id: int
    assistant_id: int
    adapter_path: str
    base_model: str
    status: str = "candidate"
    job_id: int | None = None
    dataset_hash: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: str | None = None
    promoted_at: str | None = None


@dataclass(frozen=True)
class RetrainPolicy:
    assistant_id: int
    cron: str
    min_new: int = 1
    enabled: int = 1
    last_run_at: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class ApiKey:
    id: int
    assistant_id: int
    prefix: str
    key_hash: str
    name: str = ""
    created_by: int | None = None
    created_at: str | None = None
    revoked_at: str | None = None
    last_used_at: str | None = None


@dataclass(frozen=True)
class Unanswered:
    """A question the assistant did not answer confidently, for an expert (answered_* also record a dismissal)."""

    id: int
    assistant_id: int
    question: str
    user_id: int | None = None
    conversation_id: int | None = None
    message_id: int | None = None
    status: str = "open"
    example_id: int | None = None
    answered_by: int | None = None
    created_at: str | None = None
    answered_at: str | None = None
    notified_at: str | None = None
    customer_id: int | None = None  # a customer asked: the team's answer goes back to chat_id
    chat_id: int | None = None
    reply_to_message_id: int | None = None
    delivered_at: str | None = None
    answer: str | None = None  # as the expert gave it (the example may be shared or edited later)


CHANNELS = ("link", "groups", "business")


@dataclass(frozen=True)
class Publication:
    """An assistant offered to customers: the link's token, which channels answer, the greeting."""

    assistant_id: int
    token: str
    active: int = 1
    link: int = 1
    groups: int = 0
    business: int = 0
    greeting: str = ""
    created_by: int | None = None
    created_at: str | None = None
    updated_at: str | None = None

    def answers_on(self, channel: str) -> bool:
        return bool(self.active) and bool(getattr(self, channel))


@dataclass(frozen=True)
class Customer:
    """Someone outside the team who asks an assistant, in one chat (private, a group, a business chat)."""

    id: int
    assistant_id: int
    user_id: int
    chat_id: int
    channel: str
    language: str | None = None
    business_connection_id: str | None = None
    conversation_id: int | None = None
    started_at: str | None = None
    last_seen_at: str | None = None
    forgotten_at: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: str
    action: str
    user_id: int | None = None
    assistant_id: int | None = None
    details: dict = field(default_factory=dict)
