"""Reading documents into sections: (heading path, text) pairs, in reading order.

Markdown headings and Word heading styles become the heading path ("Leave > Annual
leave"); PDF pages are labelled "page N"; plain text has no headings. A file that cannot
be read raises :class:`UnreadableDocument` with a short reason.

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

from core.errors import BotdError

log = structlog.get_logger("botd.knowledge")

SUPPORTED = {".md", ".markdown", ".txt", ".text", ".pdf", ".docx"}

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


class UnreadableDocument(BotdError):
    """The file could not be read or parsed; the message says why."""


@dataclass(frozen=True, slots=True)
class Section:
    heading: str
    text: str


def read_document(path: Path) -> list[Section]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".md", ".markdown"):
            return _markdown(_text(path))
        if suffix in (".txt", ".text"):
            return [Section("", _text(path))]
        if suffix == ".pdf":
            return _pdf(path)
        if suffix == ".docx":
            return _docx(path)
    except UnreadableDocument:
        raise
    except Exception as exc:  # parsers raise many kinds of errors on damaged files
        raise UnreadableDocument(f"{type(exc).__name__}: {exc}"[:200]) from None
    raise UnreadableDocument(f"unsupported file type {suffix!r}")


def _text(path: Path) -> str:
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
        m = None if in_fence else _MD_HEADING.match(line)
        if m:
            flush()
            level = len(m.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, m.group(2).strip()))
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


@functools.cache
def _route_pypdf_logs() -> None:
    # Once per process: pypdf's records go through the naming handler instead of reaching the root
    # logger nameless.
    pypdf_log = logging.getLogger("pypdf")
    pypdf_log.addHandler(_NamingHandler())
    pypdf_log.propagate = False


def _pdf(path: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    _route_pypdf_logs()
    token = _READING.set(str(path))
    try:
        reader = PdfReader(str(path), strict=False)
        pages = [page.extract_text() or "" for page in reader.pages]
    except PdfReadError as exc:
        raise UnreadableDocument(f"damaged PDF: {exc}"[:200]) from None
    finally:
        _READING.reset(token)
    sections = [Section(f"page {i}", t.strip()) for i, t in enumerate(pages, start=1) if t.strip()]
    if not sections and pages:
        raise UnreadableDocument("the PDF has no extractable text (a scan?)")
    return sections


def _docx(path: Path) -> list[Section]:
    import docx

    document = docx.Document(str(path))
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(" > ".join(h for _, h in stack), body))
        lines.clear()

    for para in document.paragraphs:
        style = (para.style.name if para.style is not None else "") or ""
        level = _heading_level(style)
        text = para.text.strip()
        if level and text:
            flush()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
        elif text:
            lines.append(text)
    flush()
    for table in document.tables:
        rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]
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
