"""A knowledge base on disk: versions written aside, one pointer file swapped atomically.

Layout under ``{state_dir}/knowledge/{name}/``::

    CURRENT            the name of the live version (replaced with os.replace: atomic)
    v-<ns>/index.faiss the vectors (faiss IndexFlatIP over L2-normalised embeddings)
    v-<ns>/chunks.jsonl one line per vector: source, heading, position, text
    v-<ns>/manifest.json embedding model, dimension, the folders it was built from (resolved),
                       and per file its hash and chunk rows
    .lock              held (flock) by whoever writes a new version

A reader follows CURRENT; a writer builds a whole new version directory and only then
replaces CURRENT. An ingest killed half-way leaves a stray ``v-*`` directory (removed by
the next ingest) and the previous version untouched and live.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class StoredChunk:
    source: str
    heading: str
    position: int
    text: str

    def embed_text(self) -> str:
        return f"{self.heading}\n{self.text}" if self.heading else self.text


@dataclass(slots=True)
class Manifest:
    model: str = ""
    dim: int = 0
    # source -> {"hash": sha256, "first": row, "count": rows}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    built_at: float = 0.0
    # The folders (and files) it was built from, symlinks resolved (source_paths); None: built
    # before botd recorded them. An index is served only for the folders it was built from.
    paths: list[str] | None = None


def source_paths(folders: Sequence[str | Path]) -> list[str]:
    """A base's configured folders as an index records them: absolute, symlinks resolved, in order
    (the order names its files)."""
    return [os.path.realpath(os.path.expanduser(str(f))) for f in folders]


@dataclass(slots=True)
class Version:
    path: Path
    manifest: Manifest
    chunks: list[StoredChunk]
    index: Any  # faiss.IndexFlatIP, searched as loaded

    @property
    def vectors(self) -> np.ndarray:
        """The stored vectors (read out of the flat index: an ingest reuses them)."""
        if not self.index.ntotal:
            return np.zeros((0, self.manifest.dim), np.float32)
        return np.ascontiguousarray(self.index.reconstruct_n(0, self.index.ntotal), dtype=np.float32)


class KnowledgeStore:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / "knowledge" / name
        self.pointer = self.dir / "CURRENT"

    def current_name(self) -> str | None:
        try:
            return self.pointer.read_text().strip() or None
        except FileNotFoundError:
            return None

    def stamp(self) -> tuple[str | None, int]:
        """Cheap change detector for readers: the pointer's content and mtime."""
        try:
            st = self.pointer.stat()
        except FileNotFoundError:
            return None, 0
        return self.current_name(), st.st_mtime_ns

    def _manifest(self) -> dict[str, Any] | None:
        name = self.current_name()
        if name is None:
            return None
        try:
            data = json.loads((self.dir / name / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def built_with(self) -> str | None:
        """The embedding model (``Embedder.model_id``) the live version was built with; None when
        there is none or its manifest cannot be read."""
        data = self._manifest()
        return None if data is None else str(data.get("model", ""))

    def built_from(self) -> list[str] | None:
        """The folders the live version was built from (:func:`source_paths`); None when there is
        no version, its manifest cannot be read, or it was built before botd recorded them."""
        data = self._manifest()
        paths = None if data is None else data.get("paths")
        return [str(p) for p in paths] if isinstance(paths, list) else None

    def load(self) -> Version | None:
        """The live version, or None when nothing was ingested yet."""
        import faiss

        name = self.current_name()
        if name is None:
            return None
        path = self.dir / name
        manifest = Manifest(**json.loads((path / "manifest.json").read_text()))
        chunks = []
        with (path / "chunks.jsonl").open(encoding="utf-8") as f:
            for line in f:
                chunks.append(StoredChunk(**json.loads(line)))
        index = faiss.read_index(str(path / "index.faiss"))
        if len(chunks) != index.ntotal:
            raise ValueError(f"{path}: {len(chunks)} chunks but {index.ntotal} vectors")
        return Version(path, manifest, chunks, index)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive right to write a new version (another ingest of the same base waits)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, manifest: Manifest, chunks: list[StoredChunk], vectors: np.ndarray) -> Path:
        """Write a complete new version aside, then make it live in one atomic step."""
        import faiss

        live = self.current_name()
        # Older versions and those left by a killed ingest go; the live one stays until the next
        # write, so a reader that followed CURRENT just before the swap can still finish loading.
        for stray in self.dir.glob("v-*"):
            if stray.name != live:
                shutil.rmtree(stray, ignore_errors=True)
        path = self.dir / f"v-{time.time_ns()}"
        path.mkdir(parents=True)
        index = faiss.IndexFlatIP(manifest.dim)
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(index, str(path / "index.faiss"))
        with (path / "chunks.jsonl").open("w", encoding="utf-8") as f:
            for c in chunks:
                f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
        manifest.built_at = time.time()
        (path / "manifest.json").write_text(json.dumps(asdict(manifest), ensure_ascii=False))
        for p in path.iterdir():
            _fsync(p)
        _fsync(path)
        tmp = self.dir / "CURRENT.tmp"
        tmp.write_text(path.name)
        _fsync(tmp)
        os.replace(tmp, self.pointer)
        _fsync(self.dir)
        return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
