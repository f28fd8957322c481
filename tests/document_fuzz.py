"""Hostile documents for the fuzz pass of every document parser (Markdown, text, PDF, .docx).

Shared by tests/test_knowledge_fuzz.py (a short budget in the suite) and bench/fuzz_parsers.py
(as long as asked). Each strategy draws one file as ``(suffix, bytes)``: structure-aware where
the format has a structure an attacker would bend (heading and fence lines for Markdown; a zip
whose document.xml is nested, unbalanced or huge and whose directory may lie for .docx; hand-made
PDF objects with streams, page trees and cross-references for PDF), and byte-level mutations
(flips, cuts, repeats, inserted tokens) of real seed documents for all four.

:func:`check_document` is the property: reading a file (as the ingest does, in this process or
through the parsing process) ends within a time bound with sections whose text stays under the
limit, or with :class:`UnreadableDocument`; chunking what was read never raises either.
"""

from __future__ import annotations

import io
import time
import zipfile
import zlib
from functools import cache
from pathlib import Path

import docx
from fpdf import FPDF
from hypothesis import strategies as st

from core.knowledge.chunking import chunk_sections
from core.knowledge.documents import Section, UnreadableDocument, read_document
from core.knowledge.guards import ParseLimits

# The most one document may take to read in the fuzz (the box is shared: generous).
SECONDS_PER_DOCUMENT = 10.0


# -- seed documents ----------------------------------------------------------------------------------


@cache
def seeds() -> dict[str, bytes]:
    md = ("# Leave policy\n\n## Parental leave\n\nNew parents receive a bonus.\n\n```\n# not a heading\n```\n\n"
          "### Annual leave ###\n\nEvery employee gets 27 days.\n\n# 休假制度\n\n员工每年享有十五天带薪年假。\n")
    pdf = FPDF()
    for title in ("Remote work", "Equipment"):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 8, "Employees may work from home up to three days per week. " * 3,
                       new_x="LMARGIN", new_y="NEXT")
    d = docx.Document()
    d.add_heading("Onboarding", level=1)
    d.add_heading("Laptop", level=2)
    d.add_paragraph("Every new hire receives a laptop with a privacy screen on day one.")
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(1, 1).text = "Item", "Laptop"
    buf = io.BytesIO()
    d.save(buf)
    return {".md": md.encode(), ".txt": "出差补贴每天三百元。\nTravel allowance.\n".encode("gb18030"),
            ".pdf": bytes(pdf.output()), ".docx": buf.getvalue()}


# -- byte-level mutations ------------------------------------------------------------------------------

_TOKENS = [b"obj", b"endobj", b"stream\n", b"endstream", b"/FlateDecode", b"/Length 999999", b"<<", b">>", b"[",
           b"]", b"(", b")", b"/Kids [", b"/Count 99999999", b"xref", b"trailer", b"startxref\n0", b"%%EOF",
           b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"<w:p>", b"</w:p>", b"<w:t>", b"\x00", b"\xff\xfe",
           b"#", b"\n# ", b"```", b"\r", b" " * 64]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=64))
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "truncate", "token"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 256))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "repeat":
            piece = bytes(data[at:at + draw(st.integers(1, 64))])
            data[at:at] = piece * draw(st.integers(2, 200))
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.sampled_from(_TOKENS))
    return bytes(data)


# -- Markdown and text -----------------------------------------------------------------------------------

_MD_PIECES = ["#", "##", "###### ", "####### ", "# ", " ", "\t", "\u3000", "```", "~~~", "\n", "\r\n", "\x0b",
              "#" * 40, " " * 300, "a", "中文", "。", ". ", "\x00", "\ud800", "> ", "- ", "|", "\u2028"]


def markdown_files() -> st.SearchStrategy[tuple[str, bytes]]:
    text = st.lists(st.one_of(st.sampled_from(_MD_PIECES), st.text(max_size=12)), max_size=300).map("".join)
    encoded = text.map(lambda t: t.encode("utf-8", "surrogatepass"))
    return st.tuples(st.sampled_from([".md", ".markdown", ".txt"]),
                     st.one_of(encoded, st.binary(max_size=2000), mutated(seeds()[".md"]),
                               mutated(seeds()[".txt"])))


# -- .docx -----------------------------------------------------------------------------------------------

_W = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
_TAGS = ["w:p", "w:r", "w:t", "w:tbl", "w:tr", "w:tc", "w:pPr", "w:rPr", "w:sdt", "w:sdtContent", "w:hyperlink",
         "w:ins", "w:del", "w:smartTag", "w:fldSimple", "w:body", "w:document", "w:tcPr", "w:tblGrid"]
# Leaves: mostly well-formed (so that python-docx gets past the XML parser), some not.
_LEAVES = ["", "text", "中文", "&amp;", "&#x10FFFF;", "<![CDATA[x]]>", "<w:t>Heading</w:t>",
           '<w:pStyle w:val="Heading1"/>', '<w:pStyle w:val="标题 2"/>', '<w:pStyle w:val="Title"/>',
           '<w:gridSpan w:val="9999"/>', '<w:gridSpan w:val="-1"/>', '<w:vMerge w:val="restart"/>', "<w:vMerge/>",
           '<w:gridCol w:w="99999999999"/>', "<w:br/>", "<w:tab/>", "<w:cr/>", '<w:sym w:char="F0E0"/>']
_BROKEN = ["&#0;", "&ent;", "<", "</w:p>", "<x:unknown/>", "\x00"]


@st.composite
def _xml(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 6 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(_BROKEN)) if draw(st.integers(0, 30)) == 0 else draw(st.sampled_from(_LEAVES))
    tag = draw(st.sampled_from(_TAGS))
    children = draw(st.lists(_xml(depth + 1), max_size=4))
    return f"<{tag}>{''.join(children)}</{tag}>"


@st.composite
def docx_files(draw: st.DrawFn) -> tuple[str, bytes]:
    seed = seeds()[".docx"]
    kind = draw(st.sampled_from(["body", "body", "body", "nesting", "directory", "bytes"]))
    if kind == "bytes":
        return ".docx", draw(mutated(seed))
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "word/document.xml":
                if kind == "body":
                    body = "".join(draw(st.lists(_xml(), max_size=12)))
                else:  # deep nesting, and a run of the same element: parsers that recurse or copy
                    n = draw(st.integers(1, 5000))
                    tag = draw(st.sampled_from(["w:p", "w:r", "w:tbl", "w:tc", "w:sdt"]))
                    body = f"<{tag}>" * n + "x" + f"</{tag}>" * n if draw(st.booleans()) else "<w:p/>" * n * 20
                prolog = draw(st.sampled_from([
                    "", '<!DOCTYPE w:document [<!ENTITY ent "boom">]>',
                    '<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY ent "&c;&c;&c;&c;&c;&c;&c;&c;">]>',
                    '<!DOCTYPE d [<!ENTITY ent SYSTEM "file:///etc/passwd">]>']))
                data = (f'<?xml version="1.0" encoding="UTF-8"?>{prolog}<w:document {_W}><w:body>{body}'
                        "</w:body></w:document>").encode()
            dst.writestr(info, data)
    blob = out.getvalue()
    if kind == "directory":  # the directory lies about a part's sizes
        blob = _lie(blob, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                    draw(st.integers(0, 20)))
    return ".docx", blob


def _lie(blob: bytes, size: int, packed: int, which: int) -> bytes:
    data = bytearray(blob)
    entries = []
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        entries.append(at)
        at += 4
    if entries:
        at = entries[which % len(entries)]
        data[at + 20:at + 24] = packed.to_bytes(4, "little")
        data[at + 24:at + 28] = size.to_bytes(4, "little")
    return bytes(data)


# -- PDF -------------------------------------------------------------------------------------------------


@st.composite
def _pdf_object(draw: st.DrawFn, number: int, pages: int) -> bytes:
    kind = draw(st.sampled_from(["page", "stream", "bomb", "array", "dict", "kids"]))
    if kind == "page":
        body = b"<< /Type /Page /Parent 2 0 R /Contents %d 0 R /Resources << >> >>" % draw(st.integers(1, pages + 3))
    elif kind == "stream":
        content = draw(st.sampled_from([b"BT /F1 12 Tf (Hello) Tj ET", b"BT (" + b"x" * 500 + b") Tj ET",
                                        b"BT [(a) -100 (b)] TJ ET", b"q 1 0 0 1 0 0 cm Q", b"BT T* T* T* ET"]))
        content = content * draw(st.integers(1, 200))
        packed = zlib.compress(content)
        body = b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(packed), packed)
    elif kind == "bomb":  # a small stream that inflates to a lot
        packed = zlib.compress(b"BT (A) Tj ET " * draw(st.integers(1000, 400_000)), 9)
        body = b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(packed), packed)
    elif kind == "array":
        n = draw(st.integers(1, 3000))
        body = b"[" * n + b"]" * draw(st.integers(0, n))
    elif kind == "dict":
        n = draw(st.integers(1, 3000))
        body = b"<< /A " * n + b">>" * draw(st.integers(0, n))
    else:  # a page tree that refers to itself or claims many pages
        body = b"<< /Type /Pages /Kids [%d 0 R %d 0 R] /Count %d >>" % (
            number, draw(st.integers(1, pages + 3)), draw(st.integers(-1, 10**9)))
    return b"%d 0 obj\n%s\nendobj\n" % (number, body)


@st.composite
def pdf_files(draw: st.DrawFn) -> tuple[str, bytes]:
    if draw(st.booleans()):
        return ".pdf", draw(mutated(seeds()[".pdf"]))
    pages = draw(st.integers(1, 6))
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    objects = [b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n",
               b"2 0 obj\n<< /Type /Pages /Kids [%s] /Count %d >>\nendobj\n" % (
                   b" ".join(b"%d 0 R" % (3 + i) for i in range(pages)), pages)]
    objects += [draw(_pdf_object(3 + i, pages)) for i in range(pages + draw(st.integers(0, 4)))]
    for obj in objects:
        offsets.append(len(out))
        out += obj
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % (off + draw(st.sampled_from([0, 0, 0, 1, -1, 1000])))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return ".pdf", bytes(out)


def documents() -> st.SearchStrategy[tuple[str, bytes]]:
    """Any of the four formats, hostile."""
    return st.one_of(markdown_files(), docx_files(), pdf_files())


# -- the property ----------------------------------------------------------------------------------------


def check_document(path: Path, limits: ParseLimits, read=read_document) -> list[Section] | str:
    """Read ``path`` as the ingest does (``read``: in this process, or a ParseWorker's ``read``) and
    chunk it; the sections, or the refusal's reason. Anything else raised is a finding."""
    started = time.monotonic()
    try:
        sections = read(path, limits) if read is read_document else read(path)
    except UnreadableDocument as exc:
        reason = str(exc)
        assert reason, "a refusal without a reason"
        outcome: list[Section] | str = reason
    else:
        assert all(isinstance(s, Section) and isinstance(s.heading, str) and isinstance(s.text, str)
                   for s in sections)
        text = sum(len(s.text.encode("utf-8", "surrogatepass")) for s in sections)
        # Headings are counted with the text they head: a heading path repeats them per section.
        assert text <= limits.max_text_bytes, text
        chunk_sections(sections, 800)
        outcome = sections
    elapsed = time.monotonic() - started
    assert elapsed < SECONDS_PER_DOCUMENT, f"{path.name}: {elapsed:.1f} s"
    return outcome
