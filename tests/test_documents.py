"""Text out of txt, md, pdf and docx files, clear errors for the rest, and chunking."""

import io

import pytest

from tuning.data.documents import chunk_spans, chunk_text, extract_text, import_document
from tuning.errors import FormatError
from upload_helpers import pdf_from_streams


def make_pdf(lines: list[str]) -> bytes:
    """A minimal one-page PDF with a text layer (Helvetica), offsets computed for a valid xref."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for line in lines:
        ops.append("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*")
    ops.append("ET")
    return pdf_from_streams(["\n".join(ops).encode("latin-1")])


def test_txt_md_and_legacy_encoding():
    assert extract_text("faq.txt", "Доставка 2 дня.\r\n\r\n\r\n\r\nВозврат 30 дней.".encode()) == \
        "Доставка 2 дня.\n\nВозврат 30 дней."
    assert extract_text("faq.md", b"# Title\n\nSome *text*.") == "# Title\n\nSome *text*."
    assert extract_text("old.txt", "Привет, мир".encode("cp1251")) == "Привет, мир"
    assert extract_text("bom.txt", "\ufeffhello".encode("utf-8")) == "hello"


def test_pdf_text_layer():
    text = extract_text("terms.pdf", make_pdf(["ACME Parcel ships in two days.", "Returns are free (30 days)."]))
    assert "ACME Parcel ships in two days." in text and "Returns are free (30 days)." in text


def test_encrypted_and_empty_pdf():
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(make_pdf(["secret plans"]))))
    writer.encrypt("s3cret")
    buf = io.BytesIO()
    writer.write(buf)
    with pytest.raises(FormatError, match="password"):
        extract_text("locked.pdf", buf.getvalue())
    blank = PdfWriter()
    blank.add_blank_page(width=200, height=200)
    buf = io.BytesIO()
    blank.write(buf)
    with pytest.raises(FormatError, match="no text found.*OCR"):
        extract_text("scan.pdf", buf.getvalue())
    with pytest.raises(FormatError, match="not a readable PDF"):
        extract_text("broken.pdf", b"%PDF-1.4 garbage")


def test_docx_paragraphs_and_tables():
    import docx

    document = docx.Document()
    document.add_heading("ACME Parcel terms", 1)
    document.add_paragraph("Delivery takes two working days.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "Berlin"
    table.rows[0].cells[1].text = "2 days"
    buf = io.BytesIO()
    document.save(buf)
    text = extract_text("terms.docx", buf.getvalue())
    assert "ACME Parcel terms" in text and "Delivery takes two working days." in text and "Berlin | 2 days" in text
    with pytest.raises(FormatError, match="not a readable .docx"):
        extract_text("fake.docx", b"PK\x03\x04 not really a zip")


def test_wrong_type_size_binary_and_empty():
    with pytest.raises(FormatError, match="unsupported file type .exe"):
        extract_text("setup.exe", b"MZ")
    with pytest.raises(FormatError, match="limit is 0.0 MB"):
        extract_text("big.txt", b"x" * 2000, max_bytes=1000)
    with pytest.raises(FormatError, match="binary"):
        extract_text("bin.txt", b"\x00\x01\x02abc")
    with pytest.raises(FormatError, match="no text"):
        extract_text("empty.md", b"  \n\n ")


def test_chunking_respects_boundaries_and_offsets():
    text = ("Paragraph one sentence. " * 30).strip() + "\n\n" + ("Second part here. " * 30).strip()
    chunks = chunk_spans(text, max_chars=300)
    assert all(len(c.text) <= 300 for c in chunks)
    assert all(text[c.start:c.end].strip() == c.text for c in chunks)
    assert all(c.text.endswith(".") for c in chunks)  # cut at sentence ends, not mid-word
    assert "".join(text[c.start:c.end] for c in chunks).replace(" ", "").replace("\n", "") == \
        text.replace(" ", "").replace("\n", "")
    assert chunk_text("short", max_chars=100) == ["short"]
    assert chunks[1].ref.startswith("chunk 2 (chars ")


def test_import_document_stores_text(store, assistant):
    doc = import_document(store, assistant.id, "/tmp/x/faq.txt", b"We ship on Sundays.", uploaded_by=1)
    assert doc.filename == "faq.txt" and store.get_document(doc.id).text == "We ship on Sundays."
