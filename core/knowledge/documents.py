"""Reading documents into sections: (heading path, text) pairs, in reading order.

Markdown headings and Word heading styles become the heading path ("Leave > Annual
leave"); PDF pages are labelled "page N"; plain text has no headings. A file that cannot
be read, or that is over a limit of :class:`~core.knowledge.guards.ParseLimits` (checked
before parsing where the file says it, as the text grows otherwise), raises
:class:`UnreadableDocument` with a short reason. Documents are untrusted: the ingest calls
this in a child process with a memory ceiling (:mod:`core.knowledge.parse_worker`).

pypdf reports what it worked around in a damaged PDF ("incorrect startxref pointer") through
its own loggers, without saying which file: those records are re-logged here with the file
being read (a context variable, so concurrent ingests in threads keep their files apart).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from core.knowledge.guards import (
    ParseLimits,
    TextBudget,
    UnreadableDocument,
    check_file_size,
    check_pages,
    check_zip,
)

__all__ = ["SUPPORTED", "ParseLimits", "Section", "UnreadableDocument", "read_document"]

log = structlog.get_logger("botd.knowledge")

SUPPORTED = {".md", ".markdown", ".txt", ".text", ".pdf", ".docx"}

# Matched whole, its closing hashes stripped after: "(.+?)\s*#*\s*$" backtracked cubically on a
# heading line of many spaces (4,000 of them: 84 s, holding the GIL).
_MD_HEADING = re.compile(r"(#{1,6})\s+(.+)")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True, slots=True)
class Section:
    heading: str
    text: str


def read_document(path: Path, limits: ParseLimits | None = None) -> list[Section]:
    """The sections of ``path``; raises :class:`UnreadableDocument` (and MemoryError, which the
    parsing process answers for itself)."""
    limits = limits or ParseLimits()
    suffix = path.suffix.lower()
    try:
        if suffix in (".md", ".markdown"):
            return _markdown(_text(path, limits))
        if suffix in (".txt", ".text"):
            return [Section("", _text(path, limits))]
        if suffix == ".pdf":
            return _pdf(path, limits)
        if suffix == ".docx":
            return _docx(path, limits)
    except (UnreadableDocument, MemoryError):
        raise
    except Exception as exc:  # parsers raise many kinds of errors on damaged files
        raise UnreadableDocument(f"{type(exc).__name__}: {exc}"[:200]) from None
    raise UnreadableDocument(f"unsupported file type {suffix!r}")


def _text(path: Path, limits: ParseLimits) -> str:
    check_file_size(path, limits)
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "gb18030"):  # Chinese offices still produce GBK text files
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise UnreadableDocument("not UTF-8 or GB18030 text")


def _markdown(text: str) -> list[Section]:
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    lines: list[str] = []
    in_fence = False

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(" > ".join(h for _, h in stack), body))
        lines.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else _MD_HEADING.fullmatch(line)
        if m:
            flush()
            level = len(m.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            body = m.group(2)
            stack.append((level, body.rstrip().rstrip("#").strip() or ("#" if "#" in body else "")))
        else:
            lines.append(line)
    flush()
    return sections


# The PDF being read in this thread (or task), for pypdf's log records.
_READING: contextvars.ContextVar[str | None] = contextvars.ContextVar("botd_pdf_reading", default=None)


class _NamingHandler(logging.Handler):
    """Re-logs pypdf's records through botd's log, naming the file being read."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log.log(record.levelno, "PDF reader reports a problem", file=_READING.get(), detail=record.getMessage(),
                    origin=record.name)
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # pypdf logs from deep inside its recursion on nested arrays: re-logging there can raise
        # RecursionError. The record is dropped rather than printed as text into a JSON log; the
        # file's own refusal says what was wrong with it.
        pass


@functools.cache
def _route_pypdf_logs() -> None:
    # Once per process: pypdf's records go through the naming handler instead of reaching the root
    # logger nameless.
    pypdf_log = logging.getLogger("pypdf")
    pypdf_log.addHandler(_NamingHandler())
    pypdf_log.propagate = False


def _pdf(path: Path, limits: ParseLimits) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    _route_pypdf_logs()
    token = _READING.set(str(path))
    budget = TextBudget(limits)
    try:
        reader = PdfReader(str(path), strict=False)
        check_pages(len(reader.pages), limits)
        pages = [budget.take(page.extract_text() or "") for page in reader.pages]
    except PdfReadError as exc:
        raise UnreadableDocument(f"damaged PDF: {exc}"[:200]) from None
    finally:
        _READING.reset(token)
    sections = [Section(f"page {i}", t.strip()) for i, t in enumerate(pages, start=1) if t.strip()]
    if not sections and pages:
        raise UnreadableDocument("the PDF has no extractable text (a scan?)")
    return sections


def _docx(path: Path, limits: ParseLimits) -> list[Section]:
    import docx

    check_zip(path, limits)
    budget = TextBudget(limits)
    document = docx.Document(str(path))
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(" > ".join(h for _, h in stack), body))
        lines.clear()

    # python-docx looks a paragraph's style up in the whole style sheet each time (~3 ms with
    # Word's default styles): 8,000 empty paragraphs took 22 s. Empty ones need no style, and
    # each style id is looked up once.
    levels: dict[str | None, int] = {}
    for para in document.paragraphs:
        text = budget.take(para.text.strip())
        if not text:
            continue
        style_id = para._p.style
        if style_id not in levels:
            levels[style_id] = _heading_level((para.style.name if para.style is not None else "") or "")
        level = levels[style_id]
        if level:
            flush()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
        else:
            lines.append(text)
    flush()
    for table in document.tables:
        rows = [budget.take(" | ".join(cell.text.strip() for cell in row.cells)) for row in table.rows]
        body = "\n".join(r for r in rows if r.strip(" |"))
        if body:
            sections.append(Section("table", body))
    return sections


def _heading_level(style: str) -> int:
    # English and Chinese Word installations name the styles differently.
    m = re.match(r"^(?:Heading|标题)\s*(\d)$", style.strip())
    if m:
        return int(m.group(1))
    return 1 if style.strip() in ("Title", "标题") else 0
