"""Property-based tests of every parser of user bytes: JSONL, CSV, txt/md, docx, pdf and the quick chat form.

The property everywhere: no exception but the project's own domain errors (FormatError for a whole file,
LineError entries for bad lines), and everything valid in the input is kept. Examples are derandomized so
that `make test` is repeatable; Hypothesis still shrinks any failure to a small input.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import Store, open_db
from storage.text import normalize_question
from tuning.data.documents import extract_text
from tuning.errors import FormatError
from tuning.data.formats import MESSAGES, read_examples
from tuning.data.quickform import parse_quick_form
from tuning.data.importing import import_file
from upload_helpers import docx_with_body, paragraphs, pdf_from_streams, show_text

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW_FUZZ = settings(FUZZ, max_examples=25)  # docx and pdf parse through python-docx / pypdf

# Text a user could mean as a question or an answer: no NUL, no lone surrogates, not blank.
field_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1,
                     max_size=40).filter(lambda s: s.strip())
hostile_json = st.sampled_from([
    b"[" * 5000, b'{"question": ' + b"[" * 3000, b'{"question": "q", "answer": "a", "n": 1' + b"9" * 5000 + b"}",
    b'{"question": "\\ud800", "answer": "a"}', b'{"question": "q", "answer": "\\udfff\\u0000"}',
    b'{"\\udc80": "key"}', b'{"messages": [{"role": "\\ud800"}]}', b'{"question": "q", "answer": "a", "split": {}}',
    b'{"question": "q", "answer": "a", "must_contain": [1e999]}', b"NaN", b'"\\ud83d\\ude00"', b"\xff\xfe\x00",
    b'{"question": 1' + b"0" * 4300 + b', "answer": "a"}', b"{" * 100, b'{"a":' * 2000,
])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
junk_line = st.one_of(
    st.binary(max_size=60),
    hostile_json,
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda q, a: json.dumps({"question": q, "answer": a}).encode(), json_values, json_values),
).map(lambda b: b.replace(b"\n", b" "))


def valid_record(q: str, a: str, shape: int) -> bytes:
    obj = [{"question": q, "answer": a}, {"prompt": q, "completion": a},
           {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}][shape]
    return json.dumps(obj, ensure_ascii=shape == 1).encode()


valid_line = st.tuples(field_text, field_text, st.integers(0, 2))
jsonl_file = st.tuples(valid_line, st.lists(st.one_of(valid_line, junk_line), max_size=12))


def kept_or_duplicate(result, valid: dict[int, tuple[str, str]]) -> None:
    """Every valid line is a record with its text, or a duplicate of an earlier line's question."""
    records = {r.line: r for r in result.records}
    errors = {e.line: e for e in result.errors}
    for line, (q, a) in valid.items():
        if line in records:
            assert (records[line].question, records[line].answer) == (q.strip(), a.strip())
        else:
            assert errors[line].code == "duplicate_in_file", (line, errors.get(line))
            assert normalize_question(q.strip()) in {normalize_question(r.question) for r in result.records}


def printable(result) -> None:
    for error in result.errors:
        assert error.code in MESSAGES, error
        assert "\x00" not in error.reason and len(error.reason) < 1000, error
        error.reason.encode("utf-8")  # no lone surrogates: the bot can send it, SQLite can store it
    for record in result.records:
        (record.question + record.answer).encode("utf-8")
        assert "\x00" not in record.question + record.answer


def build_jsonl(first, rest) -> tuple[bytes, dict[int, tuple[str, str]]]:
    lines, valid = [], {}
    for number, item in enumerate([first, *rest], start=1):
        if isinstance(item, tuple):
            q, a, shape = item
            lines.append(valid_record(q, a, shape))
            valid[number] = (q, a)
        else:
            lines.append(item)
    return b"\n".join(lines) + b"\n", valid


@FUZZ
@given(jsonl_file)
def test_jsonl_keeps_every_valid_line_and_reports_the_rest(file):
    data, valid = build_jsonl(*file)
    try:
        result = read_examples(data, filename="fuzz.jsonl")
    except FormatError as exc:  # NUL with other control bytes in junk lines: a binary file
        assert exc.code == "file_binary", exc
        return
    printable(result)
    kept_or_duplicate(result, valid)


@SLOW_FUZZ
@given(jsonl_file)
def test_importing_fuzzed_jsonl_into_sqlite_never_crashes_and_stores_the_valid_lines(file):
    data, valid = build_jsonl(*file)
    with tempfile.TemporaryDirectory() as folder:
        store = Store(open_db(Path(folder) / "fuzz.db"))
        assistant = store.create_assistant("fuzz", owner_id=1)
        try:
            report = import_file(store, assistant.id, data, filename="fuzz.jsonl")
        except FormatError as exc:
            assert exc.code == "file_binary", exc
            return
        report.summary().encode("utf-8")
        stored = {normalize_question(e.question) for e in store.list_examples(assistant.id)}
        assert report.added == len(stored)
        assert {normalize_question(q.strip()) for q, _ in valid.values()} <= stored


# ------------------------------------------------------------------ CSV
# A junk line stays on its own line (no quotes, no line breaks) so that it cannot swallow the valid rows.
csv_junk = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters='"\n\r'), max_size=40),
    st.binary(max_size=40).map(lambda b: b.replace(b'"', b"").replace(b"\n", b"").replace(b"\r", b"")),
    st.sampled_from(["a,b,c,d", "\x00", "x,\x00", ",", "q\x00,a", "only one field"]),
)


@FUZZ
@given(st.lists(st.one_of(st.tuples(field_text, field_text), csv_junk), min_size=1, max_size=12),
       st.sampled_from(["question,answer", "q,a", "Вопрос;Ответ", "prompt\tcompletion"]))
def test_csv_keeps_every_valid_row_and_reports_the_rest(rows, header):
    delimiter = ";" if ";" in header else "\t" if "\t" in header else ","
    parts, valid = [header.encode() + b"\n"], []
    for row in rows:
        if isinstance(row, tuple):
            out = io.StringIO()
            # the writer leaves a lone "\r" unquoted, which any reader takes for a line break
            quoting = csv.QUOTE_ALL if "\r" in "".join(row) else csv.QUOTE_MINIMAL
            csv.writer(out, delimiter=delimiter, lineterminator="\n", quoting=quoting).writerow(row)
            parts.append(out.getvalue().encode())
            valid.append(row)
        else:  # raw bytes stay raw: invalid UTF-8 is a line error too
            parts.append((row.encode() if isinstance(row, str) else row) + b"\n")
    try:
        result = read_examples(b"".join(parts), filename="fuzz.tsv" if delimiter == "\t" else "fuzz.csv")
    except FormatError as exc:  # NUL with other control bytes in junk lines: a binary file
        assert exc.code == "file_binary" or (exc.code == "not_utf8" and not valid), exc
        return
    printable(result)
    kept = {(r.question, r.answer) for r in result.records}
    questions = {normalize_question(r.question) for r in result.records}
    for q, a in valid:
        assert (q.strip(), a.strip()) in kept or normalize_question(q.strip()) in questions, (q, a)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["x.csv", "x.tsv", "x.jsonl", None]))
def test_random_bytes_as_an_example_file_give_only_domain_errors(data, filename):
    try:
        result = read_examples(b"question,answer\n" + data if filename == "x.csv" else data, filename=filename)
    except FormatError:
        return
    printable(result)


# ------------------------------------------------------------------ txt / md
@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["notes.txt", "notes.md", "notes.markdown"]))
def test_random_bytes_as_a_text_document_give_text_or_a_domain_error(data, name):
    try:
        text = extract_text(name, data)
    except FormatError:
        return
    assert text.strip() and "\x00" not in text
    text.encode("utf-8")


@FUZZ
@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00\ufeff"), max_size=300))
def test_a_utf8_text_document_keeps_every_word(text):
    try:
        out = extract_text("notes.txt", text.encode("utf-8"))
    except FormatError as exc:
        assert exc.code == "doc_empty" and not text.split()
        return
    assert out.split() == text.split()


# ------------------------------------------------------------------ docx
xml_text = st.text(st.characters(categories=("L", "N", "P", "Zs"), exclude_characters="<>&\u00a0"),
                   min_size=1, max_size=30).filter(lambda s: s.strip())


@SLOW_FUZZ
@given(st.lists(xml_text, min_size=1, max_size=8))
def test_a_docx_keeps_every_word_of_its_paragraphs(texts):
    out = extract_text("fuzz.docx", docx_with_body(paragraphs(*texts)))
    assert out.split() == " ".join(texts).split()


member_names = st.sampled_from(["[Content_Types].xml", "_rels/.rels", "word/document.xml",
                                "word/_rels/document.xml.rels", "word/styles.xml", "docProps/core.xml", "x/../../y"])
member_data = st.one_of(st.binary(max_size=200), st.sampled_from([
    b"<?xml version='1.0'?><!DOCTYPE a [<!ENTITY e 'x'><!ENTITY f '&e;&e;&e;&e;'>]><a>&f;</a>",
    b"<Types xmlns='http://schemas.openxmlformats.org/package/2006/content-types'/>",
    b"<w:document xmlns:w='http://schemas.openxmlformats.org/wordprocessingml/2006/main'><w:body/></w:document>",
    b"<" * 1000, b"\x00" * 100,
]))


def small_zip(members: list[tuple[str, bytes]], compression: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


@SLOW_FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(small_zip, st.lists(st.tuples(member_names, member_data), max_size=6, unique_by=lambda m: m[0]),
              st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])),
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)).map(
        lambda cut: _damage(docx_with_body(paragraphs("Delivery takes two days.")), *cut)),
))
def test_random_bytes_and_zips_as_a_docx_give_text_or_a_domain_error(data):
    try:
        text = extract_text("fuzz.docx", data)
    except FormatError:
        return
    text.encode("utf-8")


def _damage(data: bytes, at: int, junk: bytes) -> bytes:
    at %= len(data)
    return data[:at] + junk + data[at + len(junk):]


# ------------------------------------------------------------------ pdf
GOOD_PDF = pdf_from_streams([show_text("Returns are free within 30 days."), show_text("Page two.")])


@SLOW_FUZZ
@given(st.one_of(
    st.binary(max_size=300).map(lambda b: b"%PDF-1.4\n" + b),
    st.binary(max_size=300),
    st.tuples(st.integers(0, len(GOOD_PDF)), st.binary(min_size=1, max_size=8)).map(
        lambda cut: _damage(GOOD_PDF, *cut)),
    st.lists(st.binary(max_size=80), min_size=1, max_size=3).map(pdf_from_streams),
))
def test_random_and_damaged_pdfs_give_text_or_a_domain_error(data):
    try:
        text = extract_text("fuzz.pdf", data)
    except FormatError:
        return
    assert "\x00" not in text
    text.encode("utf-8")


# ------------------------------------------------------------------ the quick "Q: … A: …" form
@FUZZ
@given(st.text(max_size=200) | st.builds(lambda a, b, c: a + "Q:" + b + "A:" + c, st.text(max_size=5),
                                          st.text(max_size=60), st.text(max_size=60)))
def test_the_quick_form_gives_a_full_pair_or_nothing(text):
    pair = parse_quick_form(text)
    assert pair is None or all(part and part == part.strip() for part in pair)


@FUZZ
@given(field_text.filter(lambda s: ":" not in s and "：" not in s), field_text,
       st.sampled_from([("Q:", "A:"), ("q :", "\nanswer:"), ("В:", "О:"), ("Вопрос：", "Ответ:")]),
       st.sampled_from([" ", "\n", "\n\n", "  \n "]))
def test_the_quick_form_keeps_the_question_and_answer_as_typed(question, answer, labels, gap):
    pair = parse_quick_form(f"{labels[0]} {question}{gap}{labels[1]} {answer}")
    assert pair == (question.strip(), answer.strip())
