"""Hostile uploads built in memory: .docx files with any body, zip bombs, PDFs with raw content streams."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib


def plain_docx() -> bytes:
    """An empty document as python-docx writes it."""
    import docx

    out = io.BytesIO()
    docx.Document().save(out)
    return out.getvalue()


def docx_with_body(body_xml: bytes, *, extra: dict[str, bytes] | None = None) -> bytes:
    """A valid .docx whose <w:body> is body_xml (deflated at level 9), plus any extra members."""
    source = zipfile.ZipFile(io.BytesIO(plain_docx()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "word/document.xml":
                data = data.split(b"<w:body>")[0] + b"<w:body>" + body_xml + b"</w:body></w:document>"
            archive.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return out.getvalue()


def paragraphs(*texts: str) -> bytes:
    return b"".join(b"<w:p><w:r><w:t>" + t.encode() + b"</w:t></w:r></w:p>" for t in texts)


def understate_size(data: bytes, member: str, size: int) -> bytes:
    """The zip with `member`'s uncompressed size rewritten to `size` in its local and central headers (CRC kept)."""
    data = bytearray(data)
    # (signature, offset of the name length, of the name, of the uncompressed size) in each kind of header
    for signature, name_len_at, name_at, size_at in ((b"PK\x03\x04", 26, 30, 22), (b"PK\x01\x02", 28, 46, 24)):
        header = data.find(signature)
        while header != -1:
            name_len = struct.unpack_from("<H", data, header + name_len_at)[0]
            if data[header + name_at:header + name_at + name_len] == member.encode():
                struct.pack_into("<I", data, header + size_at, size)
            header = data.find(signature, header + 4)
    return bytes(data)


def pdf_from_streams(contents: list[bytes], *, flate: bool = False) -> bytes:
    """A PDF with one page per content stream (Helvetica as /F1), offsets computed for a valid xref."""
    n = len(contents)
    font = 3 + 2 * n
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % (3 + 2 * i) for i in range(n)), n)]
    for i, content in enumerate(contents):
        stream = 4 + 2 * i
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (stream, font))
        body = zlib.compress(content, 9) if flate else content
        objects.append(b"<< /Length %d%s >>\nstream\n" % (len(body), b" /Filter /FlateDecode" if flate else b"")
                       + body + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def show_text(text: str) -> bytes:
    """A content stream that shows one line of (ASCII) text."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"BT /F1 12 Tf 72 720 Td (" + escaped.encode("latin-1") + b") Tj ET"
