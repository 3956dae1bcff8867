"""Whole-file errors (FormatError) carry a code and params, and the bot says them in the user's language."""

from __future__ import annotations

import ast
import codecs
import io
import re
from pathlib import Path

import pytest

from bot.telegram.common import error_reason
from bot.telegram.texts import LANGUAGES, catalogue
from test_documents import make_pdf
from tuning.data.documents import DocumentLimits, extract_text
from upload_helpers import docx_with_body, paragraphs, pdf_from_streams, plain_docx
from tuning.errors import FormatError, TuningError
from tuning.data.formats import read_examples
from tuning.data.writing import write_examples

ROOT = Path(__file__).resolve().parent.parent
SOURCES = tuple(ROOT / "tuning" / "data" / name for name in ("formats.py", "writing.py", "documents.py"))


def _pdf(*, aes: bool = False, password: str = "") -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(make_pdf(["secret plans"]))))
    writer.encrypt(user_password=password, owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    data = buf.getvalue()
    # AES-256 (V5/R6) needs the `cryptography` package, which is not installed: pypdf cannot open it
    return data.replace(b"/V 2", b"/V 5").replace(b"/R 3", b"/R 6") if aes else data


def _blank_pdf() -> bytes:
    from pypdf import PdfWriter

    blank = PdfWriter()
    blank.add_blank_page(width=200, height=200)
    buf = io.BytesIO()
    blank.write(buf)
    return buf.getvalue()


def bad_inputs(tmp_path: Path) -> dict[str, object]:
    """One call per whole-file error, keyed by the code it must raise."""
    examples = lambda data, name: lambda: read_examples(data, filename=name)  # noqa: E731
    document = lambda name, data, **kw: lambda: extract_text(name, data, **kw)  # noqa: E731
    calls = {
        "file_binary": examples(b"question,answer\x00\x01\x02", "faq.csv"),
        "file_pdf": examples(b"%PDF-1.4 ...", "faq.csv"),
        "file_zip": examples(b"PK\x03\x04 sheet", "faq.csv"),
        "file_gzip": examples(b"\x1f\x8b\x08 data", "faq.jsonl"),
        "file_png": examples(b"\x89PNG\r\n", "faq.jsonl"),
        "file_jpeg": examples(b"\xff\xd8\xff\xe0", "faq.jsonl"),
        "file_office": examples(b"\xd0\xcf\x11\xe0 xls", "faq.csv"),
        "not_utf8": examples('{"question": "Где", "answer": "тут"}\n'.encode("cp1251"), "faq.jsonl"),
        "bad_utf16": examples(codecs.BOM_UTF16_LE + b"q", "faq.csv"),
        "csv_header": examples("вопр,отв\nГде?,Тут.\n".encode(), "faq.csv"),
        "csv_header_nul": examples(b"question,ans\x00wer\nq,a\n", "faq.csv"),
        "csv_header_unreadable": examples(b'question,"' + b"x" * 140_000 + b'"\nq,a\n', "faq.csv"),
        "json_array": examples(b'[\n{"question": "q", "answer": "a"}\n]\n', "faq.json"),
        "file_missing": lambda: read_examples(tmp_path / "nowhere.jsonl"),
        "file_is_folder": lambda: read_examples(tmp_path),
        "export_format": lambda: write_examples([("q", "a")], io.StringIO(), format="xml"),
        "doc_bad_utf16": document("notes.txt", codecs.BOM_UTF16_LE + b"q"),
        "doc_binary": document("notes.txt", b"\x00\x01\x02abc"),
        "doc_not_utf8": document("notes.txt", b"\x98\x98 undefined in cp1251"),
        "doc_type": document("setup.exe", b"MZ"),
        "doc_no_suffix": document("README", b"text"),
        "doc_too_big": document("big.md", b"x" * 2000, max_bytes=1000),
        "doc_empty": document("empty.md", b"  \n\n "),
        "pdf_no_text": document("scan.pdf", _blank_pdf()),
        "pdf_password": document("locked.pdf", _pdf(password="s3cret")),
        "pdf_encryption": document("aes.pdf", _pdf(aes=True)),
        "pdf_unreadable": document("broken.pdf", b"%PDF-1.4 garbage"),
        "docx_unreadable": document("fake.docx", b"PK\x03\x04 not really a zip"),
        "doc_text_too_long": document("long.md", b"word " * 100, limits=DocumentLimits(max_text_chars=50)),
        "doc_unpacked_too_big": document("big.docx", plain_docx(), limits=DocumentLimits(max_unpacked_bytes=1000)),
        "doc_zip_bomb": document("bomb.docx", docx_with_body(paragraphs("A" * 2_000_000))),
        "doc_too_many_parts": document("parts.docx", plain_docx(), limits=DocumentLimits(max_members=3)),
        "pdf_too_many_pages": document("book.pdf", make_pdf(["one page"]), limits=DocumentLimits(max_pdf_pages=0)),
        "pdf_limit": document("deep.pdf", pdf_from_streams([b"BT /F1 12 Tf [" + b"(a) " * 100_001 + b"] TJ ET"])),
    }
    try:
        import cryptography  # noqa: F401  (with it, the AES file opens; no other file makes pypdf fail this way)
        del calls["pdf_encryption"]
    except ImportError:
        pass
    return calls


def raised(call) -> FormatError:
    with pytest.raises(FormatError) as info:
        call()
    return info.value


def codes_in_source() -> set[str]:
    """Every code given at a FormatError site (literal code=… or the _BINARY_MAGIC table); each site has one."""
    codes = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FormatError":
                code = next((k.value for k in node.keywords if k.arg == "code"), None)
                assert code is not None, f"{path.name}:{node.lineno}: FormatError without a code"
                if isinstance(code, ast.Constant):
                    codes.add(code.value)
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_BINARY_MAGIC":
                codes |= {entry.elts[0].value for entry in node.value.values}
    return codes


def test_every_format_error_site_has_a_code_with_texts_in_every_language(tmp_path):
    codes = codes_in_source()
    assert len(codes) >= 25, codes
    for lang in LANGUAGES:
        assert {f"error_{code}" for code in codes} <= set(catalogue(lang)), lang
    covered = set(bad_inputs(tmp_path))
    assert covered <= codes
    assert codes - covered <= {"pdf_encryption"}, codes - covered  # every code has a bad input below


def test_each_bad_file_raises_its_code_and_reads_in_russian(tmp_path):
    for code, call in bad_inputs(tmp_path).items():
        exc = raised(call)
        assert exc.code == code, (code, exc.code, str(exc))
        assert error_reason(exc, "en") == str(exc), code  # the English text is the CLI's message
        russian = error_reason(exc, "ru")
        assert russian != str(exc) and re.search("[а-я]{4}", russian), (code, russian)
        assert "{" not in russian and "}" not in russian, (code, russian)
        for name, value in exc.params.items():
            assert value in russian, (code, name, russian)
        english_only = set(re.findall(r"[a-z]{4,}", str(exc))) - set(re.findall(r"[a-z]{4,}", russian))
        assert english_only, (code, russian)  # translated, not just prefixed


def test_params_fill_the_russian_text():
    exc = raised(lambda: read_examples("вопр;отв\nГде?;Тут.\n".encode(), filename="faq.csv"))
    assert exc.params == {"line": "1", "found": "вопр, отв"}
    assert error_reason(exc, "ru").startswith("CSV, строка 1: в заголовке нужны столбец с вопросом")
    assert error_reason(exc, "ru").endswith("найдены: вопр, отв")
    big = raised(lambda: extract_text("big.md", b"x" * 3_000_000, max_bytes=2_000_000))
    assert error_reason(big, "ru") == "big.md: размер файла 3.0 МБ, а допустимо не больше 2.0 МБ"
    binary = raised(lambda: read_examples(b"\x00\x01", filename="data.csv"))
    assert error_reason(binary, "ru") == ("«data.csv» — двоичный файл, а не текстовый файл примеров "
                                          "в формате JSONL или CSV")


def test_without_a_code_or_its_params_the_english_message_is_shown():
    nameless = raised(lambda: read_examples(b"\x00\x01\x02"))  # content given directly: no file name to fill in
    assert nameless.code == "file_binary" and nameless.params == {}
    assert error_reason(nameless, "ru") == str(nameless) == "the file is binary, not a JSONL or CSV text file of examples"
    assert error_reason(TuningError("plain message"), "ru") == "plain message"
    assert error_reason(FormatError("new", code="brand_new_code", params={"x": 1}), "ru") == "new"
    assert error_reason(ValueError("not a domain error"), "ru") == "not a domain error"


def test_code_and_params_survive_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(FormatError("msg", code="doc_binary", params={"name": "a.txt"})))
    assert (str(exc), exc.code, exc.params) == ("msg", "doc_binary", {"name": "a.txt"})
