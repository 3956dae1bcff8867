"""Hostile uploads (issue 13): zip and PDF bombs, overlong text, malformed JSONL and CSV lines, bad limits."""

from __future__ import annotations

import json
import random
import time

import pytest

from bot.cli import build_parser, main
from bot.config import SettingsError, load_settings
from tuning.data.documents import DocumentLimits, extract_text, import_document
from tuning.errors import FormatError
from tuning.data.formats import read_examples
from tuning.data.quickform import parse_quick_form
from tuning.data.importing import import_file
from upload_helpers import docx_with_body, paragraphs, pdf_from_streams, show_text, understate_size


def refused(call) -> FormatError:
    with pytest.raises(FormatError) as info:
        call()
    return info.value


def words(n_chars: int, *, seed: int = 0) -> str:
    """Plain prose-like text (compresses about as well as real text does)."""
    rng = random.Random(seed)
    vocab = ["parcel", "delivery", "returns", "Berlin", "days", "the", "of", "free", "within", "customs", "über",
             "доставка", "возврат", "2", "30", "tracking", "number", "office", "weekend", "insurance"]
    out, size = [], 0
    while size < n_chars:
        word = rng.choice(vocab)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


# ------------------------------------------------------------------ documents
def test_a_docx_zip_bomb_is_refused_before_it_is_parsed(store, assistant):
    bomb = docx_with_body(paragraphs("A" * 100_000) * 30)  # ~30 KB that unpacks to 3 M characters
    assert len(bomb) < 40_000
    exc = refused(lambda: import_document(store, assistant.id, "bomb.docx", bomb))
    assert exc.code == "doc_zip_bomb"
    assert "word/document.xml" in str(exc) and "the limit is 100" in str(exc) and "zip bomb" in str(exc)
    assert store.list_documents(assistant.id) == []  # nothing stored


def test_a_docx_whose_headers_understate_its_size_is_refused():
    """Regression guard: the member is read with the declared size as a cap, so it cannot unpack past it."""
    bomb = docx_with_body(paragraphs("A" * 100_000) * 30)
    liar = understate_size(bomb, "word/document.xml", 1000)
    exc = refused(lambda: extract_text("liar.docx", liar))
    assert exc.code == "docx_unreadable"


def test_every_member_of_a_docx_counts_toward_the_unpacked_size():
    blob = random.Random(1).randbytes(300_000)  # incompressible: the ratio check does not fire
    data = docx_with_body(paragraphs("Delivery takes two days."), extra={"word/media/a.bin": blob, "b.bin": blob})
    limits = DocumentLimits(max_unpacked_bytes=500_000)
    exc = refused(lambda: extract_text("photos.docx", data, limits=limits))
    assert exc.code == "doc_unpacked_too_big"
    assert "the limit is 0.5 MB" in str(exc) and ".txt" in str(exc)
    assert "Delivery takes two days." in extract_text("photos.docx", data)  # the default limit takes it


def test_a_docx_with_too_many_parts_is_refused():
    data = docx_with_body(paragraphs("x"), extra={f"junk/{i}.xml": b"<a/>" for i in range(40)})
    exc = refused(lambda: extract_text("parts.docx", data, limits=DocumentLimits(max_members=30)))
    assert exc.code == "doc_too_many_parts" and "the limit is 30" in str(exc)


def test_a_docx_with_a_huge_member_count_is_refused_before_zipfile_reads_its_directory():
    """150,000 empty parts: zipfile's directory alone would take ~100 MB; the end record's count refuses it first."""
    import tracemalloc

    data = docx_with_body(paragraphs("x"), extra={f"j/{i}": b"" for i in range(30_000)})
    tracemalloc.start()
    try:
        exc = refused(lambda: extract_text("many.docx", data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.code == "doc_too_many_parts" and int(exc.params["count"]) > 30_000
    assert peak < len(data) + 5_000_000  # no object per member (zipfile's ~700 bytes each would be ~20 MB)


def test_text_past_the_limit_is_refused_in_every_format():
    text = words(1_100_000)
    docx = docx_with_body(paragraphs(*(text[i:i + 1000] for i in range(0, len(text), 1000))))
    pdf = pdf_from_streams([show_text(words(1_100_000, seed=2).encode("ascii", "replace").decode())], flate=True)
    for name, data in (("long.docx", docx), ("long.pdf", pdf), ("long.md", text.encode())):
        exc = refused(lambda: extract_text(name, data))
        assert exc.code == "doc_text_too_long", name
        assert "more than 1,000,000 characters" in str(exc) and "split it into smaller files" in str(exc)
    assert len(extract_text("fits.md", words(900_000).encode())) > 800_000


def test_a_pdf_with_too_many_pages_is_refused_before_extraction():
    pdf = pdf_from_streams([show_text("page")] * 1001)
    exc = refused(lambda: extract_text("book.pdf", pdf))
    assert exc.code == "pdf_too_many_pages" and "1001 pages; the limit is 1000" in str(exc)


def test_a_pdf_stream_bomb_is_refused_with_a_clear_message():
    pdf = pdf_from_streams([b" " * 80_000_000 + show_text("x")], flate=True)  # 80 MB of spaces in ~80 KB
    assert len(pdf) < 200_000
    exc = refused(lambda: extract_text("bomb.pdf", pdf))
    assert exc.code == "pdf_limit" and "safety limit" in str(exc)


def test_a_nul_in_a_pdf_text_layer_is_dropped_not_stored():
    assert extract_text("nul.pdf", pdf_from_streams([show_text("a\x00b c")])) == "ab c"


# ------------------------------------------------------------------ JSONL lines
GOOD_1 = b'{"question": "How long does delivery take?", "answer": "Two days."}'
GOOD_2 = b'{"prompt": "Are returns free?", "completion": "Yes, within 30 days."}'


def test_malformed_jsonl_lines_are_line_errors_and_the_good_lines_are_imported(store, assistant):
    lines = [
        GOOD_1,                                                                   # 1
        b'{"question": ' + b"[" * 100_000,                                        # 2 RecursionError
        b'{"question": "q", "answer": "a", "n": 1' + b"0" * 5000 + b"}",          # 3 int digits limit
        b'{"question": "lone \\udc00 half", "answer": "a"}',                      # 4 lone surrogate
        b'{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "\\ud800"}]}',  # 5
        b'{"question": "x", "answer": "y", "must_contain": ["\\udfff"]}',         # 6 in must_contain
        b'{"question": "nul\\u0000", "answer": "a"}',                             # 7 NUL
        b'{"\\ud800": 1, ' + b", ".join(b'"k%d": 1' % i for i in range(10_000)) + b"}",  # 8 keys in the message
        b'{"question": "deep split", "answer": "a", "split": ' + b"[" * 900 + b"]" * 900 + b"}",  # 9
        GOOD_2,                                                                   # 10
    ]
    report = import_file(store, assistant.id, b"\n".join(lines) + b"\n", filename="hostile.jsonl")
    assert report.added == 2
    assert [(e.line, e.code) for e in report.errors] == [
        (2, "too_deep"), (3, "number_too_long"), (4, "surrogate"), (5, "surrogate"), (6, "surrogate"),
        (7, "nul"), (8, "unknown_shape"), (9, "bad_split")]
    assert "more than 4300 digits" in report.errors[1].reason
    assert '"question" contains \\udc00' in report.errors[2].reason
    assert '"assistant content" contains \\ud800' in report.errors[3].reason
    for error in report.errors:  # every reason can be printed, stored and sent
        assert len(error.reason) < 500, error
        error.reason.encode("utf-8")
        json.dumps(report.as_dict(), ensure_ascii=False).encode("utf-8")
    report.summary().encode("utf-8")
    questions = sorted(e.question for e in store.list_examples(assistant.id))
    assert questions == ["Are returns free?", "How long does delivery take?"]


# ------------------------------------------------------------------ CSV lines
def test_a_nul_byte_anywhere_in_a_csv_is_a_line_error():
    head = b"question,answer\nq1,a1\nq\x002,a2\nq3,a3\n"
    tail = b"".join(b"filler %d,answer\n" % i for i in range(1000)) + b"late,nul\x00here\nlast,one\n"
    result = read_examples(head + tail, filename="faq.csv")
    nul_lines = [e.line for e in result.errors if e.code == "nul"]
    assert nul_lines == [3, 1005]
    assert {"q1", "q3", "filler 999", "last"} <= {r.question for r in result.records}
    assert len(result.records) == 1003
    assert all("\x00" not in r.question + r.answer for r in result.records)


def test_a_nul_byte_in_the_csv_header_is_a_clear_file_error():
    exc = refused(lambda: read_examples(b"question,ans\x00wer\nq,a\n", filename="faq.csv"))
    assert exc.code == "csv_header_nul" and str(exc).startswith("CSV line 1: the header contains a NUL")


def test_an_unterminated_quote_names_the_line_it_starts_on():
    data = b'question,answer\nq1,a1\nq2,a2\n"q3,a3\nq4,a4\nq5,a5\n'
    result = read_examples(data, filename="faq.csv")
    assert [r.question for r in result.records] == ["q1", "q2"]
    [error] = result.errors
    assert (error.line, error.code) == (4, "csv_unterminated")
    assert "never closed" in error.reason and "closing quote" in error.reason
    closed = read_examples(b'question,answer\n"multi\nline",a\nq,"a\nb"\n', filename="faq.csv")
    assert [(r.question, r.line) for r in closed.records] == [("multi\nline", 2), ("q", 4)] and not closed.errors


# ------------------------------------------------------------------ quick form
def test_the_quick_form_parses_the_usual_spellings():
    assert parse_quick_form("Q: How long? A: 2 days") == ("How long?", "2 days")
    assert parse_quick_form("В: Сколько?\nО: 2 дня") == ("Сколько?", "2 дня")
    assert parse_quick_form("question:Where?\n\nanswer:  Berlin ") == ("Where?", "Berlin")
    assert parse_quick_form("Вопрос: а?\nОтвет: б") == ("а?", "б")
    assert parse_quick_form("Q: What is the data: format?\nA: JSONL") == ("What is the data: format?", "JSONL")
    # a label ends a word, never a word's last letter; of several, one starting a line or a sentence wins
    assert parse_quick_form("В: Терминал в Домодедово: какой адрес? О: Улица Ленина, 5.") == (
        "Терминал в Домодедово: какой адрес?", "Улица Ленина, 5.")
    assert parse_quick_form("Q: What is plan A: basic? A: Cheap.") == ("What is plan A: basic?", "Cheap.")
    assert parse_quick_form("Q: Which plan? A: Plan A: basic.") == ("Which plan?", "Plan A: basic.")
    assert parse_quick_form("Q: Which plan A: the cheap one\nA: Plan A: basic.") == (
        "Which plan A: the cheap one", "Plan A: basic.")
    for text in ("hello", "Q: no answer", "Q: A: x", "Q: x\nA:  ", "", None, "A: x Q: y"):
        assert parse_quick_form(text) is None, text


def test_the_quick_form_takes_linear_time_on_adversarial_messages():
    """The old pattern backtracked for hours on these (4,096 characters: Telegram's longest message)."""
    n = 4096
    hostile = ["Q:" + " " * n, "Q: x" + " " * n + "y", "Q: x" + "\n " * (n // 2), "Q:" + " a" * (n // 2),
               "Q: " + "a:" * (n // 2), "Q: " + "\n" * n + "A", " " * n, "Q: " + "Q: " * (n // 3)]
    start = time.perf_counter()
    for text in hostile:
        parse_quick_form(text)
    assert time.perf_counter() - start < 2.0  # milliseconds in fact; hours before


# ------------------------------------------------------------------ limits from settings and the CLI
@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_settings also reads ./tunebot.toml
    return tmp_path


@pytest.mark.parametrize("raw, message", [
    ("nan", "expected a finite number, got 'nan'"), ("inf", "expected a finite number, got 'inf'"),
    ("-inf", "expected a finite number"), ("-1", "must not be negative"), ("0", "must be greater than 0"),
])
def test_an_unusable_upload_limit_is_refused_at_startup(in_tmp, raw, message):
    with pytest.raises(SettingsError) as info:
        load_settings({"TUNEBOT_MAX_UPLOAD_MB": raw})
    assert str(info.value).startswith("TUNEBOT_MAX_UPLOAD_MB: ") and message in str(info.value)


def test_nan_from_the_toml_file_and_other_zero_limits_are_refused(in_tmp):
    (in_tmp / "tunebot.toml").write_text("[tunebot]\nmax_upload_mb = nan\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="max_upload_mb: expected a finite number"):
        load_settings({})
    (in_tmp / "tunebot.toml").unlink()
    for name in ("TUNEBOT_JOB_MAX_ATTEMPTS", "TUNEBOT_MAX_FIELD_CHARS", "TUNEBOT_GENERATOR_CONCURRENCY"):
        with pytest.raises(SettingsError, match=f"{name}: must be greater than 0"):
            load_settings({name: "0"})
    assert load_settings({"TUNEBOT_TEMPERATURE": "0", "TUNEBOT_WORKER_SLOTS": "0"}).temperature == 0.0


def test_the_cli_stops_with_one_line_for_a_nan_upload_limit(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("TUNEBOT_DATA_DIR", str(in_tmp / "data"))
    monkeypatch.setenv("TUNEBOT_MAX_UPLOAD_MB", "nan")
    assert main(["assistants", "list"]) == 2
    assert capsys.readouterr().err == "tunebot: error: TUNEBOT_MAX_UPLOAD_MB: expected a finite number, got 'nan'\n"


@pytest.mark.parametrize("slots, message", [("-1", "must be at least 1, got -1"), ("0", "must be at least 1, got 0"),
                                            ("two", "expected a whole number of at least 1, got 'two'")])
def test_worker_slots_below_one_are_refused(slots, message, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["worker", "--slots", slots])
    assert info.value.code == 2
    assert f"argument --slots: {message}" in capsys.readouterr().err
    assert build_parser().parse_args(["worker", "--slots", "2"]).slots == 2

