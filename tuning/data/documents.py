"""Documents: plain text out of txt, md, pdf (pypdf) and docx (python-docx) files, and chunks of it."""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tuning.errors import FormatError

SUPPORTED = (".txt", ".md", ".markdown", ".pdf", ".docx")
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_RATIO_FLOOR = 1 << 20  # members smaller than this unpack to little whatever their ratio
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")  # shown as "?" in a member's name


@dataclass(frozen=True)
class DocumentLimits:
    """How much one uploaded document may unpack to; past a limit it is refused with a FormatError."""

    # ~400 pages of dense text, 500 chunks of 2,000 characters: more than a generation run's requests cover
    max_text_chars: int = 1_000_000
    # every member of a .docx together, uncompressed: images of a full-size upload fit, a zip bomb does not
    max_unpacked_bytes: int = 64 * 2**20
    # uncompressed / compressed size of one member (Apache POI's zip-bomb default); real .docx XML packs ~10x
    max_ratio: int = 100
    max_members: int = 2000  # a .docx has a few dozen parts
    max_pdf_pages: int = 1000


DEFAULT_LIMITS = DocumentLimits()


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


def _text_too_long(filename: str, limits: DocumentLimits) -> FormatError:
    limit = f"{limits.max_text_chars:,}"
    return FormatError(f"{filename}: the document has more than {limit} characters of text, the limit; split it into "
                       "smaller files and upload them one by one", code="doc_text_too_long",
                       params={"name": filename, "limit": limit})


def _collect(parts, filename: str, limits: DocumentLimits) -> str:
    """Join extracted pieces, stopping once they are clearly over the text limit (whitespace is collapsed later)."""
    out, total = [], 0
    for part in parts:
        out.append(part)
        total += len(part) + 1
        if total > 2 * limits.max_text_chars:
            raise _text_too_long(filename, limits)
    return "\n".join(out)


def _pdf_text(data: bytes, filename: str, limits: DocumentLimits) -> str:
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise FormatError(f"{filename}: the PDF is password-protected; remove the password and upload it again",
                              code="pdf_password", params={"name": filename})
        pages = len(reader.pages)
        if pages > limits.max_pdf_pages:
            raise FormatError(f"{filename}: the PDF has {pages} pages; the limit is {limits.max_pdf_pages}; split it "
                              "into smaller files and upload them one by one", code="pdf_too_many_pages",
                              params={"name": filename, "pages": pages, "limit": limits.max_pdf_pages})
        # pypdf caps what one stream may unpack to (its Configuration); this caps the pages' text together
        return _collect(((page.extract_text() or "").strip() + "\n" for page in reader.pages), filename, limits)
    except FormatError:
        raise
    except LimitReachedError as exc:
        raise FormatError(f"{filename}: the PDF goes past a safety limit of the PDF reader ({exc}); print it to a "
                          "new PDF or send its text as .txt", code="pdf_limit",
                          params={"name": filename, "detail": exc}) from None
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


def _unpacked_too_big(filename: str, size: int, limits: DocumentLimits) -> FormatError:
    shown, limit = f"{size / 2**20:.1f}", f"{limits.max_unpacked_bytes / 2**20:.1f}"
    return FormatError(f"{filename}: the .docx unpacks to at least {shown} MB; the limit is {limit} MB; save it "
                       "without images, or send its text as .txt", code="doc_unpacked_too_big",
                       params={"name": filename, "size": shown, "limit": limit})


def _declared_members(data: bytes) -> int | None:
    """The member count in the zip's end-of-central-directory record (0xFFFF: a zip64 archive, which no .docx
    needs), or None when there is no such record (zipfile then reports the damage)."""
    import struct

    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))
    if at < 0 or at + 12 > len(data):
        return None
    return struct.unpack("<H", data[at + 10:at + 12])[0]


def _check_archive(data: bytes, filename: str, *, limits: DocumentLimits = DEFAULT_LIMITS) -> None:
    """Refuse a zip (a .docx) that unpacks past the limits: by its headers first, then by reading every member."""
    count = _declared_members(data)  # before zipfile builds an object per member (150,000 of them: ~100 MB)
    if count is not None and count > limits.max_members:
        raise FormatError(f"{filename}: the .docx has {count} parts; the limit is {limits.max_members}",
                          code="doc_too_many_parts",
                          params={"name": filename, "count": count, "limit": limits.max_members})
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        if len(members) > limits.max_members:
            raise FormatError(f"{filename}: the .docx has {len(members)} parts; the limit is {limits.max_members}",
                              code="doc_too_many_parts",
                              params={"name": filename, "count": len(members), "limit": limits.max_members})
        declared = sum(m.file_size for m in members)
        if declared > limits.max_unpacked_bytes:
            raise _unpacked_too_big(filename, declared, limits)
        for m in members:
            if m.file_size > _RATIO_FLOOR and m.file_size > limits.max_ratio * max(m.compress_size, 1):
                ratio, part = m.file_size // max(m.compress_size, 1), _CONTROL.sub("?", m.filename)[:100]
                raise FormatError(f"{filename}: {part} in the .docx unpacks to {ratio} times its packed size "
                                  f"(the limit is {limits.max_ratio}), as a zip bomb does; save the document again "
                                  "from a word processor, or send its text as .txt", code="doc_zip_bomb",
                                  params={"name": filename, "part": part, "ratio": ratio,
                                          "limit": limits.max_ratio})
        # headers can lie: count the bytes that really come out (zipfile also stops at the declared size)
        total = 0
        for m in members:
            with archive.open(m) as member:
                while chunk := member.read(1 << 16):
                    total += len(chunk)
                    if total > limits.max_unpacked_bytes:
                        raise _unpacked_too_big(filename, total, limits)


def _docx_text(data: bytes, filename: str, limits: DocumentLimits) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        _check_archive(data, filename, limits=limits)
        document = docx.Document(io.BytesIO(data))

        def parts():
            for p in document.paragraphs:
                yield p.text
            for table in document.tables:
                for row in table.rows:
                    yield " | ".join(cell.text.strip() for cell in row.cells)

        return _collect(parts(), filename, limits)
    except FormatError:
        raise
    except (PackageNotFoundError, KeyError, ValueError, OSError) as exc:
        raise FormatError(f"{filename}: not a readable .docx file ({exc})", code="docx_unreadable",
                          params={"name": filename, "detail": exc}) from None
    except Exception as exc:  # zipfile.BadZipFile, zlib.error (damaged or lying headers), lxml errors
        raise FormatError(f"{filename}: not a readable .docx file ({type(exc).__name__})", code="docx_unreadable",
                          params={"name": filename, "detail": type(exc).__name__}) from None


def extract_text(filename: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 limits: DocumentLimits = DEFAULT_LIMITS) -> str:
    """The text of a txt/md/pdf/docx file; FormatError when of a wrong type, over a limit, unreadable or empty."""
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
        text = _pdf_text(data, filename, limits)
    elif suffix == ".docx":
        text = _docx_text(data, filename, limits)
    else:
        text = _decode_text(data, filename)
    # NUL and lone surrogates (a PDF's broken font maps) cannot be stored as text or shown in a chat
    text = _UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text.replace("\r\n", "\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) > limits.max_text_chars:
        raise _text_too_long(filename, limits)
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
                    max_bytes: int = DEFAULT_MAX_BYTES, limits: DocumentLimits = DEFAULT_LIMITS):
    """Extract the text of an uploaded file and store it as a document of the assistant (shared by bot and CLI)."""
    text = extract_text(filename, data, max_bytes=max_bytes, limits=limits)
    document = store.add_document(assistant_id, Path(filename).name, text, uploaded_by=uploaded_by)
    store.audit("document.import", user_id=uploaded_by, assistant_id=assistant_id,
                details={"document_id": document.id, "filename": document.filename, "chars": len(text)})
    return document
