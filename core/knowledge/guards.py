"""What reading one untrusted document may cost, and the checks made before it is parsed.

Documents come from department users' uploads and from shared folders: they are data from
outside. A .docx is a zip archive whose parts python-docx inflates and parses whole, so its
directory is checked before any part is inflated: the sizes it declares (zipfile never reads
past a part's declared size, so they bound what a parser can get) must stay under a total, and
no large part may expand more than a ratio (a 1 MB file of empty paragraphs expands ~1000x).
A PDF's pages are counted before its text is extracted, and the text read from any document
is counted as it grows. What these checks cannot see — a parser's own appetite for memory, a
loop that never ends — is bounded by the process that parses (:mod:`core.knowledge.parse_worker`).
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from core.errors import BotdError

MB = 1 << 20
# A part smaller than this is never refused for its ratio: small XML parts of a normal
# document compress 20-200x, and at this size they cost nothing to parse.
RATIO_FLOOR_BYTES = 1 * MB
# More parts than any real .docx has (a few dozen, a few hundred with many images); the
# directory of each costs memory before anything else is read.
MAX_PARTS = 10_000


class UnreadableDocument(BotdError):
    """The file could not be read or parsed, or is over a limit; the message says why."""


class _IngestSection(Protocol):
    max_uncompressed_mb: int
    max_ratio: int
    max_pages: int
    max_text_mb: int
    memory_mb: int
    parse_timeout_s: int


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """The most one document may cost to read (the ``[ingest]`` section, in bytes and seconds)."""

    max_uncompressed_bytes: int = 200 * MB
    max_ratio: int = 100
    max_pages: int = 2000
    max_text_bytes: int = 20 * MB
    memory_bytes: int = 1024 * MB  # the parsing process's address space; 0: no ceiling
    timeout_s: float = 300.0

    @classmethod
    def from_config(cls, ingest: _IngestSection) -> ParseLimits:
        return cls(max_uncompressed_bytes=ingest.max_uncompressed_mb * MB, max_ratio=ingest.max_ratio,
                   max_pages=ingest.max_pages, max_text_bytes=ingest.max_text_mb * MB,
                   memory_bytes=ingest.memory_mb * MB, timeout_s=float(ingest.parse_timeout_s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB" if n < 10 * MB else f"{n // MB} MB"


def check_zip(path: Path, limits: ParseLimits) -> None:
    """Refuse a zip-based document (.docx) from its directory alone, before any part is inflated."""
    try:
        with zipfile.ZipFile(path) as archive:
            parts = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise UnreadableDocument(f"not a valid .docx (zip) file: {exc}"[:200]) from None
    if len(parts) > MAX_PARTS:
        raise UnreadableDocument(f"the archive holds {len(parts)} parts; a .docx has at most {MAX_PARTS}")
    total = sum(p.file_size for p in parts)
    if total > limits.max_uncompressed_bytes:
        raise UnreadableDocument(f"unpacks to {_mb(total)}; the most is {_mb(limits.max_uncompressed_bytes)} "
                                 "([ingest] max_uncompressed_mb)")
    for p in parts:
        if p.file_size > RATIO_FLOOR_BYTES and p.file_size > limits.max_ratio * max(p.compress_size, 1):
            ratio = p.file_size / max(p.compress_size, 1)
            raise UnreadableDocument(f"its part {p.filename[:60]!r} expands {ratio:.0f} times ({_mb(p.compress_size)}"
                                     f" to {_mb(p.file_size)}); the most is {limits.max_ratio} ([ingest] max_ratio)")


def check_pages(pages: int, limits: ParseLimits) -> None:
    if pages > limits.max_pages:
        raise UnreadableDocument(f"{pages} pages; the most is {limits.max_pages} ([ingest] max_pages)")


def check_file_size(path: Path, limits: ParseLimits) -> None:
    """A text file is its text: one larger than the text allowed is refused before it is read."""
    size = path.stat().st_size
    if size > limits.max_text_bytes:
        raise UnreadableDocument(f"{_mb(size)} of text; the most is {_mb(limits.max_text_bytes)} "
                                 "([ingest] max_text_mb)")


class TextBudget:
    """Counts the text read from one document (UTF-8 bytes) and stops the reading past the limit."""

    def __init__(self, limits: ParseLimits) -> None:
        self.limit = limits.max_text_bytes
        self.used = 0

    def take(self, text: str) -> str:
        self.used += len(text.encode("utf-8", "surrogatepass"))
        if self.used > self.limit:
            raise UnreadableDocument(f"more than {_mb(self.limit)} of text; the most is {_mb(self.limit)} "
                                     "([ingest] max_text_mb)")
        return text
