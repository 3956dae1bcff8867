"""Times as the database stores them, value checks and key hashing: shared by every part of the store."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any, Iterable

from storage.errors import InvalidValue, NotFound

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
INVITE_TTL_HOURS = (1, 720)  # an invite link is valid for one hour to 30 days
INVITE_MAX_USES = 1000
API_KEY_TOUCH_S = 60  # last_used_at is rewritten at most this often (not one write per request)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fmt_time(when: dt.datetime) -> str:
    """Times are stored as UTC 'YYYY-MM-DD HH:MM:SS' so that they sort as strings."""
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc)
    return when.strftime(TIME_FORMAT)


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.timezone.utc)


def check_value(value: str, allowed: Iterable[str], what: str) -> str:
    if value not in allowed:
        raise InvalidValue(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")
    return value


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def one_row(db, table: str, key: Any, what: str, *, where: str = "id = ?") -> dict:
    """The row of `table` matching `where` for key, or NotFound naming it ("job #3 not found")."""
    row = next(iter(db[table].rows_where(where, [key])), None)
    if row is None:
        raise NotFound(f"{what} #{key} not found")
    return row
