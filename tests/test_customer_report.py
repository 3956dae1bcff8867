"""The owners' report on customers: unanswered questions grouped by meaning with the retriever, and the chart."""

from __future__ import annotations

from tuning.customers import customer_report, group_similar, plot_customer_stats


def test_rewordings_join_one_group_and_unrelated_questions_stay_apart():
    groups = [{"question": "Do you ship to Mars?", "count": 3, "open": 1},
              {"question": "Can I pay in gold?", "count": 2, "open": 2},
              {"question": "do u ship to mars??", "count": 2, "open": 0},
              {"question": "Is payment in gold possible?", "count": 1, "open": 1},
              {"question": "What are your opening hours?", "count": 1, "open": 1}]
    merged = group_similar(groups)
    assert [(g["question"], g["count"], g["open"], g["wordings"]) for g in merged] == [
        ("Do you ship to Mars?", 5, 1, 2), ("Can I pay in gold?", 3, 3, 2), ("What are your opening hours?", 1, 1, 1)]
    assert group_similar(groups[:1]) == [dict(groups[0], wordings=1)] and group_similar([]) == []


def test_the_report_and_its_chart(store, assistant, tmp_path):
    store.publish(assistant.id)
    customer = store.open_customer(assistant.id, 9, 9)
    for question in ("Do you ship to Mars?", "do u ship to mars??"):
        store.add_message(customer.conversation_id, "user", question)
        mid = store.add_message(customer.conversation_id, "assistant", "passed on", abstained=True)
        store.add_unanswered(assistant.id, question, conversation_id=customer.conversation_id, message_id=mid)
    report = customer_report(store, assistant.id)
    assert report["questions"] == 2 and report["dont_know"] == 2
    assert [(g["count"], g["wordings"]) for g in report["frequent_unanswered"]] == [(2, 2)]
    plot_customer_stats(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
