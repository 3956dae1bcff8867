"""Customers in storage, on real SQLite: publications and their links, customer sessions, unanswered items that
carry their customer, deliveries claimed once, feedback queueing, /forget, rate-limit counts and stats."""

from __future__ import annotations

import datetime as dt

import pytest

from storage import InvalidValue, NotFound, Store, open_db
from storage.customers import TOKEN_PREFIX

OWNER, ALICE, BOB = 1, 501, 502


class Clock:
    def __init__(self):
        self.now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cstore(db_path, clock) -> Store:
    return Store(open_db(db_path), clock=clock)


@pytest.fixture
def acme(cstore):
    return cstore.create_assistant("acme", owner_id=OWNER)


def ask(store: Store, customer, question: str, answer: str, *, abstained: bool = False):
    """What answering a customer leaves in storage: the question and the answer in the customer's conversation."""
    store.add_message(customer.conversation_id, "user", question)
    mid = store.add_message(customer.conversation_id, "assistant", answer, abstained=abstained)
    item = None
    if abstained:
        item = store.add_unanswered(customer.assistant_id, question, user_id=customer.user_id,
                                    conversation_id=customer.conversation_id, message_id=mid)
    return mid, item


def test_publishing_makes_one_link_that_revoking_replaces(cstore, acme):
    assert cstore.get_publication(acme.id) is None
    pub = cstore.publish(acme.id, by=OWNER)
    assert pub.token.startswith(TOKEN_PREFIX) and len(pub.token) <= 64
    assert pub.answers_on("link") and not pub.answers_on("groups") and not pub.answers_on("business")
    assert cstore.publication_by_token(pub.token).assistant_id == acme.id
    assert cstore.publish(acme.id).token == pub.token  # publishing again keeps the link
    new = cstore.regenerate_token(acme.id, by=OWNER)
    assert new.token != pub.token and cstore.publication_by_token(pub.token) is None
    assert cstore.publication_by_token(new.token).assistant_id == acme.id
    assert [e.action for e in cstore.audit_entries(assistant_id=acme.id)][:3] == [
        "publication.revoke", "publication.publish", "publication.publish"]


def test_channels_greeting_and_unpublishing(cstore, acme):
    with pytest.raises(NotFound, match="not published"):
        cstore.set_channel(acme.id, "groups", True)
    cstore.publish(acme.id)
    assert cstore.set_channel(acme.id, "groups", True).answers_on("groups")
    assert not cstore.set_channel(acme.id, "link", False).answers_on("link")
    with pytest.raises(InvalidValue, match="unknown channel"):
        cstore.set_channel(acme.id, "fax", True)
    assert cstore.set_greeting(acme.id, "  Hello! Ask me about parcels.  ").greeting == "Hello! Ask me about parcels."
    with pytest.raises(InvalidValue, match="at most"):
        cstore.set_greeting(acme.id, "x" * 1001)
    off = cstore.unpublish(acme.id)
    assert not off.answers_on("groups") and off.groups == 1  # settings kept for publishing again
    assert cstore.publish(acme.id).answers_on("groups")


def test_a_link_session_ends_with_unpublishing_revoking_and_deleting(cstore, acme):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE, language="ru")
    assert cstore.link_customer(ALICE) == alice and cstore.link_customer(BOB) is None
    assert alice.conversation_id and cstore.message_customer(
        cstore.add_message(alice.conversation_id, "user", "hi")) == alice.id
    cstore.unpublish(acme.id)
    assert cstore.link_customer(ALICE) is None
    cstore.publish(acme.id)
    assert cstore.link_customer(ALICE).id == alice.id
    cstore.regenerate_token(acme.id)
    assert cstore.link_customer(ALICE) is None  # the old link no longer counts; opening the new one does
    assert cstore.open_customer(acme.id, ALICE, ALICE).id == alice.id and cstore.link_customer(ALICE).id == alice.id
    cstore.set_channel(acme.id, "link", False)
    assert cstore.link_customer(ALICE) is None


def test_the_latest_link_opened_is_the_current_one(cstore, acme, clock):
    globex = cstore.create_assistant("globex", owner_id=OWNER)
    cstore.publish(acme.id)
    cstore.publish(globex.id)
    cstore.open_customer(acme.id, ALICE, ALICE)
    clock.now += dt.timedelta(seconds=5)
    assert cstore.open_customer(globex.id, ALICE, ALICE).assistant_id == globex.id
    assert cstore.link_customer(ALICE).assistant_id == globex.id
    cstore.unpublish(globex.id)
    assert cstore.link_customer(ALICE).assistant_id == acme.id


def test_unanswered_items_carry_their_customer_and_chat(cstore, acme):
    cstore.publish(acme.id)
    group_alice = cstore.open_customer(acme.id, ALICE, -100123, channel="groups")
    _, item = ask(cstore, group_alice, "Do you ship to Mars?", "passed on", abstained=True)
    assert (item.customer_id, item.chat_id) == (group_alice.id, -100123)
    team = cstore.start_conversation(acme.id, OWNER)
    plain = cstore.add_unanswered(acme.id, "A tester's question?", user_id=OWNER, conversation_id=team)
    assert plain.customer_id is None and plain.chat_id is None
    other = cstore.create_assistant("globex")
    # a conversation of another assistant's customer never lends its customer to this assistant's item
    crossed = cstore.add_unanswered(other.id, "Crossed?", conversation_id=group_alice.conversation_id)
    assert crossed.customer_id is None


def test_team_answers_are_delivered_once_and_only_to_their_customer(cstore, acme):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    bob = cstore.open_customer(acme.id, BOB, BOB)
    _, mars = ask(cstore, alice, "Do you ship to Mars?", "passed on", abstained=True)
    _, gold = ask(cstore, bob, "Can I pay in gold?", "passed on", abstained=True)
    assert cstore.undelivered_team_answers() == []
    cstore.answer_unanswered(mars.id, "Earth only.", by=OWNER)
    [(item, answer, customer)] = cstore.undelivered_team_answers()
    assert (item.id, answer, customer.user_id, customer.chat_id) == (mars.id, "Earth only.", ALICE, ALICE)
    assert cstore.claim_delivery(mars.id) and not cstore.claim_delivery(mars.id)
    assert cstore.undelivered_team_answers() == []
    cstore.release_delivery(mars.id)
    assert [i.id for i, _, _ in cstore.undelivered_team_answers()] == [mars.id]
    cstore.dismiss_unanswered(gold.id, by=OWNER)
    assert [i.id for i, _, _ in cstore.undelivered_team_answers()] == [mars.id]
    example = cstore.get_example(cstore.get_unanswered(mars.id).example_id)
    assert (example.question, example.answer, example.status) == ("Do you ship to Mars?", "Earth only.", "approved")


def test_thumbs_down_queues_the_question_once(cstore, acme):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    mid, _ = ask(cstore, alice, "How long does delivery take?", "A week.")
    item = cstore.queue_customer_question(mid)
    assert (item.question, item.customer_id, item.message_id) == ("How long does delivery take?", alice.id, mid)
    assert cstore.queue_customer_question(mid) is None
    team = cstore.start_conversation(acme.id, OWNER)
    with pytest.raises(NotFound):
        cstore.queue_customer_question(cstore.add_message(team, "assistant", "x"))


def test_forget_blanks_what_the_customer_sent_and_keeps_only_counts(cstore, acme):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    bob = cstore.open_customer(acme.id, BOB, BOB)
    ask(cstore, alice, "My address is 5 Secret Lane", "Noted.")
    _, item = ask(cstore, alice, "Where is parcel 42 for Alice?", "passed on", abstained=True)
    bob_mid, _ = ask(cstore, bob, "Bob's question", "Bob's answer")
    globex = cstore.create_assistant("globex")
    cstore.publish(globex.id)
    ask(cstore, cstore.open_customer(globex.id, ALICE, ALICE), "Globex question", "Globex answer")
    counts = cstore.forget_customer(ALICE)
    assert counts == {"messages": 6, "questions": 1}
    counts = {"messages": 4, "questions": 1}  # acme's share
    texts = [r["text"] for r in cstore.db.query("select text from messages where conversation_id = ?",
                                                 [alice.conversation_id])]
    assert texts == ["", "", "", ""]
    gone = cstore.get_unanswered(item.id)
    assert (gone.question, gone.status) == ("—", "dismissed")
    assert cstore.get_message(bob_mid)["text"] == "Bob's answer"
    entry = cstore.audit_entries(assistant_id=acme.id)[0]
    assert (entry.action, entry.details) == ("customer.forget", counts)
    assert "Secret" not in str(entry.details) and cstore.get_customer(alice.id).forgotten_at
    assert cstore.audit_entries(assistant_id=globex.id)[0].details == {"messages": 2, "questions": 0}
    assert cstore.forget_customer(999) == {"messages": 0, "questions": 0}


def test_rate_limit_counts_questions_per_user_and_assistant(cstore, acme, clock):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    for i in range(3):
        ask(cstore, alice, f"q{i}", "a")
        clock.now += dt.timedelta(seconds=20)
    minute_ago = clock.now - dt.timedelta(seconds=59)
    assert cstore.customer_questions_since(acme.id, ALICE, minute_ago) == 2
    assert cstore.customer_questions_since(acme.id, ALICE, clock.now - dt.timedelta(days=1)) == 3
    assert cstore.customer_questions_since(acme.id, BOB, minute_ago) == 0


def test_stats_count_customers_only(cstore, acme, clock):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    bob = cstore.open_customer(acme.id, BOB, BOB)
    up, _ = ask(cstore, alice, "How long?", "Two days.")
    cstore.set_feedback(up, "up")
    _, mars = ask(cstore, alice, "Do you ship to Mars?", "passed on", abstained=True)
    _, mars2 = ask(cstore, bob, "do you ship to mars", "passed on", abstained=True)
    down, _ = ask(cstore, bob, "Price?", "Ten.")
    cstore.set_feedback(down, "down")
    team = cstore.start_conversation(acme.id, OWNER)  # the team's own chats are not counted
    cstore.add_message(team, "user", "internal")
    clock.now += dt.timedelta(minutes=30)
    cstore.answer_unanswered(mars.id, "Earth only.", by=OWNER)
    stats = cstore.customer_stats(acme.id)
    assert stats["per_day"] == [{"day": "2026-12-01", "questions": 4, "answered": 2, "dont_know": 2}]
    assert (stats["questions"], stats["share_answered"], stats["share_dont_know"]) == (4, 0.5, 0.5)
    assert (stats["thumbs_up"], stats["thumbs_down"]) == (1, 1)
    assert (stats["team_answers"], stats["team_answer_minutes_median"]) == (1, 30.0)
    assert stats["open_customer_questions"] == 1
    assert stats["frequent_unanswered"] == [{"question": "Do you ship to Mars?", "count": 2, "open": 1}]
    empty = cstore.customer_stats(cstore.create_assistant("globex").id)
    assert (empty["questions"], empty["share_answered"], empty["per_day"]) == (0, None, [])


def test_groups_and_business_connections(cstore, acme):
    assert cstore.group_assistant(-100) is None
    cstore.link_group(-100, acme.id, by=OWNER, title="Acme customers")
    assert cstore.group_assistant(-100) == acme.id
    cstore.unlink_group(-100)
    assert cstore.group_assistant(-100) is None
    cstore.save_business_connection("bc1", assistant_id=acme.id, user_id=OWNER, user_chat_id=OWNER,
                                    can_reply=True, enabled=True)
    assert cstore.business_connection("bc1")["can_reply"] == 1
    cstore.save_business_connection("bc1", assistant_id=acme.id, user_id=OWNER, user_chat_id=OWNER,
                                    can_reply=False, enabled=False)
    assert cstore.business_connection("bc1")["enabled"] == 0 and cstore.business_connection("nope") is None


def test_a_persons_own_reply_in_a_business_chat_becomes_a_pending_example(cstore, acme):
    cstore.publish(acme.id)
    buyer = cstore.open_customer(acme.id, ALICE, ALICE, channel="business", business_connection_id="bc1")
    assert cstore.human_answered(buyer.id, "Anything?", by=OWNER) is None  # nothing open: nothing to pair
    _, item = ask(cstore, buyer, "Do you gift-wrap?", "passed on", abstained=True)
    assert cstore.human_answered(buyer.id, "   ", by=OWNER) is None
    example = cstore.human_answered(buyer.id, "Yes, for free.", by=OWNER)
    assert (example.question, example.answer, example.status, example.author_id) == (
        "Do you gift-wrap?", "Yes, for free.", "pending", OWNER)
    done = cstore.get_unanswered(item.id)
    assert (done.status, done.example_id) == ("answered", example.id) and done.delivered_at  # nothing to send
    assert cstore.undelivered_team_answers() == []
    assert cstore.human_answered(buyer.id, "Again.", by=OWNER) is None


def test_the_team_may_answer_a_customers_question_in_its_general_form(cstore, acme):
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    _, item = ask(cstore, alice, "Where is parcel 42 for Alice Smith?", "passed on", abstained=True)
    example = cstore.answer_unanswered(item.id, "Track it on acme.test/track.", by=OWNER,
                                       question="Where is my parcel?")
    assert (example.question, example.answer) == ("Where is my parcel?", "Track it on acme.test/track.")
    [(delivered, answer, _)] = cstore.undelivered_team_answers()
    assert delivered.question == "Where is parcel 42 for Alice Smith?" and answer == "Track it on acme.test/track."



def test_each_customer_gets_the_answer_given_to_their_own_item(cstore, acme):
    """The same question asked twice is one example in the end; each customer still gets what was answered to
    them, and a later edit of the example changes nothing already answered."""
    cstore.publish(acme.id)
    alice = cstore.open_customer(acme.id, ALICE, ALICE)
    bob = cstore.open_customer(acme.id, BOB, BOB)
    _, first = ask(cstore, alice, "Do you ship to Mars?", "passed on", abstained=True)
    _, second = ask(cstore, bob, "Do you ship to Mars?", "passed on", abstained=True)
    example = cstore.answer_unanswered(first.id, "Not yet.", by=OWNER)
    assert cstore.answer_unanswered(second.id, "Not before 2030.", by=OWNER).id == example.id
    cstore.edit_example(example.id, answer="Edited later.", by=OWNER)
    sent = {customer.user_id: answer for _, answer, customer in cstore.undelivered_team_answers()}
    assert sent == {ALICE: "Not yet.", BOB: "Not before 2030."}
