"""One knowledge base loaded for search: faiss for meaning, BM25 for words and CJK bigrams."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from core.knowledge.store import StoredChunk, Version
from core.knowledge.tokens import lexical_tokens


@dataclass(frozen=True, slots=True)
class Candidate:
    kb: str
    row: int
    chunk: StoredChunk
    dense_rank: int | None  # 0-based rank in the dense list, None when not in it
    dense_score: float
    lexical_rank: int | None
    lexical_score: float


@functools.cache
def _bm25s() -> ModuleType:
    import bm25s

    # Importing bm25s sets its logger to DEBUG, undoing the WARNING core.logging gave it (bm25s is
    # imported late, when the first index loads), so its "Building index from tokens" reached the log.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class KnowledgeIndex:
    def __init__(self, name: str, version: Version) -> None:
        bm25s = _bm25s()
        self.name = name
        self.version = version.path.name
        self.chunks = version.chunks
        self.dim = version.manifest.dim
        self.model = version.manifest.model
        self.paths = version.manifest.paths  # the folders it was built from (None: not recorded)
        self.faiss = version.index
        self.bm25 = None
        if self.chunks:
            self.bm25 = bm25s.BM25()
            self.bm25.index([lexical_tokens(c.embed_text()) or ["\x00"] for c in self.chunks], show_progress=False)

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, query_vec: np.ndarray | None, query_tokens: list[str], k: int) -> list[Candidate]:
        """The top ``k`` of each list (dense, lexical), merged per chunk; blocking (call in a thread)."""
        n = len(self.chunks)
        if n == 0:
            return []
        k = min(k, n)
        dense: dict[int, tuple[int, float]] = {}
        if query_vec is not None and self.faiss.ntotal:
            scores, ids = self.faiss.search(query_vec.reshape(1, -1).astype(np.float32), k)
            for rank, (row, score) in enumerate(zip(ids[0], scores[0], strict=True)):
                if row >= 0:
                    dense[int(row)] = (rank, float(score))
        lexical: dict[int, tuple[int, float]] = {}
        known = [t for t in query_tokens if t in self.bm25.vocab_dict] if self.bm25 is not None else []
        if known and self.bm25 is not None:
            ids, scores = self.bm25.retrieve([known], k=k, show_progress=False, n_threads=1)
            rank = 0
            for row, score in zip(ids[0], scores[0], strict=True):
                if score > 0:
                    lexical[int(row)] = (rank, float(score))
                    rank += 1
        out = []
        for row in dense.keys() | lexical.keys():
            d, lx = dense.get(row), lexical.get(row)
            out.append(Candidate(self.name, row, self.chunks[row], d[0] if d else None, d[1] if d else 0.0,
                                 lx[0] if lx else None, lx[1] if lx else 0.0))
        return out
