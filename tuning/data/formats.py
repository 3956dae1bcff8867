"""Example files read defensively: JSONL (three shapes) and CSV, with one error per bad line (tuning.data.writing
writes them, tuning.data.quickform reads the "Q: … A: …" chat form)."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.records import NewExample
from storage.text import normalize_question
from tuning.errors import FormatError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
QUESTION_COLUMNS = ("question", "q", "вопрос", "prompt", "input", "instruction")
ANSWER_COLUMNS = ("answer", "a", "ответ", "completion", "output", "response")
MUST_CONTAIN_COLUMNS = ("must_contain", "must contain")
SPLIT_COLUMNS = ("split",)

# Why a line was skipped, in English, keyed by code; `{…}` are filled from LineError.params. The bot
# shows the same reasons in the user's language from its text catalogue (keys "line_error_<code>").
MESSAGES: dict[str, str] = {
    "encoding": "not valid UTF-8 (byte 0x{byte} at column {column}); save the file as UTF-8",
    "invalid_json": "invalid JSON: {detail} at column {column}",
    "too_deep": "nested too deeply to read; each line is one JSON object with a question and an answer",
    "number_too_long": "a number has more than {limit} digits; write it as a string",
    "surrogate": ("\"{field}\" contains {escape}, half of a UTF-16 surrogate pair without the other half, which is "
                  "not a character; fix or remove that escape"),
    "nul": "contains a NUL character (byte 0x00), which text cannot hold; remove it (the file may be damaged)",
    "not_object": "expected a JSON object like {{\"question\": …, \"answer\": …}}, got {kind}",
    "unknown_shape": ("no question/answer fields: use {{\"question\",\"answer\"}}, {{\"prompt\",\"completion\"}} "
                      "or {{\"messages\": […]}} (found keys: {keys})"),
    "missing": "missing \"{field}\"",
    "empty": "\"{field}\" is empty",
    "wrong_type": "\"{field}\" must be a string, got {kind}",
    "not_string_list": "\"{field}\" must be a list of strings, got {kind}",
    "too_long": "\"{field}\" is {length} characters long; the limit is {limit}",
    "bad_split": "\"split\" must be train, val or test, got {value}",
    "messages_not_list": "\"messages\" must be [system?, user, assistant]: expected a list of objects",
    "bad_messages": ("\"messages\" must be [system?, user, assistant]: got roles {roles}; "
                     "one user and one assistant message are supported"),
    "duplicate_in_file": "same question as line {other}",
    "csv_columns": "{count} fields but the header has {expected}; quote fields that contain \"{delimiter}\"",
    "csv_error": "cannot parse CSV: {detail}",
    "csv_unterminated": "a quoted field starts on this line and is never closed; add the missing closing quote (\")",
    "storage": "not saved: {detail}",
}


@dataclass(frozen=True)
class Record(NewExample):
    """One readable question–answer pair (an example to add, split "train" unless the file says) and the line it
    started on."""

    line: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class LineError:
    """A line that was skipped: the reason in English, and its code and params for other languages."""

    line: int
    reason: str
    code: str = ""
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ReadResult:
    """The good records and the per-line errors of one file."""

    records: list[Record]
    errors: list[LineError]


_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_PARAM_CHARS = 200


def _shown(value: Any) -> str:
    """A parameter of a message as printable text: lone surrogates escaped, at most _MAX_PARAM_CHARS long."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 1] + "…"


class _Skip(Exception):
    """Internal: the current line is bad; carries its LineError."""

    def __init__(self, code: str, **params: Any):
        self.code = code
        self.params = tuple((k, _shown(v)) for k, v in params.items())
        super().__init__(MESSAGES[code].format(**dict(self.params)))


def line_error(line: int, code: str, **params: Any) -> LineError:
    """Build a LineError from a message code and its parameters."""
    skip = _Skip(code, **params)
    return LineError(line, str(skip), code, skip.params)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _check_chars(value: str, field: str) -> str:
    """Refuse what cannot be stored or shown as text: lone surrogates (from \\uD800-style escapes) and NUL."""
    if bad := _SURROGATE.search(value):
        raise _Skip("surrogate", field=field, escape=f"\\u{ord(bad.group()):04x}")
    if "\x00" in value:
        raise _Skip("nul")
    return value


def _text(value: Any, field: str, limit: int) -> str:
    if value is None:
        raise _Skip("missing", field=field)
    if not isinstance(value, str):
        raise _Skip("wrong_type", field=field, kind=_type_name(value))
    value = _check_chars(value, field).strip()
    if not value:
        raise _Skip("empty", field=field)
    if len(value) > limit:
        raise _Skip("too_long", field=field, length=len(value), limit=limit)
    return value


def _must_contain(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Skip("not_string_list", field="must_contain", kind=_type_name(value))
    tokens = tuple(_check_chars(v, "must_contain").strip() for v in value if v.strip())
    return tokens or None


def _split(value: Any) -> str:
    if value is None or value == "":
        return "train"
    if not isinstance(value, str) or value.strip().lower() not in SPLIT_NAMES:
        raise _Skip("bad_split", value=json.dumps(value, ensure_ascii=False)[:_MAX_PARAM_CHARS])
    return SPLIT_NAMES[value.strip().lower()]


def _content(message: dict) -> Any:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts) and parts:
            return "".join(parts)
    return content


def _from_messages(messages: Any, limit: int) -> tuple[str, str]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Skip("messages_not_list")
    roles = [m.get("role") for m in messages]
    if roles and roles[0] == "system":  # a per-line system prompt is accepted and ignored
        messages, roles = messages[1:], roles[1:]
    if roles != ["user", "assistant"]:
        raise _Skip("bad_messages", roles=roles)
    return (_text(_content(messages[0]), "user content", limit),
            _text(_content(messages[1]), "assistant content", limit))


def record_from_object(obj: Any, *, line: int, max_field_chars: int = 4000) -> Record:
    """Validate one decoded JSON value and turn it into a Record (raises _Skip)."""
    if not isinstance(obj, dict):
        raise _Skip("not_object", kind=_type_name(obj))
    if "messages" in obj:
        question, answer = _from_messages(obj["messages"], max_field_chars)
    elif "question" in obj or "answer" in obj:
        question = _text(obj.get("question"), "question", max_field_chars)
        answer = _text(obj.get("answer"), "answer", max_field_chars)
    elif "prompt" in obj or "completion" in obj:
        question = _text(obj.get("prompt"), "prompt", max_field_chars)
        answer = _text(obj.get("completion"), "completion", max_field_chars)
    else:
        raise _Skip("unknown_shape", keys=", ".join(map(str, obj)) or "none")
    return Record(question, answer, _split(obj.get("split")), _must_contain(obj.get("must_contain")), line=line)


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Skip("encoding", byte=f"{raw[exc.start]:02x}", column=exc.start + 1) from None


def _read_jsonl(data: bytes, limit: int) -> tuple[list[Record], list[LineError]]:
    records, errors = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            records.append(_record_from_line(raw, number, limit))
        except _Skip as skip:
            errors.append(LineError(number, str(skip), skip.code, skip.params))
    return records, errors


def _record_from_line(raw: bytes, number: int, limit: int) -> Record:
    text = _decode_line(raw)
    try:
        return record_from_object(json.loads(text), line=number, max_field_chars=limit)
    except json.JSONDecodeError as exc:
        raise _Skip("invalid_json", detail=exc.msg, column=exc.colno) from None
    except RecursionError:  # [[[[… deeper than the interpreter's stack, or a message repr that deep
        raise _Skip("too_deep") from None
    except ValueError as exc:
        if "digits" in str(exc):  # Python refuses to convert integers longer than its int_max_str_digits
            raise _Skip("number_too_long", limit=sys.get_int_max_str_digits()) from None
        raise _Skip("invalid_json", detail=str(exc), column=1) from None


def _find_column(header: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _sniff_delimiter(first_line: str, filename: str | None) -> str:
    if filename and filename.lower().endswith(".tsv"):
        return "\t"
    counts = {d: first_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


_NOT_UTF8 = "the file is not UTF-8 text (another encoding, such as Windows-1251?); save it as UTF-8"


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


class _Lines:
    """The text's lines for csv.reader; `ended` turns true once the reader asks past the last one."""

    def __init__(self, text: str):
        self._text = io.StringIO(text, newline="")
        self.ended = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self._text.readline()
        if not line:
            self.ended = True
            raise StopIteration
        return line


def _read_csv(data: bytes, limit: int, filename: str | None) -> tuple[list[Record], list[LineError]]:
    """One pass over the rows, each fault named at its line (kept whole: the checks depend on the header read first)."""
    # surrogateescape keeps undecodable bytes so the bad line can be named instead of failing the file
    text = data.decode("utf-8", errors="surrogateescape")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = _sniff_delimiter(first, filename)
    lines = _Lines(text)
    reader = csv.reader(lines, delimiter=delimiter)
    header_line, header = 0, None
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                header_line, header = reader.line_num, [c.strip().lower() for c in row]
                break
    except csv.Error as exc:
        raise FormatError(f"CSV line {reader.line_num}: cannot read the header ({exc})", code="csv_header_unreadable",
                          params={"line": reader.line_num, "detail": exc}) from None
    if header is None:
        return [], []
    if any(_has_surrogates(cell) for cell in header):
        raise FormatError(_NOT_UTF8, code="not_utf8")
    if any("\x00" in cell for cell in header):
        raise FormatError(f"CSV line {header_line}: the header contains a NUL character (byte 0x00); remove it "
                          "(the file may be damaged)", code="csv_header_nul", params={"line": header_line})
    q_col, a_col = _find_column(header, QUESTION_COLUMNS), _find_column(header, ANSWER_COLUMNS)
    if q_col is None or a_col is None:
        found = ", ".join(header)
        raise FormatError(
            f"CSV line {header_line}: the header needs a question column and an answer column "
            f"(question/answer, q/a, вопрос/ответ or prompt/completion); found: {found}",
            code="csv_header", params={"line": header_line, "found": found})
    mc_col, split_col = _find_column(header, MUST_CONTAIN_COLUMNS), _find_column(header, SPLIT_COLUMNS)
    names = {q_col: header[q_col], a_col: header[a_col]}
    records, errors = [], []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(line_error(start, "csv_error", detail=str(exc)))
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        try:
            if lines.ended:  # the reader ran out of lines inside this row: a quote opened here is never closed
                raise _Skip("csv_unterminated")
            for cell in row:
                if _has_surrogates(cell):
                    _decode_line(cell.encode("utf-8", errors="surrogateescape"))
            if any("\x00" in cell for cell in row):
                raise _Skip("nul")
            if len(row) > len(header):
                raise _Skip("csv_columns", count=len(row), expected=len(header),
                            delimiter="\\t" if delimiter == "\t" else delimiter)
            cell = lambda i: row[i] if i is not None and i < len(row) else None  # noqa: E731
            must = cell(mc_col)
            must_contain = tuple(t.strip() for t in must.replace(";", "|").split("|") if t.strip()) if must else None
            records.append(Record(_text(cell(q_col), names[q_col], limit), _text(cell(a_col), names[a_col], limit),
                                  _split(cell(split_col)), must_contain or None, line=number))
        except _Skip as skip:
            errors.append(LineError(number, str(skip), skip.code, skip.params))
    return records, errors


_BINARY_MAGIC = {  # magic -> (error code, what it is in English)
    b"%PDF": ("file_pdf", "a PDF document"),
    b"PK\x03\x04": ("file_zip", "a ZIP archive (an .xlsx or .docx file?)"),
    b"\x1f\x8b": ("file_gzip", "a gzip archive"),
    b"\x89PNG": ("file_png", "a PNG image"),
    b"\xff\xd8\xff": ("file_jpeg", "a JPEG image"),
    b"\xd0\xcf\x11\xe0": ("file_office", "an old Office document"),
}


def _load_bytes(source: str | Path | bytes) -> tuple[bytes, str | None]:
    """The file's bytes and its name (None when the content itself was given)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), None
    if isinstance(source, str) and ("\n" in source or source.lstrip()[:1] in ("{", "[")):
        return source.encode("utf-8"), None  # text content rather than a path
    path = Path(source)
    try:
        return path.read_bytes(), path.name
    except FileNotFoundError:
        raise FormatError(f"file {str(path)!r} does not exist", code="file_missing",
                          params={"path": path}) from None
    except IsADirectoryError:
        raise FormatError(f"{str(path)!r} is a folder, not a file", code="file_is_folder",
                          params={"path": path}) from None


def _check_text(data: bytes, filename: str | None) -> bytes:
    """Reject files that are clearly not text; convert UTF-16 (with a BOM) to UTF-8."""
    for bom, codec in ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(codec).encode("utf-8")
            except UnicodeDecodeError:
                raise FormatError("the file says it is UTF-16 but is not; save it as UTF-8", code="bad_utf16") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    name = f"{filename!r} " if filename else "the file "
    # without a file name the bot's texts cannot be filled and it shows the English message
    params = {"name": filename} if filename else {}
    for magic, (code, what) in _BINARY_MAGIC.items():
        if data.startswith(magic):
            raise FormatError(f"{name}is {what}, not a JSONL or CSV file of examples", code=code, params=params)
    if _looks_binary(data[:8192]):
        raise FormatError(f"{name}is binary, not a JSONL or CSV text file of examples", code="file_binary",
                          params=params)
    return data


_CONTROL_BYTES = re.compile(rb"[\x01-\x08\x0e-\x1a]")


def _looks_binary(head: bytes) -> bool:
    """NUL bytes with other control bytes, or many NULs (UTF-16 without a BOM); a stray NUL is a line error instead."""
    nuls = head.count(b"\x00")
    return bool(nuls) and (bool(_CONTROL_BYTES.search(head)) or (nuls > 3 and nuls * 10 > len(head)))


def detect_format(data: bytes, filename: str | None = None) -> str:
    """"jsonl" or "csv", from the file name's extension or else the first character."""
    suffix = Path(filename).suffix.lower() if filename else ""
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "jsonl" if data.lstrip()[:1] in (b"{", b"[") else "csv"


def read_examples(source: str | Path | bytes, *, filename: str | None = None,
                  max_field_chars: int = 4000) -> ReadResult:
    """Read a JSONL or CSV file of examples: good records plus one LineError per bad line.

    `source` is a path, the file's bytes, or (a str with a newline or starting with "{") its text.
    Raises FormatError when the file as a whole is unusable (binary, not text, no header).
    """
    data, name = _load_bytes(source)
    filename = filename or name
    data = _check_text(data, filename)
    if detect_format(data, filename) == "jsonl":
        if data.lstrip()[:1] == b"[" and b"\n" in data.strip():
            raise FormatError("the file is one JSON array; write one JSON object per line (JSONL) instead",
                              code="json_array")
        records, errors = _read_jsonl(data, max_field_chars)
    else:
        records, errors = _read_csv(data, max_field_chars, filename)
    if not records and errors and all(e.code == "encoding" for e in errors):
        raise FormatError(_NOT_UTF8, code="not_utf8")
    seen: dict[str, int] = {}
    unique = []
    for record in records:
        key = normalize_question(record.question)
        if key in seen:
            errors.append(line_error(record.line, "duplicate_in_file", other=seen[key]))
            continue
        seen[key] = record.line
        unique.append(record)
    errors.sort(key=lambda e: e.line)
    return ReadResult(unique, errors)
