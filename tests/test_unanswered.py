"""Answers that name their sources, and the questions the assistant could not answer, against real SQLite."""

from __future__ import annotations

import threading

import pytest

from storage import InvalidValue, NotFound, NotOpen, Store, StorageError, open_db


@pytest.fixture
def other(store):
    return store.create_assistant("globex", owner_id=2)


@pytest.fixture
def answer_message(store, assistant):
    conv = store.start_conversation(assistant.id, 50)
    store.add_message(conv, "user", "Do you ship to Mars?")
    return conv, store.add_message(conv, "assistant", "I'm not sure.", mode="grounded", sources=[3, 1],
                                   confidence=0.12, abstained=True)


# ----------------------------------------------------------------- messages

def test_message_keeps_sources_confidence_and_abstention(store, answer_message):
    _, mid = answer_message
    row = store.get_message(mid)
    assert (row["confidence"], row["abstained"]) == (0.12, 1)
    assert store.message_sources(mid) == [3, 1]


def test_message_defaults_stay_backwards_compatible(store, assistant):
    conv = store.start_conversation(assistant.id, 50)
    mid = store.add_message(conv, "assistant", "Two days.", latency_ms=12.0)
    row = store.get_message(mid)
    assert (row["sources"], row["confidence"], row["abstained"]) == (None, None, 0)
    assert store.message_sources(mid) == []
    assert store.message_sources(store.add_message(conv, "assistant", "x", sources=[])) == []
    with pytest.raises(NotFound):
        store.message_sources(9999)


def test_message_assistant_tells_whose_message_it_is(store, assistant, other, answer_message):
    _, mid = answer_message
    elsewhere = store.add_message(store.start_conversation(other.id, 60), "assistant", "Hi")
    assert store.message_assistant(mid) == assistant.id
    assert store.message_assistant(elsewhere) == other.id
    assert store.message_assistant(9999) is None


# ---------------------------------------------------------------- unanswered

def test_add_get_list_and_count(store, assistant, other, answer_message):
    conv, mid = answer_message
    first = store.add_unanswered(assistant.id, "  Do you ship to Mars?  ", user_id=50, conversation_id=conv,
                                 message_id=mid)
    second = store.add_unanswered(assistant.id, "Can I pay in gold?")
    store.add_unanswered(other.id, "Globex question?")
    assert (first.question, first.status, first.user_id, first.conversation_id, first.message_id) == (
        "Do you ship to Mars?", "open", 50, conv, mid)
    assert first.created_at and first.notified_at is None and first.example_id is None
    assert store.get_unanswered(first.id) == first
    assert [u.id for u in store.list_unanswered(assistant.id)] == [first.id, second.id]
    assert store.count_unanswered(assistant.id) == 2 and store.count_unanswered(other.id) == 1
    assert store.count_unanswered(assistant.id, status="answered") == 0
    assert len(store.list_unanswered(assistant.id, status=None)) == 2


def test_add_refuses_empty_questions_unknown_assistants_and_statuses(store, assistant):
    with pytest.raises(InvalidValue):
        store.add_unanswered(assistant.id, "   ")
    with pytest.raises(NotFound):
        store.add_unanswered(424242, "Anyone?")
    with pytest.raises(NotFound):
        store.get_unanswered(424242)
    with pytest.raises(InvalidValue):
        store.list_unanswered(assistant.id, status="closed")


def test_answered_item_becomes_an_approved_example_of_its_question(store, assistant):
    item = store.add_unanswered(assistant.id, "Do you ship to Mars?", user_id=50)
    ex = store.answer_unanswered(item.id, "  Not yet, only Earth.  ", by=7)
    assert (ex.question, ex.answer, ex.source, ex.status, ex.author_id, ex.reviewer_id) == (
        "Do you ship to Mars?", "Not yet, only Earth.", "expert", "approved", 7, 7)
    done = store.get_unanswered(item.id)
    assert (done.status, done.example_id, done.answered_by) == ("answered", ex.id, 7)
    assert done.answered_at
    assert store.count_unanswered(assistant.id) == 0
    assert store.list_unanswered(assistant.id, status="answered") == [done]
    assert [r.action for r in store.example_history(ex.id)] == ["create"]
    entry = store.audit_entries(assistant_id=assistant.id, limit=1)[0]
    assert (entry.action, entry.user_id, entry.details) == (
        "unanswered.answer", 7, {"item_id": item.id, "example_id": ex.id, "existing": False})


def test_answer_for_an_existing_question_updates_that_example(store, assistant):
    old = store.add_example(assistant.id, "Do you ship to Mars?", "Maybe.", status="pending")
    item = store.add_unanswered(assistant.id, "do you ship to mars")
    ex = store.answer_unanswered(item.id, "No, only Earth.", by=7)
    assert ex.id == old.id and (ex.answer, ex.status, ex.reviewer_id) == ("No, only Earth.", "approved", 7)
    assert [r.answer for r in store.example_history(ex.id)] == ["Maybe.", "No, only Earth."]
    assert store.count_examples(assistant.id) == 1
    assert store.get_unanswered(item.id).example_id == old.id


def test_double_answer_and_answer_after_dismiss_are_refused(store, assistant):
    item = store.add_unanswered(assistant.id, "Do you ship to Mars?")
    store.answer_unanswered(item.id, "No.", by=7)
    with pytest.raises(NotOpen, match="already answered"):
        store.answer_unanswered(item.id, "Yes.", by=8)
    assert issubclass(NotOpen, StorageError)
    assert store.count_examples(assistant.id) == 1 and store.get_example(
        store.get_unanswered(item.id).example_id).answer == "No."

    spam = store.add_unanswered(assistant.id, "Buy cheap watches")
    dismissed = store.dismiss_unanswered(spam.id, by=8)
    assert (dismissed.status, dismissed.answered_by, dismissed.example_id) == ("dismissed", 8, None)
    with pytest.raises(NotOpen, match="already dismissed"):
        store.answer_unanswered(spam.id, "No.", by=7)
    with pytest.raises(NotOpen):
        store.dismiss_unanswered(spam.id, by=7)
    assert store.audit_entries(assistant_id=assistant.id, limit=1)[0].action == "unanswered.dismiss"
    with pytest.raises(NotFound):
        store.answer_unanswered(424242, "x", by=7)


def test_failed_answer_changes_nothing(store, assistant):
    item = store.add_unanswered(assistant.id, "Do you ship to Mars?")
    with pytest.raises(InvalidValue):
        store.answer_unanswered(item.id, "   ", by=7)
    assert store.get_unanswered(item.id).status == "open" and store.count_examples(assistant.id) == 0


def test_concurrent_answers_make_one_example(db_path, store, assistant):
    item = store.add_unanswered(assistant.id, "Do you ship to Mars?")
    outcomes: list = []

    def answer(text: str) -> None:
        own = Store(open_db(db_path))
        try:
            outcomes.append(own.answer_unanswered(item.id, text, by=7).id)
        except NotOpen as exc:
            outcomes.append(exc)
        finally:
            own.db.conn.close()

    threads = [threading.Thread(target=answer, args=(f"Answer {i}.",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(isinstance(o, int) for o in outcomes) == 1 and sum(isinstance(o, NotOpen) for o in outcomes) == 3
    assert store.count_examples(assistant.id) == 1


def test_notification_queue_spans_assistants_and_empties_once_marked(store, assistant, other):
    a = store.add_unanswered(assistant.id, "First?")
    b = store.add_unanswered(other.id, "Second?")
    c = store.add_unanswered(assistant.id, "Third?")
    store.dismiss_unanswered(c.id, by=1)
    assert [u.id for u in store.unnotified_unanswered()] == [a.id, b.id]
    store.mark_unanswered_notified([a.id])
    assert [u.id for u in store.unnotified_unanswered()] == [b.id]
    assert store.get_unanswered(a.id).notified_at is not None
    store.mark_unanswered_notified([])
    store.mark_unanswered_notified([b.id])
    assert store.unnotified_unanswered() == []
    assert store.count_unanswered(assistant.id) == 1  # notified items stay open


def test_migration_applies_on_a_database_created_at_0004(db_path):
    old = open_db(db_path, migrate_to="0004_workers")
    assert "unanswered" not in old.table_names() and "sources" not in old["messages"].columns_dict
    acme = Store(old).create_assistant("acme", owner_id=7)
    conv = Store(old).start_conversation(acme.id, 7)
    old["messages"].insert({"conversation_id": conv, "role": "assistant", "text": "Old answer"})
    old.conn.close()

    new = open_db(db_path)
    assert "0005_grounding_and_unanswered" in {r["name"] for r in new["_migrations"].rows}
    assert {"sources", "confidence", "abstained"} <= set(new["messages"].columns_dict)
    assert "unanswered" in new.table_names()
    assert any(ix.columns == ["assistant_id", "status"] for ix in new["unanswered"].indexes)
    store = Store(new)
    [old_row] = new["messages"].rows
    assert old_row["abstained"] == 0 and store.message_sources(old_row["id"]) == []
    item = store.add_unanswered(acme.id, "New question?", conversation_id=conv, message_id=old_row["id"])
    assert store.answer_unanswered(item.id, "New answer.", by=7).status == "approved"


# ------------------------------------------------------- what the bot builds from them

def test_notices_one_per_owner_and_expert_in_their_language(store, assistant, other):
    from bot.telegram.handlers.review import unanswered_notices

    store.add_member(assistant.id, 10, "expert")
    store.add_member(assistant.id, 11, "expert")
    store.add_member(assistant.id, 12, "tester")
    store.set_user_language(11, "ru")
    a = store.add_unanswered(assistant.id, "Do you ship to Mars?")
    b = store.add_unanswered(other.id, "Globex question?")
    c = store.add_unanswered(assistant.id, "Can I pay in gold?")
    notices, ids = unanswered_notices(store, "en")
    assert sorted(ids) == sorted([a.id, b.id, c.id])
    by_user = dict(notices)
    assert len(notices) == len(by_user) == 4 and 12 not in by_user  # owners 1 and 2, experts 10 and 11
    assert by_user[1].startswith("❓ 2 new questions acme could not answer:")
    assert "• Do you ship to Mars?\n• Can I pay in gold?" in by_user[1] and "/review" in by_user[1]
    assert by_user[10] == by_user[1]
    assert by_user[11].startswith("❓ 2 новых вопроса") and "• Can I pay in gold?" in by_user[11]
    assert by_user[2].startswith("❓ 1 new question globex") and "Globex question?" in by_user[2]
    store.mark_unanswered_notified(ids)
    assert unanswered_notices(store, "en") == ([], [])


def test_long_notice_lists_ten_and_counts_the_rest(store, assistant):
    from bot.telegram.handlers.review import unanswered_notices

    for i in range(13):
        store.add_unanswered(assistant.id, f"Question number {i}?")
    [(chat_id, text)], ids = unanswered_notices(store, "ru")
    assert chat_id == 1 and len(ids) == 13
    assert text.startswith("❓ 13 новых вопросов") and text.count("• ") == 10 and "…и ещё 3" in text


def test_answer_buttons_by_role_sources_and_abstention():
    from types import SimpleNamespace

    from bot.telegram.handlers.chat import answer_buttons

    plain = SimpleNamespace(message_id=5, text="Two days.")  # an answer from before sources existed
    assert answer_buttons(plain, expert=True) == [[("👍", "fb:u:5"), ("👎", "fb:d:5"), ("✏️", "fb:e:5")]]
    grounded = SimpleNamespace(message_id=5, sources=((3, "How long?"),), abstained=False)
    assert answer_buttons(grounded, expert=False) == [[("👍", "fb:u:5"), ("👎", "fb:d:5"), ("✏️", "fb:e:5")]]
    assert answer_buttons(grounded, expert=True)[0][-1] == ("📚", "src:5")
    unsure = SimpleNamespace(message_id=6, sources=((3, "How long?"),), abstained=True)
    assert answer_buttons(unsure, expert=True) == [[("📚", "src:6")]]
    assert answer_buttons(unsure, expert=False) == []


def test_asked_at_uses_the_configured_timezone():
    from bot.telegram.handlers.review import asked_at

    assert asked_at("2026-01-01 12:00:00", "UTC") == "2026-01-01 12:00 UTC"
    assert asked_at("2026-01-01 12:00:00", "Europe/Moscow") == "2026-01-01 15:00 Europe/Moscow"
    assert asked_at("2026-01-01 12:00:00", "Nowhere/Else") == "2026-01-01 12:00 UTC"
    assert asked_at(None, "UTC") == "—"
