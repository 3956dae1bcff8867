"""Reading and writing example files: every shape, every validation error with its line, round trips."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tuning.errors import FormatError
from tuning.data.formats import LineError, Record, read_examples
from tuning.data.writing import write_examples
from tuning.data.importing import dataset_stats, estimate_tokens, export_examples, import_file, line_ranges

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def jsonl(*objs) -> bytes:
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs).encode()


def errors_by_line(result) -> dict[int, LineError]:
    return {e.line: e for e in result.errors}


# ---------------------------------------------------------------- shapes

def test_three_jsonl_shapes_and_optional_fields():
    data = jsonl(
        {"question": "Q1", "answer": "A1"},
        {"prompt": "Q2", "completion": "A2", "split": "test", "must_contain": ["A2", " x "]},
        {"messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Q3"},
                      {"role": "assistant", "content": "A3"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q4"}]},
                      {"role": "assistant", "content": "A4"}], "split": "validation"},
    )
    result = read_examples(data)
    assert result.errors == []
    assert result.records == [
        Record("Q1", "A1", line=1),
        Record("Q2", "A2", must_contain=("A2", "x"), split="test", line=2),
        Record("Q3", "A3", line=3),
        Record("Q4", "A4", split="val", line=4),
    ]


def test_whitespace_blank_lines_crlf_and_bom():
    data = b"\xef\xbb\xbf" + b'{"question": "  Q1 ", "answer": "A1\\n"}\r\n\r\n   \n{"question": "Q2", "answer": "A2"}'
    result = read_examples(data)
    assert [(r.question, r.answer, r.line) for r in result.records] == [("Q1", "A1", 1), ("Q2", "A2", 4)]
    assert result.errors == []


def test_reads_paths_strings_and_text():
    by_path = read_examples(EXAMPLES / "acme_faq.jsonl")
    by_str = read_examples(str(EXAMPLES / "acme_faq.jsonl"))
    by_text = read_examples((EXAMPLES / "acme_faq.jsonl").read_text(encoding="utf-8"))
    assert len(by_path.records) == 40 and by_path.errors == []
    assert by_path == by_str == by_text


def test_every_validation_error_names_its_line():
    data = jsonl(
        {"question": "good", "answer": "fine"},                       # 1
        '{"question": "broken", "answer": "x"',                       # 2 invalid JSON
        "[1, 2]",                                                     # 3 not an object
        {"question": "only question"},                                # 4 missing answer
        {"answer": "only answer"},                                    # 5 missing question
        {"question": "   ", "answer": "x"},                           # 6 empty
        {"question": 42, "answer": "x"},                              # 7 wrong type
        {"question": "long", "answer": "x" * 101},                    # 8 over-long
        {"foo": "bar"},                                               # 9 unknown shape
        {"question": "GOOD!", "answer": "again"},                     # 10 duplicate of line 1
        {"question": "s", "answer": "a", "split": "holdout"},         # 11 bad split
        {"question": "m", "answer": "a", "must_contain": "a"},        # 12 must_contain not a list
        {"messages": [{"role": "user", "content": "only user"}]},     # 13 bad messages
        {"prompt": "p", "completion": None},                          # 14 null completion
    ) + b'{"question": "caf\xe9", "answer": "latin-1 byte"}\n'        # 15 not UTF-8
    result = read_examples(data, max_field_chars=100)
    assert [r.line for r in result.records] == [1]
    errors = errors_by_line(result)
    assert sorted(errors) == list(range(2, 16))
    expected = {
        2: ("invalid_json", "invalid JSON"), 3: ("not_object", "got array"), 4: ("missing", 'missing "answer"'),
        5: ("missing", 'missing "question"'), 6: ("empty", '"question" is empty'),
        7: ("wrong_type", '"question" must be a string, got number'),
        8: ("too_long", '"answer" is 101 characters long; the limit is 100'),
        9: ("unknown_shape", "found keys: foo"), 10: ("duplicate_in_file", "same question as line 1"),
        11: ("bad_split", "train, val or test"), 12: ("not_string_list", '"must_contain" must be a list of strings'),
        13: ("bad_messages", "one user and one assistant"), 14: ("missing", 'missing "completion"'),
        15: ("encoding", "not valid UTF-8 (byte 0xe9"),
    }
    for line, (code, text) in expected.items():
        assert errors[line].code == code, line
        assert text in errors[line].reason, (line, errors[line].reason)


def test_bad_lines_example_file_has_exactly_three_bad_lines():
    result = read_examples(EXAMPLES / "bad_lines.jsonl")
    assert len(result.records) == 17
    assert [(e.line, e.code) for e in result.errors] == [(4, "invalid_json"), (11, "missing"), (17, "wrong_type")]


@pytest.mark.parametrize("content, filename", [
    ("question,answer\nQ1,A1\n\"Q2, with comma\",\"A2\nover two lines\"\n", "f.csv"),
    ("Q;A\nQ1;A1\n\"Q2, with comma\";\"A2\nover two lines\"\n", "f.csv"),
    ("Вопрос\tОтвет\nQ1\tA1\n\"Q2, with comma\"\t\"A2\nover two lines\"\n", "f.tsv"),
    ("\ufeffPrompt,Completion\nQ1,A1\n\"Q2, with comma\",\"A2\nover two lines\"\n", None),
    ("id;вопрос;ответ\n1;Q1;A1\n2;\"Q2, with comma\";\"A2\nover two lines\"\n", "data.txt"),
])
def test_csv_variants(content, filename):
    result = read_examples(content.encode("utf-8"), filename=filename)
    assert result.errors == []
    assert [(r.question, r.answer, r.line) for r in result.records] == [
        ("Q1", "A1", 2), ("Q2, with comma", "A2\nover two lines", 3)]


def test_csv_errors_and_optional_columns():
    content = ("question,answer,must_contain,split\n"
               "Q1,A1 €4.90,€4.90|A1,test\n"        # 2 good
               "Q2,,,\n"                            # 3 empty answer
               "Q3,A3,,train,extra\n"               # 4 too many fields
               "Q4\n"                               # 5 missing answer
               "Q5,A5,,later\n").encode() + b"Q6,\xff\xfe,,\n"  # 6 bad split, 7 not UTF-8
    result = read_examples(content, filename="x.csv")
    assert result.records == [Record("Q1", "A1 €4.90", must_contain=("€4.90", "A1"), split="test", line=2)]
    assert [(e.line, e.code) for e in result.errors] == [
        (3, "empty"), (4, "csv_columns"), (5, "missing"), (6, "bad_split"), (7, "encoding")]


def test_csv_without_question_answer_header_is_a_format_error():
    with pytest.raises(FormatError, match="header needs a question column"):
        read_examples(b"name,email\nbob,bob@example.com\n", filename="people.csv")


@pytest.mark.parametrize("data, message", [
    (b"%PDF-1.7\n...", "PDF"),
    (b"PK\x03\x04rest-of-zip", "ZIP"),
    (b"\x00\x01\x02binary\x00stuff", "binary"),
    ("вопрос,ответ\nпривет,мир\n".encode("cp1251"), "not UTF-8"),
    (b'[\n{"question": "q", "answer": "a"}\n]\n', "one JSON array"),
])
def test_unusable_files_raise_format_error(data, message):
    with pytest.raises(FormatError, match=message):
        read_examples(data, filename="upload.bin" if b"PK" in data[:2] else None)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


def test_utf16_with_bom_is_converted():
    text = '{"question": "Привет?", "answer": "Здравствуйте."}\n'
    result = read_examples(text.encode("utf-16"))
    assert result.records == [Record("Привет?", "Здравствуйте.", line=1)]


# ---------------------------------------------------------------- writing

def test_write_jsonl_and_openai_with_system_prompt():
    buf = io.StringIO()
    assert write_examples([("Q", "A"), ("Вопрос", "Ответ")], buf, format="jsonl") == 2
    assert buf.getvalue().splitlines() == ['{"question": "Q", "answer": "A"}',
                                           '{"question": "Вопрос", "answer": "Ответ"}']
    buf = io.StringIO()
    write_examples([("Q", "A")], buf, format="openai", system_prompt="Be brief.")
    assert json.loads(buf.getvalue()) == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"}]}
    buf = io.StringIO()
    write_examples([("Q", "A")], buf, format="openai")
    assert [m["role"] for m in json.loads(buf.getvalue())["messages"]] == ["user", "assistant"]
    with pytest.raises(FormatError, match="unknown export format"):
        write_examples([("Q", "A")], io.StringIO(), format="xml")


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_round_trip_import_export_import(store, assistant, fmt):
    first = import_file(store, assistant.id, EXAMPLES / "acme_eval.jsonl", approve=True)
    assert first.added == 40
    buf = io.StringIO()
    assert export_examples(store, assistant.id, buf, format=fmt) == 40
    other = store.create_assistant("copy")
    again = import_file(store, other.id, buf.getvalue().encode(), filename=f"export.{fmt}.jsonl", approve=True)
    assert again.added == 40 and again.errors == []

    def content(aid):
        return [(e.question, e.answer) for e in store.list_examples(aid)]

    assert content(other.id) == content(assistant.id)
    if fmt == "jsonl":  # the richer format also keeps split and must_contain
        assert [(e.split, e.must_contain) for e in store.list_examples(other.id)] == \
               [(e.split, e.must_contain) for e in store.list_examples(assistant.id)]


def test_export_filters_by_status(store, assistant):
    report = import_file(store, assistant.id, EXAMPLES / "ru_faq.jsonl")
    store.approve(report.example_ids[0])
    buf = io.StringIO()
    assert export_examples(store, assistant.id, buf, status="approved") == 1
    assert export_examples(store, assistant.id, io.StringIO(), status="all") == 30
    store.delete_example(report.example_ids[1])
    assert export_examples(store, assistant.id, io.StringIO(), status="all") == 29


# ---------------------------------------------------------------- importing

def test_import_reports_bad_lines_and_db_duplicates(store, assistant):
    report = import_file(store, assistant.id, EXAMPLES / "bad_lines.jsonl", author_id=1)
    assert report.added == 17 and len(report.example_ids) == 17
    assert [e.line for e in report.errors] == [4, 11, 17]
    assert all(store.get_example(i).status == "pending" for i in report.example_ids)
    assert store.get_example(report.example_ids[0]).source == "import"
    text = report.summary()
    assert "Added 17 examples (pending review)." in text
    for line in (4, 11, 17):
        assert f"line {line}:" in text

    again = import_file(store, assistant.id, EXAMPLES / "bad_lines.jsonl")
    assert again.added == 0 and len(again.duplicates) == 17
    assert again.duplicates[0] == (1, report.example_ids[0])
    assert again.summary().startswith("Nothing new")
    assert "lines 1-3, 5-10, 12-16, 18-20" in again.summary()
    assert store.count_examples(assistant.id) == 17
    assert store.audit_entries(assistant_id=assistant.id)[0].details == {
        "filename": "bad_lines.jsonl", "added": 0, "duplicates": 17, "errors": 3}


def test_import_approve_split_must_contain_and_source(store, assistant):
    data = jsonl({"question": "Q", "answer": "A €5", "must_contain": ["€5"], "split": "test"})
    report = import_file(store, assistant.id, data, approve=True, source_kind="expert")
    ex = store.get_example(report.example_ids[0])
    assert (ex.status, ex.split, ex.must_contain, ex.source) == ("approved", "test", ["€5"], "expert")
    assert report.summary() == "Added 1 example (approved)."


def test_import_progress_callback(store, assistant):
    seen = []
    import_file(store, assistant.id, EXAMPLES / "acme_faq.jsonl", on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(40, 40)]  # one call per stored batch


def test_summary_truncates_long_error_lists(store, assistant):
    data = b"".join(b"not json %d\n" % i for i in range(30))
    report = import_file(store, assistant.id, data, filename="x.jsonl")
    assert report.added == 0 and len(report.errors) == 30
    assert report.summary(max_lines=20).endswith("… and 10 more")


def test_dataset_stats(store, assistant):
    report = import_file(store, assistant.id, EXAMPLES / "acme_faq.jsonl", approve=True)
    import_file(store, assistant.id, EXAMPLES / "acme_eval.jsonl")
    store.add_example(assistant.id, "How much is a small parcel, please", "€4.90.", source="synthetic",
                      status="pending", parent_id=report.example_ids[0], method="paraphrase")
    stats = dataset_stats(store, assistant.id)
    assert stats["total"] == 81
    assert stats["by_status"] == {"approved": 40, "pending": 41}
    assert stats["by_source"] == {"import": 80, "synthetic": 1}
    assert stats["by_split"] == {"test": 40, "train": 41}
    assert stats["variations"] == 1 and stats["with_must_contain"] == 40
    # the FAQ is ~1300 real tokens of text (SmolLM2 tokenizer) plus template and system prompt per example
    assert 1500 < stats["approved_tokens_estimate"] < 2600
    assert stats["all_tokens_estimate"] > 2 * 1200


def test_estimate_tokens_and_helpers():
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("Здравствуйте") > estimate_tokens("Hello there")
    assert line_ranges([5, 1, 2, 3, 9]) == "1-3, 5, 9"


def test_example_files_are_consistent():
    faq = read_examples(EXAMPLES / "acme_faq.jsonl")
    evals = read_examples(EXAMPLES / "acme_eval.jsonl")
    ru = read_examples(EXAMPLES / "ru_faq.jsonl")
    assert (len(faq.records), len(evals.records), len(ru.records)) == (40, 40, 30)
    assert not faq.errors and not evals.errors and not ru.errors
    faq_questions = {r.question for r in faq.records}
    for item in evals.records:
        assert item.question not in faq_questions and item.split == "test"
        assert item.must_contain and all(t.lower() in item.answer.lower() for t in item.must_contain)
    assert {r.answer for r in evals.records} == {r.answer for r in faq.records}
    assert all(any("а" <= ch <= "я" for ch in r.question.lower()) for r in ru.records)
