"""Documents: plain text out of txt, md, pdf (pypdf) and docx (python-docx) files, and chunks of it."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from tuning.errors import FormatError

SUPPORTED = (".txt", ".md", ".markdown", ".pdf", ".docx")
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # character offsets into the document text
    end: int
    text: str

    @property
    def ref(self) -> str:
        return f"chunk {self.index + 1} (chars {self.start}-{self.end})"


def _decode_text(data: bytes, filename: str) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise FormatError(f"{filename}: damaged UTF-16 text", code="doc_bad_utf16",
                              params={"name": filename}) from None
    if b"\x00" in data[:4096]:
        raise FormatError(f"{filename}: looks like a binary file, not text", code="doc_binary",
                          params={"name": filename})
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1251")  # the usual legacy encoding of Russian text files
    except UnicodeDecodeError:
        raise FormatError(f"{filename}: not UTF-8 text; save it as UTF-8 and try again", code="doc_not_utf8",
                          params={"name": filename}) from None


def _pdf_text(data: bytes, filename: str) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise FormatError(f"{filename}: the PDF is password-protected; remove the password and upload it again",
                              code="pdf_password", params={"name": filename})
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except FormatError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise FormatError(f"{filename}: not a readable PDF ({exc})", code="pdf_unreadable",
                          params={"name": filename, "detail": exc}) from None
    except Exception as exc:  # pypdf raises several internal types on damaged files
        if "crypt" in str(exc).lower():
            raise FormatError(f"{filename}: the PDF is encrypted in a way that cannot be opened",
                              code="pdf_encryption", params={"name": filename}) from None
        detail = f"{type(exc).__name__}: {exc}"
        raise FormatError(f"{filename}: not a readable PDF ({detail})", code="pdf_unreadable",
                          params={"name": filename, "detail": detail}) from None


def _docx_text(data: bytes, filename: str) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, OSError) as exc:
        raise FormatError(f"{filename}: not a readable .docx file ({exc})", code="docx_unreadable",
                          params={"name": filename, "detail": exc}) from None
    except Exception as exc:  # zipfile.BadZipFile and lxml errors on damaged files
        raise FormatError(f"{filename}: not a readable .docx file ({type(exc).__name__})", code="docx_unreadable",
                          params={"name": filename, "detail": type(exc).__name__}) from None
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n".join(parts)


def extract_text(filename: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The text of a txt/md/pdf/docx file; FormatError for a wrong type, too big, unreadable, encrypted or empty one."""
    suffix = Path(filename).suffix.lower()
    if suffix not in SUPPORTED:
        supported = ", ".join(SUPPORTED)
        if suffix:
            raise FormatError(f"{filename}: unsupported file type {suffix}; send one of: {supported}",
                              code="doc_type", params={"name": filename, "suffix": suffix, "supported": supported})
        raise FormatError(f"{filename}: unsupported file type (none); send one of: {supported}",
                          code="doc_no_suffix", params={"name": filename, "supported": supported})
    if len(data) > max_bytes:
        size, limit = f"{len(data) / 1e6:.1f}", f"{max_bytes / 1e6:.1f}"
        raise FormatError(f"{filename}: the file is {size} MB; the limit is {limit} MB", code="doc_too_big",
                          params={"name": filename, "size": size, "limit": limit})
    if suffix == ".pdf":
        text = _pdf_text(data, filename)
    elif suffix == ".docx":
        text = _docx_text(data, filename)
    else:
        text = _decode_text(data, filename)
    text = re.sub(r"[ \t\u00a0]+", " ", text.replace("\r\n", "\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if not text:
        if suffix == ".pdf":
            raise FormatError(f"{filename}: no text found in the file (a scanned PDF has no text layer; run OCR first)",
                              code="pdf_no_text", params={"name": filename})
        raise FormatError(f"{filename}: no text found in the file", code="doc_empty", params={"name": filename})
    return text


def chunk_spans(text: str, *, max_chars: int = 2000) -> list[Chunk]:
    """Split at paragraph, then sentence, then word boundaries into chunks of at most max_chars."""
    if max_chars < 50:
        raise ValueError("max_chars must be at least 50")
    chunks: list[Chunk] = []
    start, n = 0, len(text)
    while start < n:
        while start < n and text[start].isspace():
            start += 1
        if start >= n:
            break
        end = min(start + max_chars, n)
        if end < n:
            window = text[start:end]
            for sep in ("\n\n", "\n", ". ", "? ", "! ", "; ", " "):
                cut = window.rfind(sep)
                if cut > max_chars // 3:
                    end = start + cut + len(sep)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(Chunk(len(chunks), start, end, piece))
        start = end
    return chunks


def chunk_text(text: str, *, max_chars: int = 2000) -> list[str]:
    """The chunks' texts (see chunk_spans for their offsets)."""
    return [c.text for c in chunk_spans(text, max_chars=max_chars)]


def import_document(store, assistant_id: int, filename: str, data: bytes, *, uploaded_by: int | None = None,
                    max_bytes: int = DEFAULT_MAX_BYTES):
    """Extract the text of an uploaded file and store it as a document of the assistant (shared by bot and CLI)."""
    text = extract_text(filename, data, max_bytes=max_bytes)
    document = store.add_document(assistant_id, Path(filename).name, text, uploaded_by=uploaded_by)
    store.audit("document.import", user_id=uploaded_by, assistant_id=assistant_id,
                details={"document_id": document.id, "filename": document.filename, "chars": len(text)})
    return document
