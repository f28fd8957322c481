"""Retrieval for a bot: only from the knowledge bases it is granted, fused, filtered, budgeted.

Isolation lives here, not in the prompt: :meth:`Retriever.search` is given the bot's
grants from the config (the route decides the bot; nothing in a message can change it)
and opens no other index. For each granted base it takes the top chunks by meaning
(faiss) and by words (BM25 over words and CJK bigrams), fuses the lists by reciprocal
rank (meaning leads, words break near ties: :data:`LEXICAL_WEIGHT`), and keeps a chunk only
if it is relevant enough: cosine similarity at least ``min_similarity`` or at least
``min_coverage`` of the query's terms found in it. Ties in the fused score go to the chunk
holding more of the query's terms, then to the higher BM25 score; never to the order of the
files. A question that asks several things at once (:func:`question_parts`) is searched part
by part too: a chunk relevant to one part is kept, and its best part adds to its rank.

Cosine similarity counts only between a question and a chunk the embedding model can both
read (:mod:`core.knowledge.scripts`): an English model such as all-MiniLM-L6-v2 rates any
Chinese question 0.45–0.85 alike to any Chinese chunk, so for a question mostly in Chinese it
would make every chunk "relevant" and rank them at random. Such a question is matched by its
terms alone. The default model (multilingual-e5-small) reads Chinese and English alike.
``min_similarity`` left unset takes the embedding model's own threshold for the question
(:meth:`core.knowledge.embedder.Embedder.min_similarity_for`).

Indexes are loaded at start and re-loaded when a base's CURRENT pointer changes (after
a scheduled or command-line ingest), in a thread, swapped in whole. An index is served only
for the folders it was built from (its manifest records them): after a base's ``paths``
change, or a base is re-created under an old name, the old index is never searched; the
daemon rebuilds it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from core.config import Config
from core.knowledge.embedder import Embedder
from core.knowledge.index import Candidate, KnowledgeIndex
from core.knowledge.scripts import readable_share, scripts_for
from core.knowledge.store import KnowledgeStore, StoredChunk, source_paths
from core.knowledge.tokens import lexical_tokens

log = structlog.get_logger("botd.knowledge")

_RRF_K = 60  # the usual reciprocal-rank-fusion constant
# How much each ranking counts in the fusion. Meaning leads: with the default model (multilingual-e5-small)
# on the shipped set (tests/data/retrieval), the words ranking at equal weight put the right section
# first for 78 % of the questions against 89 % for the meaning ranking alone (bench/bench_embedders.py):
# BM25's first place outweighed the small step between two close dense places. At 1/100 the words
# only break near ties and rank what the model cannot read (a question it cannot judge is ranked
# by words alone, whatever the weight). Relevance is decided apart (similarity or coverage).
DENSE_WEIGHT = 1.0
LEXICAL_WEIGHT = 0.01


@dataclass(frozen=True, slots=True)
class Hit:
    kb: str
    source: str
    heading: str
    text: str
    score: float  # fused (reciprocal rank)
    similarity: float | None  # cosine; None when the model cannot judge the question or the chunk
    coverage: float

    @property
    def cite(self) -> str:
        return f"{self.source} › {self.heading}" if self.heading else self.source


class Retriever:
    def __init__(self, state_dir: Path, embedder: Embedder, *, candidates: int = 20, top_k: int = 4,
                 min_similarity: float | None = None, min_coverage: float = 0.5,
                 scripts: frozenset[str] | None = None, paths: dict[str, list[str]] | None = None) -> None:
        self.state_dir = state_dir
        # Each base's configured folders: an index built from others is not served. None (a
        # retriever made without a config, as tests do): any index is.
        self.paths = paths
        self.embedder = embedder
        # What the model can judge: ``[embeddings] languages``, else what the embedder says of itself.
        self.scripts = embedder.scripts if scripts is None else scripts
        # Whether this process builds a base that has no index yet (the daemon does, at start):
        # then a missing index is no reason to warn. Set by bots.knowledge_jobs.
        self.builds_missing = False
        self.candidates = candidates
        self.top_k = top_k
        # None: the embedding model's own threshold for each question (E5 similarities sit in a
        # narrow high band, higher for Chinese than for English).
        self.min_similarity = min_similarity
        self.min_coverage = min_coverage
        self._indexes: dict[str, tuple[tuple[str | None, int], KnowledgeIndex | None]] = {}
        self._reload_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config, embedder: Embedder | None = None) -> Retriever:
        """The retriever ``[retrieval]`` describes, over the indexes in ``server.state_dir``."""
        r, e = cfg.retrieval, cfg.embeddings
        return cls(cfg.server.state_dir, embedder or Embedder(e.model, e.batch_size, e.languages),
                   candidates=r.candidates, top_k=r.top_k, min_similarity=r.min_similarity,
                   min_coverage=r.min_coverage, scripts=scripts_for(e.languages) if e.languages else None,
                   paths={name: list(kb.paths) for name, kb in cfg.knowledge.items()})

    # -- loading (blocking: call in a thread) ------------------------------------------------------

    def built_elsewhere(self, name: str, built_from: list[str] | None) -> bool:
        """Whether an index of ``name`` built from ``built_from`` (its manifest's paths; None:
        not recorded) was built from other folders than the configured ones: it is never served."""
        if self.paths is None or name not in self.paths:
            return False
        return built_from != source_paths(self.paths[name])

    def refresh(self, names: Sequence[str]) -> list[str]:
        """(Re)load each named base whose live version changed; returns the names reloaded."""
        reloaded = []
        with self._reload_lock:
            for name in names:
                store = KnowledgeStore(self.state_dir, name)
                stamp = store.stamp()
                known = self._indexes.get(name)
                if known is not None and known[0] == stamp:
                    continue
                try:
                    version = store.load()
                    elsewhere = version is not None and self.built_elsewhere(name, version.manifest.paths)
                    index = KnowledgeIndex(name, version) if version is not None and not elsewhere else None
                except Exception as exc:  # keep serving the version already loaded
                    log.error("knowledge base could not be loaded; the loaded version stays", kb=name,
                              error=f"{type(exc).__name__}: {exc}")
                    continue
                if elsewhere and version is not None and self.paths is not None:
                    # Another base's documents, or this base's before its folders changed.
                    log.warning("knowledge base index was built from other folders; it is not served until it is "
                                "rebuilt" + ("" if self.builds_missing else ": run `botd kb ingest`"), kb=name,
                                built_from=version.manifest.paths, configured=source_paths(self.paths[name]))
                    self._indexes[name] = (stamp, None)
                    reloaded.append(name)
                    continue
                if index is not None and index.model != self.embedder.model_id:
                    log.warning("knowledge base was built with another embedding model; re-ingest it", kb=name,
                                built_with=index.model, configured=self.embedder.model_id)
                self._indexes[name] = (stamp, index)
                reloaded.append(name)
                if index is None:
                    if not self.builds_missing:  # otherwise the daemon says it is building it
                        log.warning("knowledge base has no index yet; run `botd kb ingest`", kb=name)
                else:
                    log.info("knowledge base loaded", kb=name, chunks=len(index), version=index.version)
        return reloaded

    def adopt(self, other: Retriever, names: Sequence[str]) -> None:
        """Take over ``other``'s loaded indexes for ``names`` (same embedding model)."""
        self.builds_missing = other.builds_missing
        for name in names:
            entry = other._indexes.get(name)
            # Not one this retriever would refuse, nor one refused before (its folders may be back).
            if entry is not None and entry[1] is not None and not self.built_elsewhere(name, entry[1].paths):
                self._indexes[name] = entry

    def has_index(self, name: str) -> bool:
        """Whether an index of ``name`` is loaded (it may hold no chunk)."""
        entry = self._indexes.get(name)
        return entry is not None and entry[1] is not None

    def size(self, name: str) -> int:
        entry = self._indexes.get(name)
        return len(entry[1]) if entry and entry[1] is not None else 0

    def sources(self, name: str) -> dict[str, int]:
        """Source file -> number of chunks, for the admins' "list sources" command."""
        entry = self._indexes.get(name)
        out: dict[str, int] = {}
        if entry and entry[1] is not None:
            for c in entry[1].chunks:
                out[c.source] = out.get(c.source, 0) + 1
        return out

    # -- searching (blocking: call in a thread) ---------------------------------------------------

    def reads(self, text: str) -> bool:
        """Whether the embedding model can judge ``text``: most of it is in a script the model knows."""
        return readable_share(text, self.scripts) >= 0.5

    def threshold(self, query: str) -> float:
        """The cosine similarity that makes a chunk relevant to ``query``."""
        return self.embedder.min_similarity_for(query) if self.min_similarity is None else self.min_similarity

    def search(self, granted: Sequence[str], query: str, extra: Sequence[KnowledgeIndex] = ()) -> list[Hit]:
        """The relevant chunks for ``query`` from the bases in ``granted`` only, best first.
        ``extra``: indexes searched and ranked together with them (a thread's own files,
        :mod:`core.knowledge.thread_files`), each under its own name."""
        indexes = [(n, e[1]) for n in granted if (e := self._indexes.get(n)) is not None and e[1] is not None]
        indexes += [(i.name, i) for i in extra]
        if not indexes or not query.strip():
            return []
        # A question that asks several things at once is also searched part by part: its whole
        # embedding sits between its topics, and no chunk holds more than a part of its words, so
        # the chunk answering one part can miss both cuts while the others pass.
        asks = [query, *question_parts(query)]
        # A question the model cannot read is not embedded at all: its similarities mean nothing.
        readable = [a for a in asks if self.reads(a)]
        vectors = dict(zip(readable, self.embedder.encode(readable, query=True), strict=True)) if readable else {}
        found: dict[tuple[str, int], _Found] = {}
        for n, ask in enumerate(asks):
            for key, (chunk, score, similarity, coverage, lexical) in self._scored(
                    indexes, ask, vectors.get(ask)).items():
                f = found.setdefault(key, _Found(key[0], chunk))
                relevant = (similarity is not None and similarity >= self.threshold(ask)) or \
                    coverage >= self.min_coverage
                f.relevant = f.relevant or relevant
                if similarity is not None and (f.similarity is None or similarity > f.similarity):
                    f.similarity = similarity
                if n == 0:  # the whole question ranks; its best part adds to that
                    f.score += score
                    f.coverage, f.lexical = coverage, lexical
                else:
                    f.part_score = max(f.part_score, score)
                    f.part_coverage = max(f.part_coverage, coverage)
        ranked: list[tuple[tuple[float, float, float, float], Hit]] = []
        for f in found.values():
            if not f.relevant:
                continue  # neither close in meaning nor sharing enough words: not relevant
            score = f.score + f.part_score
            coverage = max(f.coverage, f.part_coverage)
            hit = Hit(f.kb, f.chunk.source, f.chunk.heading, f.chunk.text, score, f.similarity, coverage)
            # Rank fusion ties often (dense 0 + lexical 1 = dense 1 + lexical 0): the chunk holding
            # more of the question's terms wins, then the higher BM25 score, then the closer meaning.
            ranked.append(((-score, -f.coverage, -f.lexical, -(f.similarity or 0.0)), hit))
        ranked.sort(key=lambda pair: pair[0])
        return [hit for _, hit in ranked[: self.top_k]]

    def _scored(self, indexes: list[tuple[str, KnowledgeIndex]], query: str, qvec: np.ndarray | None,
                ) -> dict[tuple[str, int], tuple[StoredChunk, float, float | None, float, float]]:
        """Each candidate chunk for ``query``: (chunk, fused score, cosine or None, share of the
        query's terms it holds, BM25 score)."""
        qtokens = lexical_tokens(query)
        pool: list[Candidate] = []
        for _, index in indexes:
            pool.extend(index.search(qvec if index.model == self.embedder.model_id else None, qtokens,
                                     self.candidates))
        # Nor does a readable question's similarity to a chunk the model cannot read: the English
        # all-MiniLM-L6-v2 rates "What is the weather in Beijing today?" 0.33 alike a Chinese attendance rule.
        judged = {(c.kb, c.row) for c in pool if c.dense_rank is not None and self.reads(c.chunk.embed_text())}
        # Dense scores share one vector space across bases: one global dense ranking. BM25 scores
        # depend on each base's statistics: one lexical ranking per base.
        dense_order = sorted((c for c in pool if (c.kb, c.row) in judged), key=lambda c: -c.dense_score)
        dense_rank = {(c.kb, c.row): r for r, c in enumerate(dense_order)}
        qset = set(qtokens)
        out: dict[tuple[str, int], tuple[StoredChunk, float, float | None, float, float]] = {}
        for c in pool:
            key = (c.kb, c.row)
            score = 0.0
            if key in dense_rank:
                score += DENSE_WEIGHT / (_RRF_K + dense_rank[key] + 1)
            if c.lexical_rank is not None:
                score += LEXICAL_WEIGHT / (_RRF_K + c.lexical_rank + 1)
            coverage = len(qset & set(lexical_tokens(c.chunk.embed_text()))) / len(qset) if qset else 0.0
            out[key] = (c.chunk, score, c.dense_score if key in judged else None, coverage, c.lexical_score)
        return out


@dataclass(slots=True)
class _Found:
    """A chunk found for the question or one of its parts, as :meth:`Retriever.search` sums it up."""

    kb: str
    chunk: StoredChunk
    score: float = 0.0  # the whole question's fused score
    part_score: float = 0.0  # the best of its parts'
    similarity: float | None = None  # the best cosine, whole or part
    coverage: float = 0.0  # the whole question's terms it holds
    part_coverage: float = 0.0
    lexical: float = 0.0
    relevant: bool = False


# Where a question that asks several things lists them: commas, semicolons, the Chinese list
# comma, "and" / 和 / 以及. A part needs two topic words of its own ("and so on" is none).
_PART_SPLIT = re.compile(r"\s*(?:[,;，、；]|\band\b|以及|和)\s*", re.IGNORECASE)


def question_parts(query: str) -> list[str]:
    """The things ``query`` asks, when it asks two or more at once; [] for a single question."""
    parts = [p.strip(" ?？。.!！") for p in _PART_SPLIT.split(query)]
    parts = [p for p in parts if len(lexical_tokens(p)) >= 2]
    return parts if len(parts) >= 2 else []
