"""`tunebot publish` and `tunebot stats --customers`, run in-process on a real database."""

from __future__ import annotations

import json

import pytest

from bot.cli import main
from storage import Store, open_db


@pytest.fixture
def acme(data_dir, capsys) -> str:
    assert main(["assistants", "create", "acme"]) == 0
    capsys.readouterr()
    return "acme"


def run_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_publish_revoke_channels_and_unpublish(acme, data_dir, capsys):
    first = run_json(capsys, "publish", "--assistant", acme, "--bot", "AcmeBot")
    assert first["active"] and first["link"] and not first["groups"] and not first["business"]
    assert first["url"] == f"https://t.me/AcmeBot?start={first['token']}"
    assert first["token"].startswith("c_")
    assert run_json(capsys, "publish", "--assistant", acme, "--bot", "AcmeBot")["token"] == first["token"]
    changed = run_json(capsys, "publish", "--assistant", acme, "--groups", "on", "--link", "off",
                       "--greeting", "Hello from ACME")
    assert (changed["groups"], changed["link"], changed["greeting"]) == (True, False, "Hello from ACME")
    revoked = run_json(capsys, "publish", "--assistant", acme, "--revoke")
    assert revoked["token"] != first["token"]
    store = Store(open_db(data_dir / "tunebot.db"))
    assert store.publication_by_token(first["token"]) is None
    off = run_json(capsys, "publish", "--assistant", acme, "--unpublish")
    assert off["active"] is False and off["groups"] is True
    assert run_json(capsys, "publish", "--assistant", acme, "--show")["active"] is False
    assert run_json(capsys, "publish", "--assistant", acme)["active"] is True
    assert main(["publish", "--assistant", acme]) == 0
    text = capsys.readouterr().out
    assert "published" in text and f"?start={revoked['token']}" in text


def test_publish_errors_are_one_line(acme, capsys):
    assert main(["publish", "--assistant", "nobody"]) == 2
    assert "no assistant named 'nobody'" in capsys.readouterr().err
    assert main(["publish", "--assistant", acme, "--show"]) == 2
    assert "not published" in capsys.readouterr().err
    assert main(["publish", "--assistant", acme, "--greeting", "x" * 1001]) == 2
    assert "at most 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["publish", "--assistant", acme, "--revoke", "--unpublish"])


def test_customer_stats(acme, data_dir, capsys):
    store = Store(open_db(data_dir / "tunebot.db"))
    aid = store.assistant_by_name(acme).id
    store.publish(aid)
    customer = store.open_customer(aid, 77, 77)
    store.add_message(customer.conversation_id, "user", "Where is my parcel?")
    mid = store.add_message(customer.conversation_id, "assistant", "passed on", abstained=True)
    store.add_unanswered(aid, "Where is my parcel?", conversation_id=customer.conversation_id, message_id=mid)
    stats = run_json(capsys, "stats", "--assistant", acme, "--customers", "--days", "7")
    assert (stats["assistant"], stats["days"], stats["questions"], stats["dont_know"]) == (acme, 7, 1, 1)
    assert stats["open_customer_questions"] == 1 and stats["per_day"][0]["questions"] == 1
    assert main(["stats", "--assistant", acme, "--customers"]) == 0
    assert "questions 1, answered 0, don't know 1" in capsys.readouterr().out
    assert main(["stats", "--assistant", acme, "--customers", "--days", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
