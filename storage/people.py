"""Users, assistants, their members and roles, invites and API keys."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import secrets
from typing import Any

from storage.common import (API_KEY_TOUCH_S, INVITE_MAX_USES, INVITE_TTL_HOURS, check_value, fmt_time,
                            hash_api_key, one_row, parse_time)
from storage.db import transaction
from storage.errors import InvalidValue, LastOwner, NotFound
from storage.records import ROLES, ApiKey, Assistant, Invite, Member, User, from_row


class PeopleStore:
    """The store part about who may do what (mixed into Store)."""

    # ---------------------------------------------------------------- users
    def upsert_user(self, user_id: int, *, name: str | None = None, language: str | None = None) -> User:
        with transaction(self.db):
            row = next(iter(self.db["users"].rows_where("id = ?", [user_id])), None)
            if row is None:
                self.db["users"].insert({"id": user_id, "name": name, "language": language,
                                         "created_at": self.now()})
            else:
                updates = {k: v for k, v in {"name": name, "language": language}.items() if v is not None}
                if updates:
                    self.db["users"].update(user_id, updates)
        return self.get_user(user_id)

    def get_user(self, user_id: int) -> User | None:
        row = next(iter(self.db["users"].rows_where("id = ?", [user_id])), None)
        return from_row(User, row) if row else None

    def set_user_language(self, user_id: int, language: str) -> None:
        self.upsert_user(user_id, language=language)

    # ----------------------------------------------------------- assistants
    def create_assistant(self, name: str, *, description: str = "", system_prompt: str = "",
                         base_model: str = "", owner_id: int | None = None) -> Assistant:
        name = name.strip()
        if not name:
            raise InvalidValue("assistant name must not be empty")
        if len(name) > 64:
            raise InvalidValue("assistant name must be at most 64 characters")
        with transaction(self.db):
            if self.find_assistant(name) is not None:
                raise InvalidValue(f"an assistant named {name!r} already exists")
            aid = self.db["assistants"].insert({
                "name": name, "description": description, "system_prompt": system_prompt,
                "base_model": base_model, "created_by": owner_id, "created_at": self.now(),
            }).last_pk
            if owner_id is not None:
                self.upsert_user(owner_id)
                self.db["members"].insert({"assistant_id": aid, "user_id": owner_id, "role": "owner",
                                           "added_at": self.now()})
            self.audit("assistant.create", user_id=owner_id, assistant_id=aid, details={"name": name})
        return self.get_assistant(aid)

    def get_assistant(self, assistant_id: int) -> Assistant:
        return from_row(Assistant, one_row(self.db, "assistants", assistant_id, "assistant",
                                           where="id = ? and deleted_at is null"))

    def find_assistant(self, name: str) -> Assistant | None:
        row = next(iter(self.db["assistants"].rows_where("name = ? and deleted_at is null", [name.strip()])), None)
        return from_row(Assistant, row) if row else None

    def assistant_by_name(self, name: str) -> Assistant:
        found = self.find_assistant(name)
        if found is None:
            raise NotFound(f"no assistant named {name!r}; see `tunebot assistants list`")
        return found

    def list_assistants(self, *, user_id: int | None = None) -> list[Assistant]:
        if user_id is None:
            rows = self.db["assistants"].rows_where("deleted_at is null", order_by="id")
        else:
            rows = self.db.query(
                "select a.* from assistants a join members m on m.assistant_id = a.id "
                "where m.user_id = ? and a.deleted_at is null order by a.id", [user_id])
        return [from_row(Assistant, r) for r in rows]

    def update_assistant(self, assistant_id: int, **fields: Any) -> Assistant:
        allowed = {"description", "system_prompt", "base_model", "active_version_id", "name"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidValue(f"cannot update {', '.join(sorted(unknown))}")
        with transaction(self.db):
            self.get_assistant(assistant_id)
            if "name" in fields:
                fields["name"] = str(fields["name"]).strip()
                other = self.find_assistant(fields["name"])
                if not fields["name"] or (other is not None and other.id != assistant_id):
                    raise InvalidValue(f"an assistant named {fields['name']!r} already exists" if other
                                       else "assistant name must not be empty")
            self.db["assistants"].update(assistant_id, fields)
        return self.get_assistant(assistant_id)

    # -------------------------------------------------------------- members
    def add_member(self, assistant_id: int, user_id: int, role: str) -> Member:
        check_value(role, ROLES, "role")
        with transaction(self.db):
            self.get_assistant(assistant_id)
            self.upsert_user(user_id)
            self.db["members"].upsert({"assistant_id": assistant_id, "user_id": user_id, "role": role,
                                       "added_at": self.now()}, pk=("assistant_id", "user_id"))
            self.audit("member.set", assistant_id=assistant_id, details={"user_id": user_id, "role": role})
        return self.get_member(assistant_id, user_id)

    def get_member(self, assistant_id: int, user_id: int) -> Member | None:
        row = next(iter(self.db["members"].rows_where("assistant_id = ? and user_id = ?",
                                                      [assistant_id, user_id])), None)
        return from_row(Member, row) if row else None

    def role_of(self, assistant_id: int, user_id: int) -> str | None:
        member = self.get_member(assistant_id, user_id)
        return member.role if member else None

    def list_members(self, assistant_id: int) -> list[Member]:
        return [from_row(Member, r) for r in
                self.db["members"].rows_where("assistant_id = ?", [assistant_id], order_by="added_at")]

    # The condition that keeps an owner is part of the write itself, so two owners removing or demoting
    # each other at the same moment cannot leave the assistant with none.
    _KEEPS_AN_OWNER = ("(role != 'owner' or (select count(*) from members o "
                       "where o.assistant_id = members.assistant_id and o.role = 'owner') > 1)")

    def set_member_role(self, assistant_id: int, user_id: int, role: str, *, by: int | None = None) -> Member:
        """Change the role of a current member; the last owner cannot be demoted."""
        check_value(role, ROLES, "role")
        with transaction(self.db):
            if self.get_member(assistant_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member")
            changed = self.db.execute(
                f"update members set role = ? where assistant_id = ? and user_id = ? "
                f"and (? = 'owner' or {self._KEEPS_AN_OWNER})", [role, assistant_id, user_id, role]).rowcount
            if not changed:
                raise LastOwner()
            self.audit("member.set", user_id=by, assistant_id=assistant_id, details={"user_id": user_id, "role": role})
        return self.get_member(assistant_id, user_id)

    def remove_member(self, assistant_id: int, user_id: int, *, by: int | None = None) -> None:
        with transaction(self.db):
            if self.get_member(assistant_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member")
            removed = self.db.execute(f"delete from members where assistant_id = ? and user_id = ? "
                                      f"and {self._KEEPS_AN_OWNER}", [assistant_id, user_id]).rowcount
            if not removed:
                raise LastOwner()
            self.audit("member.remove", user_id=by, assistant_id=assistant_id, details={"user_id": user_id})

    # -------------------------------------------------------------- invites
    def create_invite(self, assistant_id: int, role: str, *, uses: int = 1, ttl_hours: float = 72,
                      created_by: int | None = None) -> Invite:
        check_value(role, ROLES, "role")
        if not 1 <= uses <= INVITE_MAX_USES:
            raise InvalidValue(f"an invite has 1 to {INVITE_MAX_USES} uses")
        least, most = INVITE_TTL_HOURS
        if not (math.isfinite(ttl_hours) and least <= ttl_hours <= most):
            raise InvalidValue(f"an invite is valid for {least} to {most} hours (30 days)")
        token = secrets.token_urlsafe(12)
        expires = fmt_time(self.clock() + dt.timedelta(hours=ttl_hours))
        with transaction(self.db):
            self.db["invites"].insert({"token": token, "assistant_id": assistant_id, "role": role,
                                       "expires_at": expires, "uses_left": uses, "created_by": created_by,
                                       "created_at": self.now()})
            self.audit("invite.create", user_id=created_by, assistant_id=assistant_id,
                       details={"role": role, "uses": uses})
        return from_row(Invite, self.db["invites"].get(token))

    def redeem_invite(self, token: str, user_id: int) -> Member:
        """Use one invite: the user becomes a member with its role.

        A member who already has that role or a higher one keeps it, and the invite keeps its use. The use
        is taken by one conditional UPDATE, so two people cannot both take the last one.
        """
        now = self.now()
        with transaction(self.db):
            row = next(iter(self.db["invites"].rows_where("token = ?", [token])), None)
            if row is None:
                raise NotFound("this invite link is not valid")
            assistant_id, role = row["assistant_id"], row["role"]
            current = self.get_member(assistant_id, user_id)
            if current is not None and ROLES.index(current.role) <= ROLES.index(role):
                return current
            taken = self.db.execute(
                "update invites set uses_left = uses_left - 1 where token = ? and uses_left > 0 "
                "and (expires_at is null or expires_at >= ?) returning uses_left", [token, now]).fetchone()
            if taken is None:
                left = self.db.execute("select uses_left from invites where token = ?", [token]).fetchone()[0]
                raise InvalidValue("this invite link has been used up; ask for a new one" if left <= 0
                                   else "this invite link has expired; ask for a new one")
            self.db.execute("insert or ignore into users (id, created_at) values (?, ?)", [user_id, now])
            self.db.execute("insert into members (assistant_id, user_id, role, added_at) values (?, ?, ?, ?) "
                            "on conflict (assistant_id, user_id) do update set role = excluded.role",
                            [assistant_id, user_id, role, now])
            self.audit("invite.redeem", user_id=user_id, assistant_id=assistant_id, details={"role": role})
        return self.get_member(assistant_id, user_id)

    # ------------------------------------------------------------- api keys
    def create_api_key(self, assistant_id: int, *, name: str = "", created_by: int | None = None) -> tuple[ApiKey, str]:
        """Return the record and the plain key, which is shown once and stored only hashed."""
        self.get_assistant(assistant_id)
        key = "tb-" + secrets.token_urlsafe(32)
        with transaction(self.db):
            kid = self.db["api_keys"].insert({"assistant_id": assistant_id, "prefix": key[:10],
                                              "key_hash": hash_api_key(key), "name": name, "created_by": created_by,
                                              "created_at": self.now()}).last_pk
            self.audit("apikey.create", user_id=created_by, assistant_id=assistant_id,
                       details={"key_id": kid, "prefix": key[:10]})
        return from_row(ApiKey, self.db["api_keys"].get(kid)), key

    def lookup_api_key(self, key: str) -> ApiKey | None:
        row = next(iter(self.db["api_keys"].rows_where("key_hash = ? and revoked_at is null", [hash_api_key(key)])), None)
        return from_row(ApiKey, row) if row else None

    def use_api_key(self, key: str) -> ApiKey | None:
        """The live key for a request (None when unknown or revoked), its last_used_at brought up to date.

        The time is written only when the stored one is older than API_KEY_TOUCH_S, so busy clients do not
        make every request a write.
        """
        found = self.lookup_api_key(key)
        if found is None:
            return None
        now = self.clock()
        if found.last_used_at is None or parse_time(found.last_used_at) <= now - dt.timedelta(seconds=API_KEY_TOUCH_S):
            self.db.execute("update api_keys set last_used_at = ? where id = ?", [fmt_time(now), found.id])
            found = dataclasses.replace(found, last_used_at=fmt_time(now))
        return found

    def list_api_keys(self, assistant_id: int) -> list[ApiKey]:
        return [from_row(ApiKey, r) for r in self.db["api_keys"].rows_where("assistant_id = ?", [assistant_id], order_by="id")]

    def revoke_api_key(self, key_id: int, *, by: int | None = None) -> bool:
        """Revoke a key (True), or say it already was (False)."""
        with transaction(self.db):
            row = next(iter(self.db["api_keys"].rows_where("id = ?", [key_id])), None)
            if row is None:
                raise NotFound(f"API key #{key_id} not found")
            revoked = self.db.execute("update api_keys set revoked_at = ? where id = ? and revoked_at is null",
                                      [self.now(), key_id]).rowcount
            if not revoked:
                return False
            self.audit("apikey.revoke", user_id=by, assistant_id=row["assistant_id"], details={"key_id": key_id})
        return True
