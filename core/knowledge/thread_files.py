"""Files sent in chat: a thread's own temporary knowledge, in Redis, expired after ``[files] ttl_s``.

A document a user sends (PDF, Word .docx, Markdown, text) is read with the knowledge bases'
parsers in their child process, under the ``[ingest]`` limits narrowed by ``[files]``
(:mod:`core.knowledge.parse_worker`), chunked like a base's documents, embedded with the same
model (so it ranks together with the bot's bases) on one low-priority thread off the event loop,
and stored under its thread's key. It is never written to a knowledge base: it is searched only
by the turns of the same thread (:meth:`ThreadFiles.index`, merged into the bot's retrieval by
:meth:`core.knowledge.retriever.Retriever.search`'s ``extra``), and it is cited by its file name.

Redis layout, one hash per thread (so ``/reset`` and the TTL drop every file at once)::

    {prefix}:tfiles:{platform}:{bot}:{chat}:{thread}
        f:{id}   JSON: name, user, at (epoch s), pages, chars, chunks, model, dim
        c:{id}   JSON: [[heading, text], ...]
        v:{id}   base64 of the float32 vectors (chunks x dim)
        n:{id}   present until a question of the thread comes after the file (:meth:`ThreadFiles.unasked`)
        ver      bumped by every change (readers cache the built index per version)
    {prefix}:tfuser:{quota key}   files the user sent in the last day (INCR, a day's TTL)

The hash's TTL is ``ttl_s`` from the newest file; each file also carries its own time and is
left out (and deleted) once older than ``ttl_s``. What a file may cost: ``[files] max_file_mb``
(fetched bytes), ``max_pages``, ``max_chunks``, ``per_thread`` files at once, ``per_user_per_day``.
Each refusal is a :class:`FileRefused` with a typed ``reason`` (the bots layer words it).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from core.config import Config, Settings
from core.errors import BotdError
from core.knowledge.chunking import chunk_sections
from core.knowledge.documents import SUPPORTED, Section
from core.knowledge.embedder import Embedder, limit_threads_here
from core.knowledge.guards import MB, ParseLimits, UnreadableDocument
from core.knowledge.index import KnowledgeIndex
from core.knowledge.parse_worker import ParseWorker
from core.knowledge.retriever import Hit, Retriever
from core.knowledge.store import Manifest, StoredChunk, Version
from core.lowprio import IdleWorker, cores
from core.messages import ThreadKey
from core.redis_store import RedisManager

log = structlog.get_logger("botd.knowledge")

# The "knowledge base" a chat file's chunks are found in (audit, metrics). Base names are letters,
# digits, '-' and '_': this one never collides with a configured base.
THREAD_KB = "(chat file)"
# Chunks of a file given to the model for its summary.
OPENING_CHUNKS = 4
# The longest file name kept (cited in answers, shown to the model).
MAX_NAME = 120
# Niceness of the file-reading thread: answers being decoded come first (as with an ingest).
FILES_NICE = 10

RefusalReason = Literal["type", "too_large", "too_long", "thread_full", "user_limit", "unreadable", "empty",
                        "unavailable"]

# What platforms call the supported types, for a file sent without a usable name.
_MIME_SUFFIX = {
    "application/pdf": ".pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "text/markdown": ".md",
    "text/x-markdown": ".md",
    "text/plain": ".txt",
}


class FileRefused(BotdError):
    """A file sent in chat is not taken; ``reason`` says why, ``fields`` fill the user's text."""

    def __init__(self, reason: RefusalReason, detail: str = "", **fields: object) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: RefusalReason = reason
        self.detail = detail
        self.fields = fields


@dataclass(frozen=True, slots=True)
class TakenFile:
    """A file now in its thread's knowledge."""

    id: str
    name: str
    pages: int  # a PDF's pages (the last page with text); 0 for other types
    chars: int
    chunks: int
    opening: tuple[Hit, ...] = ()  # its first chunks, for a summary


def suffix_of(name: str, mime: str) -> str | None:
    """The document type of a file sent as ``name`` / ``mime``: its suffix, None when unsupported."""
    suffix = Path(name).suffix.lower() if name else ""
    if suffix in SUPPORTED:
        return suffix
    if suffix and suffix not in (".bin", ""):
        return None  # a name that says another type: not read as a document whatever the MIME says
    return _MIME_SUFFIX.get(mime.split(";")[0].strip().lower())


def _pages(sections: list[Section]) -> int:
    last = 0
    for s in sections:
        if s.heading.startswith("page "):
            try:
                last = max(last, int(s.heading[5:]))
            except ValueError:
                pass
    return last


class ThreadFiles:
    """The files of every thread (see the module's docstring). Reads its config at use time."""

    def __init__(self, redis: RedisManager, settings: Settings, quiet: Callable[[], bool] = lambda: False) -> None:
        self.redis = redis
        self.settings = settings
        # Whether the models have been idle a while: a file is then embedded on every core, else on one.
        self.quiet = quiet
        self._embedder: Embedder | None = None
        self._embedded_as: tuple[str, int, tuple[str, ...]] | None = None
        self._retriever: Retriever | None = None
        # One thread reads and embeds files, at a lower priority; created on the first file.
        self._pool: IdleWorker | None = None
        # thread key -> (version, oldest file's time, index): the built index of a thread's files.
        self._cache: OrderedDict[str, tuple[str, float, KnowledgeIndex | None]] = OrderedDict()

    @property
    def cfg(self) -> Config:
        return self.settings.config

    @property
    def enabled(self) -> bool:
        return self.cfg.files.enabled

    @property
    def max_bytes(self) -> int:
        return self.cfg.files.max_file_mb * MB

    @property
    def embedder(self) -> Embedder:
        e = self.cfg.embeddings
        wanted = (e.model, e.batch_size, tuple(e.languages))
        if self._embedder is None or self._embedded_as != wanted:
            self._embedder, self._embedded_as = Embedder(e.model, e.batch_size, e.languages), wanted
            self._retriever = None
        return self._embedder

    def retriever(self) -> Retriever:
        """A retriever over no base, for a bot without knowledge bases (same model, same rules)."""
        embedder = self.embedder
        if self._retriever is None:
            self._retriever = Retriever.from_config(self.cfg.model_copy(update={"knowledge": {}}), embedder)
        return self._retriever

    def key(self, thread: ThreadKey) -> str:
        return f"{self.cfg.redis.key_prefix}:tfiles:{thread.redis_suffix()}"

    def _user_key(self, user: str) -> str:
        return f"{self.cfg.redis.key_prefix}:tfuser:{user}"

    # -- taking a file -------------------------------------------------------------------------

    async def take(self, thread: ThreadKey, user: str, file_id: str, name: str, mime: str, size: int | None,
                   fetch: Callable[[int], Awaitable[bytes]]) -> TakenFile:
        """One file sent in ``thread`` by ``user`` (``quota_key``) into the thread's knowledge:
        checked (:meth:`admit`), fetched with ``fetch(max_bytes)`` (its errors pass through),
        read, embedded and stored (:meth:`add`). A file already taken (``file_id``: a replayed
        message) is given back as it was, without a fetch and without counting again."""
        known = await self.taken(thread, file_id)
        if known is not None:
            return known
        await self.admit(thread, user, name, mime, size)
        data = await fetch(self.max_bytes)
        return await self.add(thread, user, file_id, name, mime, data)

    async def taken(self, thread: ThreadKey, file_id: str) -> TakenFile | None:
        """The file ``file_id`` when the thread holds it already."""
        key = self.key(thread)
        known = await self.redis.run("HGET", self.redis.client.hget, key, f"f:{file_id}")
        if known is None:
            return None
        meta = json.loads(known)
        return TakenFile(file_id, meta["name"], meta["pages"], meta["chars"], meta["chunks"],
                         await self._opening(key, file_id, meta["name"]))

    async def admit(self, thread: ThreadKey, user: str, name: str, mime: str, size: int | None) -> None:
        """Refuse before anything is fetched: an unsupported type, an announced size over the limit,
        a full thread, a user past the day's files (FileRefused; StoreUnavailable)."""
        f = self.cfg.files
        if suffix_of(name, mime) is None:
            raise FileRefused("type", f"{name!r} ({mime or 'no type given'})")
        if size is not None and size > self.max_bytes:
            raise FileRefused("too_large", f"{size} bytes", mb=f.max_file_mb)
        live = await self._live_files(thread)
        if len(live) >= f.per_thread:
            raise FileRefused("thread_full", f"{len(live)} files", n=f.per_thread)
        if f.per_user_per_day:
            sent = await self.redis.run("GET", self.redis.client.get, self._user_key(user))
            if sent is not None and int(sent) >= f.per_user_per_day:
                raise FileRefused("user_limit", f"{sent} files today", n=f.per_user_per_day)

    async def add(self, thread: ThreadKey, user: str, file_id: str, name: str, mime: str, data: bytes) -> TakenFile:
        """Read, chunk, embed and store one file in ``thread``'s knowledge; FileRefused when it
        cannot be (nothing is stored then). A file already taken (a replayed message) is not read again."""
        f = self.cfg.files
        key = self.key(thread)
        known = await self.taken(thread, file_id)
        if known is not None:
            return known
        suffix = suffix_of(name, mime)
        if suffix is None:
            raise FileRefused("type", f"{name!r}")
        if len(data) > self.max_bytes:
            raise FileRefused("too_large", f"{len(data)} bytes", mb=f.max_file_mb)
        # The name is cited in answers and shown to the model: one line, of a sane length.
        name = " ".join(name.split())[:MAX_NAME] or f"file{suffix}"
        embedder = self.embedder
        t0 = time.monotonic()
        pieces, vectors, pages, chars = await self._worker().run(
            functools.partial(self._read, data, suffix, name, embedder))
        meta = {"name": name, "user": user, "at": time.time(), "pages": pages, "chars": chars,
                "chunks": len(pieces), "model": embedder.model_id, "dim": int(vectors.shape[1])}
        chunks = json.dumps([[c.heading, c.text] for c in pieces], ensure_ascii=False)
        packed = base64.b64encode(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).decode("ascii")

        async def _tx() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={f"f:{file_id}": json.dumps(meta, ensure_ascii=False),
                                        f"c:{file_id}": chunks, f"v:{file_id}": packed, f"n:{file_id}": "1"})
                # A fresh token, not a counter: after a /reset a counter would start again at a
                # value another daemon may still hold a built index for.
                pipe.hset(key, "ver", uuid.uuid4().hex)
                pipe.expire(key, f.ttl_s)
                if f.per_user_per_day:  # a day from the user's first file (SET NX: Redis 6 has no EXPIRE NX)
                    pipe.set(self._user_key(user), 0, ex=86_400, nx=True)
                    pipe.incr(self._user_key(user))
                await pipe.execute()

        await self.redis.run("add file", _tx)
        log.info("file taken into the thread's knowledge", thread=str(thread), file=name, pages=pages, chars=chars,
                 chunks=len(pieces), seconds=round(time.monotonic() - t0, 2))
        opening = tuple(Hit(THREAD_KB, name, c.heading, c.text, 0.0, None, 0.0) for c in pieces[:OPENING_CHUNKS])
        return TakenFile(file_id, name, pages, chars, len(pieces), opening)

    def _worker(self) -> IdleWorker:
        if self._pool is None:
            # Nice alone, not SCHED_IDLE: the sender waits for the file's acknowledgement, which a
            # long answer would otherwise hold back (an ingest waits for no one).
            self._pool = IdleWorker("files", nice=FILES_NICE, idle=False,
                                    setup=functools.partial(limit_threads_here, 1))
        return self._pool

    def _read(self, data: bytes, suffix: str, name: str, embedder: Embedder,
              ) -> tuple[list[StoredChunk], np.ndarray, int, int]:
        """Parse (in the child process), chunk and embed one file (blocking: the files thread)."""
        cfg = self.cfg
        limits = ParseLimits.from_config(cfg.ingest)
        limits = replace(limits, max_pages=min(limits.max_pages, cfg.files.max_pages))
        with tempfile.TemporaryDirectory(prefix="botd-file-") as tmp:
            path = Path(tmp) / f"document{suffix}"  # never the sender's name: it is only cited
            path.write_bytes(data)
            try:
                with ParseWorker(limits) as reader:
                    sections = reader.read(path)
            except UnreadableDocument as exc:
                raise FileRefused("unreadable", str(exc), why=str(exc)) from None
        chunks = chunk_sections(sections, 800)
        if not chunks:
            raise FileRefused("empty", "no text")
        if len(chunks) > cfg.files.max_chunks:
            raise FileRefused("too_long", f"{len(chunks)} chunks", n=cfg.files.max_chunks)
        stored = [StoredChunk(name, c.heading, c.position, c.text) for c in chunks]
        limit_threads_here(cores() if self.quiet() else 1)
        vectors = embedder.encode([c.embed_text() for c in stored], step=8)
        return stored, vectors, _pages(sections), sum(len(s.text) for s in sections)

    async def _opening(self, key: str, file_id: str, name: str) -> tuple[Hit, ...]:
        raw = await self.redis.run("HGET", self.redis.client.hget, key, f"c:{file_id}")
        rows = json.loads(raw) if raw else []
        return tuple(Hit(THREAD_KB, name, h, t, 0.0, None, 0.0) for h, t in rows[:OPENING_CHUNKS])

    # -- reading a thread's files --------------------------------------------------------------

    async def _live_files(self, thread: ThreadKey) -> dict[str, dict[str, Any]]:
        raw = await self.redis.run("HGETALL", self.redis.client.hgetall, self.key(thread))
        files, _ = self._live(raw)
        return files

    def _live(self, raw: dict[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The files not yet expired (id -> meta), and the fields of those that are."""
        ttl = self.cfg.files.ttl_s
        now = time.time()
        live: dict[str, dict[str, Any]] = {}
        stale: list[str] = []
        for field_name, value in raw.items():
            if not field_name.startswith("f:"):
                continue
            fid = field_name[2:]
            try:
                meta = json.loads(value)
                fresh = now - float(meta["at"]) < ttl
            except (ValueError, KeyError, TypeError):
                fresh = False
            if fresh:
                live[fid] = meta
            else:
                stale += [f"f:{fid}", f"c:{fid}", f"v:{fid}", f"n:{fid}"]
        return live, stale

    async def index(self, thread: ThreadKey) -> KnowledgeIndex | None:
        """The thread's files, searchable (None: it has none). Raises StoreUnavailable."""
        if not self.enabled:
            return None
        key = self.key(thread)
        ver = await self.redis.run("HGET", self.redis.client.hget, key, "ver")
        if ver is None:
            self._cache.pop(key, None)
            return None
        cached = self._cache.get(key)
        if cached is not None and cached[0] == ver and time.time() - cached[1] < self.cfg.files.ttl_s:
            self._cache.move_to_end(key)
            return cached[2]
        raw = await self.redis.run("HGETALL", self.redis.client.hgetall, key)
        live, stale = self._live(raw)
        if stale:
            await self.redis.run("HDEL", self.redis.client.hdel, key, *stale)
        model = self.embedder.model_id
        index = await asyncio.to_thread(self._build, raw, live, model) if live else None
        oldest = min((float(m["at"]) for m in live.values()), default=time.time())
        self._cache[key] = (str(raw.get("ver", ver)), oldest, index)
        self._cache.move_to_end(key)
        while len(self._cache) > 32:
            self._cache.popitem(last=False)
        return index

    def _build(self, raw: dict[str, str], live: dict[str, dict[str, Any]], model: str) -> KnowledgeIndex | None:
        import faiss

        chunks: list[StoredChunk] = []
        rows: list[np.ndarray] = []
        dim = 0
        for fid, meta in sorted(live.items(), key=lambda kv: float(kv[1]["at"])):
            if meta.get("model") != model:
                continue  # embedded by another model (the config changed): not comparable
            try:
                pieces = json.loads(raw[f"c:{fid}"])
                vecs = np.frombuffer(base64.b64decode(raw[f"v:{fid}"]), dtype=np.float32)
                dim = int(meta["dim"])
                vecs = vecs.reshape(-1, dim)
            except (KeyError, ValueError, TypeError):
                continue
            if len(vecs) != len(pieces):
                continue
            chunks += [StoredChunk(meta["name"], h, i, t) for i, (h, t) in enumerate(pieces)]
            rows.append(vecs)
        if not chunks:
            return None
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(np.vstack(rows), dtype=np.float32))
        version = Version(Path("chat-files"), Manifest(model=model, dim=dim), chunks, index)
        return KnowledgeIndex(THREAD_KB, version)

    async def unasked(self, thread: ThreadKey) -> list[Hit]:
        """The opening chunks of the newest file no question of the thread came after yet ([] when
        every file was asked about); from now on, every file of the thread counts as asked about."""
        key = self.key(thread)
        fields = await self.redis.run("HKEYS", self.redis.client.hkeys, key)
        new = [f[2:] for f in fields if f.startswith("n:")]
        if not new:
            return []
        await self.redis.run("HDEL", self.redis.client.hdel, key, *(f"n:{i}" for i in new))
        metas = await self.redis.run("HMGET", self.redis.client.hmget, key, [f"f:{i}" for i in new])
        live, _ = self._live({f"f:{i}": m for i, m in zip(new, metas, strict=True) if m is not None})
        if not live:
            return []
        newest, meta = max(live.items(), key=lambda kv: float(kv[1]["at"]))
        return list(await self._opening(key, newest, meta["name"]))[:2]

    async def names(self, thread: ThreadKey) -> list[str]:
        """The names of the thread's live files, oldest first."""
        live = await self._live_files(thread)
        return [m["name"] for m in sorted(live.values(), key=lambda m: float(m["at"]))]

    async def reset(self, thread: ThreadKey) -> bool:
        """Forget the thread's files (``/reset``); True when it had some."""
        key = self.key(thread)
        self._cache.pop(key, None)
        return bool(await self.redis.run("DEL", self.redis.client.delete, key))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
