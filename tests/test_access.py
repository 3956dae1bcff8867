"""Who may get in and what keeps an assistant safe: invites, members' roles, API keys (real SQLite files)."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from storage import InvalidValue, NotFound, Store, open_db
from storage.common import API_KEY_TOUCH_S, utcnow


class HookedClock:
    """A clock that runs `hook` once, the first time it is read after `arm()` (to act between two steps)."""

    def __init__(self):
        self.hook = None

    def arm(self, hook) -> None:
        self.hook = hook

    def __call__(self) -> dt.datetime:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return utcnow()


@pytest.mark.parametrize("hours", [1e9, math.nan, math.inf, -3, 0, 0.5, 720.5, 721])
def test_invite_lifetime_outside_one_hour_to_thirty_days_is_refused(store, assistant, hours):
    with pytest.raises(InvalidValue, match="1 to 720 hours"):
        store.create_invite(assistant.id, "expert", ttl_hours=hours)
    assert store.db.execute("select count(*) from invites").fetchone()[0] == 0


@pytest.mark.parametrize("uses", [0, -1, 1001, 10 ** 30])
def test_invite_uses_are_bounded(store, assistant, uses):
    with pytest.raises(InvalidValue, match="1 to 1000 uses"):
        store.create_invite(assistant.id, "expert", uses=uses)


def test_invite_bounds_themselves_are_allowed(store, assistant):
    assert store.create_invite(assistant.id, "expert", uses=1000, ttl_hours=720).uses_left == 1000
    assert store.create_invite(assistant.id, "tester", uses=1, ttl_hours=1).uses_left == 1


def test_the_last_use_of_an_invite_goes_to_one_person(db_path):
    """Two redemptions of a one-use link from two connections, the second between the first one's steps."""
    clock = HookedClock()
    first = Store(open_db(db_path), clock=clock)
    second = Store(open_db(db_path))
    a = first.create_assistant("acme", owner_id=1)
    invite = first.create_invite(a.id, "expert", uses=1)
    clock.arm(lambda: second.redeem_invite(invite.token, 20))
    with pytest.raises(InvalidValue, match="used up"):
        first.redeem_invite(invite.token, 10)
    assert first.role_of(a.id, 20) == "expert" and first.role_of(a.id, 10) is None
    assert first.db["invites"].get(invite.token)["uses_left"] == 0


def test_a_member_redeeming_a_link_leaves_its_use(store, assistant):
    store.add_member(assistant.id, 2, "expert")
    invite = store.create_invite(assistant.id, "tester", uses=1)
    assert store.redeem_invite(invite.token, 2).role == "expert"  # not demoted either
    assert store.redeem_invite(invite.token, 1).role == "owner"
    assert store.db["invites"].get(invite.token)["uses_left"] == 1
    assert store.redeem_invite(invite.token, 3).role == "tester"
    assert store.db["invites"].get(invite.token)["uses_left"] == 0


def test_roles_change_only_for_members_and_an_owner_always_remains(store, assistant):
    store.add_member(assistant.id, 2, "tester")
    with pytest.raises(NotFound):
        store.set_member_role(assistant.id, 999, "owner")
    assert store.role_of(assistant.id, 999) is None
    for role in ("expert", "tester"):
        with pytest.raises(InvalidValue, match="last owner"):
            store.set_member_role(assistant.id, 1, role)
    with pytest.raises(InvalidValue, match="unknown role"):
        store.set_member_role(assistant.id, 2, "admin")
    assert store.role_of(assistant.id, 1) == "owner"
    assert store.set_member_role(assistant.id, 1, "owner").role == "owner"  # an owner staying owner is fine
    assert store.set_member_role(assistant.id, 2, "owner", by=1).role == "owner"
    assert store.set_member_role(assistant.id, 1, "tester", by=2).role == "tester"  # another owner remains
    with pytest.raises(InvalidValue, match="last owner"):
        store.set_member_role(assistant.id, 2, "expert")
    with pytest.raises(InvalidValue, match="last owner"):
        store.remove_member(assistant.id, 2)
    assert [(m.user_id, m.role) for m in store.list_members(assistant.id)] == [(1, "tester"), (2, "owner")]


def test_using_a_key_records_when_and_revoking_it_ends_that(db_path, assistant):
    now = [dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)]
    store = Store(open_db(db_path), clock=lambda: now[0])
    record, key = store.create_api_key(assistant.id, name="widget")
    assert record.last_used_at is None and store.lookup_api_key(key).last_used_at is None
    assert store.use_api_key(key).last_used_at == "2026-03-01 12:00:00"
    now[0] += dt.timedelta(seconds=API_KEY_TOUCH_S - 1)
    assert store.use_api_key(key).last_used_at == "2026-03-01 12:00:00"  # not one write per request
    now[0] += dt.timedelta(seconds=2)
    assert store.use_api_key(key).last_used_at == "2026-03-01 12:01:01"
    assert store.list_api_keys(assistant.id)[0].last_used_at == "2026-03-01 12:01:01"
    assert store.use_api_key("tb-unknown") is None
    assert store.revoke_api_key(record.id, by=1) is True
    assert store.use_api_key(key) is None
    assert store.revoke_api_key(record.id, by=1) is False
    assert [e.action for e in store.audit_entries(assistant_id=assistant.id)].count("apikey.revoke") == 1


def test_the_api_writes_last_used_at(store, assistant):
    from openai import OpenAI

    from inference_helpers import ServerThread
    from tuning.answering.api import create_api_app

    record, key = store.create_api_key(assistant.id)
    with ServerThread(create_api_app(store, None)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()][0] == "acme"
    [stored] = store.list_api_keys(assistant.id)
    assert stored.last_used_at is not None and stored.last_used_at >= record.created_at
