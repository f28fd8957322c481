"""Feedback on answers: what was answered, and what the users said of it (👍 / 👎, a reason).

The store owns every Redis key of the feedback loop; the bots layer records an answer's facts
when the answer is delivered (:meth:`FeedbackStore.record_answer`), the platforms' buttons and
events come back as :class:`FeedbackEvent` s (:meth:`FeedbackStore.vote`, :meth:`FeedbackStore.add_reason`),
and the console pages read it back (:meth:`FeedbackStore.get`, :meth:`FeedbackStore.answers`,
:meth:`FeedbackStore.daily`, :meth:`FeedbackStore.export`). Everything is kept for
``[redis] feedback_retention_days`` and then forgotten (key expiry; the indexes are trimmed by
time on every write and read only within the retention).

Keys, all under ``{prefix}:fb:``:

- ``a:{answer_id}`` — the answer's facts (:class:`AnswerFacts`, JSON);
- ``v:{answer_id}`` — a hash, user -> "up" | "down" (one vote per user, the last one counts);
- ``r:{answer_id}`` — a list of reasons (JSON ``{user, text, at}``, the newest 20);
- ``ix:bot:{bot}``, ``ix:kb:{kb}`` — sorted sets of answer ids by time (an answer of a bot with
  several bases is in each base's set);
- ``down:bot:{bot}``, ``down:kb:{kb}`` — the answers with at least one 👎, by answer time;
- ``day:{YYYY-MM-DD}`` — a hash of counters for that UTC day of the answers:
  ``bot:{bot}:answers|up|down`` and ``kb:{kb}:answers|up|down`` (a changed vote moves its count);
- ``e:{platform}:{event id}`` — a platform interaction already taken (a replay is refused).

An answer's id is the message's request id, the one its buttons carry. A chunk is identified by
:func:`chunk_id` (its base, file and a hash of its heading and text): stable across re-ingests
while the chunk's words do not change, so feedback on it can be compared over time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from core.redis_store import RedisManager

if TYPE_CHECKING:
    from core.knowledge.retriever import Hit

# The longest reason kept (characters); longer ones are cut there.
MAX_REASON_CHARS = 500
# Reasons kept per answer (the newest).
MAX_REASONS = 20
# How long a platform interaction's id is remembered to refuse its replay (seconds).
REPLAY_WINDOW_S = 2 * 24 * 3600


class Vote(StrEnum):
    """A user's verdict on an answer."""

    UP = "up"
    DOWN = "down"
    NONE = "none"  # taken back (WeCom's "cancel")


class VoteStatus(StrEnum):
    """What became of a :class:`FeedbackEvent`."""

    RECORDED = "recorded"  # a first vote (or a reason) by this user on this answer
    CHANGED = "changed"  # the user's earlier vote was replaced
    SAME = "same"  # the same vote again: nothing changed
    UNKNOWN = "unknown"  # no such answer (never recorded, or past the retention)
    WRONG_CHAT = "wrong_chat"  # the answer was given elsewhere (another platform, account or chat)
    REPLAYED = "replayed"  # this platform interaction was already taken
    OFF = "off"  # the bot's feedback is turned off
    INVALID = "invalid"  # nothing to record (no vote and no reason)

    @property
    def accepted(self) -> bool:
        return self in (VoteStatus.RECORDED, VoteStatus.CHANGED, VoteStatus.SAME)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One retrieved chunk an answer was given: its id, base, citation and scores."""

    id: str
    kb: str
    cite: str
    score: float  # fused rank score
    similarity: float | None  # cosine; None when the model could not judge it

    @classmethod
    def of(cls, hit: Hit) -> ChunkRef:
        return cls(chunk_id(hit.kb, hit.source, hit.heading, hit.text), hit.kb, hit.cite, round(hit.score, 6),
                   None if hit.similarity is None else round(hit.similarity, 4))


def chunk_id(kb: str, source: str, heading: str, text: str) -> str:
    """A chunk's id: ``kb:source#hash`` (the hash of its heading and text)."""
    digest = hashlib.sha1(f"{heading}\0{text}".encode(), usedforsecurity=False).hexdigest()[:12]
    return f"{kb}:{source}#{digest}"


@dataclass(frozen=True, slots=True)
class AnswerFacts:
    """What was answered, where, from what and by what: recorded when an answer is delivered."""

    answer_id: str  # the message's request id (the buttons carry it)
    bot: str
    bases: tuple[str, ...]  # the bot's knowledge bases: its department's
    platform: str
    account: str
    chat: str
    thread: str
    user: str
    question: str
    answer: str
    chunks: tuple[ChunkRef, ...] = ()
    model: str = ""
    adapters: tuple[str, ...] = ()  # the bot's LoRA adapters (paths)
    latency_ms: int = 0
    finish: str = "stop"
    at: float = field(default_factory=time.time)  # unix time

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnswerFacts:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["bases"] = tuple(known.get("bases") or ())
        known["adapters"] = tuple(known.get("adapters") or ())
        known["chunks"] = tuple(ChunkRef(**{k: v for k, v in c.items() if k in ChunkRef.__dataclass_fields__})
                                for c in known.get("chunks") or ())
        return cls(**known)


@dataclass(frozen=True, slots=True)
class Reason:
    user: str
    text: str
    at: float


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """An answer with its votes and reasons, as read back."""

    facts: AnswerFacts
    votes: dict[str, Vote]  # user -> vote
    reasons: tuple[Reason, ...] = ()

    @property
    def up(self) -> int:
        return sum(1 for v in self.votes.values() if v == Vote.UP)

    @property
    def down(self) -> int:
        return sum(1 for v in self.votes.values() if v == Vote.DOWN)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: the facts, ``votes`` (user -> "up"/"down"), ``up``, ``down`` and ``reasons``."""
        return {**self.facts.as_dict(), "votes": {u: str(v) for u, v in self.votes.items()},
                "up": self.up, "down": self.down, "reasons": [asdict(r) for r in self.reasons]}


@dataclass(frozen=True, slots=True)
class DayCount:
    """One UTC day of a bot's or a base's answers: how many were recorded, 👍 and 👎 on them."""

    day: str  # YYYY-MM-DD
    answers: int = 0
    up: int = 0
    down: int = 0


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """A vote or a reason from a platform, normalised by its connector after verifying it."""

    platform: str
    account: str
    chat: str
    user: str
    answer_id: str
    vote: Vote | None = None  # None: a reason alone
    reason: str = ""
    # The platform's id of this interaction (a callback query id, a Slack trigger id, an event
    # id): the same id twice is a replay and is refused. "": not checked.
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackReply:
    """What the bots layer answers a :class:`FeedbackEvent`: its status, a short acknowledgement
    for the user ("" for none), and, after a 👎 without a reason, the prompt asking for one
    ("" for none) where the platform can take a reply."""

    status: VoteStatus
    text: str = ""
    ask_reason: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackLabels:
    """The words of the buttons under an answer, in the user's language (from the bots layer)."""

    up: str
    down: str
    prompt: str = ""  # a line before the buttons where the platform shows one ("" : none)
    reason_placeholder: str = ""  # the hint in a reason field where the platform has one


# One vote, atomically: the user's old vote replaced, the day's counters moved, the 👎 indexes kept.
# KEYS: facts, votes, day, then the 👎 index keys. ARGV: user, new vote, ttl_s, answer time, then the
# counter field prefixes ("bot:NAME:", "kb:NAME:", ...).
_VOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local old = redis.call('HGET', KEYS[2], ARGV[1])
local new = ARGV[2]
if old == new or (not old and new == 'none') then return 0 end
if new == 'none' then redis.call('HDEL', KEYS[2], ARGV[1]) else redis.call('HSET', KEYS[2], ARGV[1], new) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
for i = 5, #ARGV do
  if old then redis.call('HINCRBY', KEYS[3], ARGV[i] .. old, -1) end
  if new ~= 'none' then redis.call('HINCRBY', KEYS[3], ARGV[i] .. new, 1) end
end
local downs = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do if v == 'down' then downs = downs + 1 end end
for i = 4, #KEYS do
  if downs > 0 then redis.call('ZADD', KEYS[i], tonumber(ARGV[4]), KEYS[1])
  else redis.call('ZREM', KEYS[i], KEYS[1]) end
end
if old then return 2 end
return 1
"""


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class FeedbackStore:
    """Answers' facts and their feedback in Redis (see the module's docstring for the keys).

    ``retention_s`` is read at use time (a callable), so a config reload changes it."""

    def __init__(self, redis: RedisManager, prefix: str, retention_s: Callable[[], int] | int) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:fb"
        self._retention = retention_s if callable(retention_s) else (lambda: int(retention_s))
        self._vote_script: Any = None

    @property
    def retention_s(self) -> int:
        return max(1, int(self._retention()))

    # -- keys ----------------------------------------------------------------------------------

    def _facts_key(self, answer_id: str) -> str:
        return f"{self.prefix}:a:{answer_id}"

    def _votes_key(self, answer_id: str) -> str:
        return f"{self.prefix}:v:{answer_id}"

    def _reasons_key(self, answer_id: str) -> str:
        return f"{self.prefix}:r:{answer_id}"

    def _index(self, kind: Literal["bot", "kb"], name: str, down: bool = False) -> str:
        return f"{self.prefix}:{'down' if down else 'ix'}:{kind}:{name}"

    def _day_key(self, day: str) -> str:
        return f"{self.prefix}:day:{day}"

    @staticmethod
    def _id_of(key: str) -> str:
        return key.rsplit(":a:", 1)[-1]

    # -- writes --------------------------------------------------------------------------------

    async def record_answer(self, facts: AnswerFacts) -> None:
        """Keep ``facts`` (an answer just delivered) for the retention; count it for its day.
        Recording the same answer id again replaces its facts and does not count it twice."""
        ttl = self.retention_s
        key = self._facts_key(facts.answer_id)
        cutoff = time.time() - ttl
        day_key = self._day_key(_day(facts.at))
        indexes = [self._index("bot", facts.bot), *(self._index("kb", kb) for kb in facts.bases)]
        body = json.dumps(facts.as_dict(), ensure_ascii=False)

        async def _tx() -> None:
            new = await self.redis.client.set(key, body, ex=ttl, nx=True)
            async with self.redis.client.pipeline(transaction=True) as pipe:
                if not new:
                    pipe.set(key, body, ex=ttl)
                for ix in indexes:
                    pipe.zadd(ix, {key: facts.at})
                    pipe.zremrangebyscore(ix, "-inf", cutoff)
                    pipe.expire(ix, ttl)
                if new:
                    pipe.hincrby(day_key, f"bot:{facts.bot}:answers", 1)
                    for kb in facts.bases:
                        pipe.hincrby(day_key, f"kb:{kb}:answers", 1)
                    pipe.expire(day_key, ttl + 86400)
                await pipe.execute()

        await self.redis.run("feedback record", _tx)

    async def seen(self, platform: str, event_id: str) -> bool:
        """Mark a platform interaction as taken; True when it already was (a replay)."""
        if not event_id:
            return False
        key = f"{self.prefix}:e:{platform}:{hashlib.sha1(event_id.encode(), usedforsecurity=False).hexdigest()}"
        first = await self.redis.run("feedback event", self.redis.client.set, key, "1", nx=True, ex=REPLAY_WINDOW_S)
        return not first

    async def facts(self, answer_id: str) -> AnswerFacts | None:
        """The facts recorded for ``answer_id``; None when unknown (or forgotten)."""
        if not _valid_id(answer_id):
            return None
        raw = await self.redis.run("feedback get", self.redis.client.get, self._facts_key(answer_id))
        return _parse_facts(raw)

    async def vote(self, answer_id: str, user: str, vote: Vote) -> VoteStatus:
        """``user``'s vote on the answer (their earlier one replaced). The caller checks where the
        vote came from (:meth:`check`) first."""
        facts = await self.facts(answer_id)
        if facts is None:
            return VoteStatus.UNKNOWN
        if self._vote_script is None:
            self._vote_script = self.redis.client.register_script(_VOTE)
        keys = [self._facts_key(answer_id), self._votes_key(answer_id), self._day_key(_day(facts.at)),
                self._index("bot", facts.bot, down=True), *(self._index("kb", kb, down=True) for kb in facts.bases)]
        fields = [f"bot:{facts.bot}:", *(f"kb:{kb}:" for kb in facts.bases)]
        args = [user, str(vote), self.retention_s, facts.at, *fields]
        result = await self.redis.run("feedback vote", self._vote_script, keys=keys, args=args)
        return {-1: VoteStatus.UNKNOWN, 0: VoteStatus.SAME, 1: VoteStatus.RECORDED}.get(int(result),
                                                                                       VoteStatus.CHANGED)

    async def add_reason(self, answer_id: str, user: str, text: str) -> VoteStatus:
        """Keep ``user``'s reason (cut to :data:`MAX_REASON_CHARS`) with the answer."""
        text = " ".join(text.split())[:MAX_REASON_CHARS]
        if not text:
            return VoteStatus.INVALID
        if await self.facts(answer_id) is None:
            return VoteStatus.UNKNOWN
        key = self._reasons_key(answer_id)
        item = json.dumps({"user": user, "text": text, "at": time.time()}, ensure_ascii=False)

        async def _tx() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.lpush(key, item)
                pipe.ltrim(key, 0, MAX_REASONS - 1)
                pipe.expire(key, self.retention_s)
                await pipe.execute()

        await self.redis.run("feedback reason", _tx)
        return VoteStatus.RECORDED

    async def check(self, event: FeedbackEvent) -> tuple[VoteStatus, AnswerFacts | None]:
        """Whether ``event`` may count: the answer exists and was given on the same platform,
        account and chat; its interaction is not a replay. Returns (status, facts): status is
        ``RECORDED`` when it may."""
        if event.vote is None and not event.reason.strip():
            return VoteStatus.INVALID, None
        facts = await self.facts(event.answer_id)
        if facts is None:
            return VoteStatus.UNKNOWN, None
        if (facts.platform, facts.account, facts.chat) != (event.platform, event.account, event.chat):
            return VoteStatus.WRONG_CHAT, facts
        if await self.seen(event.platform, event.event_id):
            return VoteStatus.REPLAYED, facts
        return VoteStatus.RECORDED, facts

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, answer_id: str) -> FeedbackRecord | None:
        """The answer with its votes and reasons; None when unknown."""
        records = await self._records([self._facts_key(answer_id)] if _valid_id(answer_id) else [])
        return records[0] if records else None

    async def answers(self, *, bot: str | None = None, base: str | None = None, since: float | None = None,
                      until: float | None = None, vote: Literal["down"] | None = None,
                      limit: int = 200) -> list[FeedbackRecord]:
        """Recorded answers, newest first, of one bot or one knowledge base (exactly one of
        ``bot`` / ``base``), answered within [since, until] (unix times; default: the whole
        retention), at most ``limit``; ``vote="down"``: only those with a 👎."""
        if (bot is None) == (base is None):
            raise ValueError("name exactly one of bot or base")
        kind: Literal["bot", "kb"] = "bot" if bot is not None else "kb"
        index = self._index(kind, bot if bot is not None else str(base), down=vote == "down")
        lo = max(since if since is not None else 0.0, time.time() - self.retention_s)
        hi = until if until is not None else "+inf"
        keys = await self.redis.run("feedback list", self.redis.client.zrevrangebyscore, index, hi, lo,
                                    start=0, num=max(0, limit))
        return await self._records(list(keys))

    async def export(self, *, bot: str | None = None, base: str | None = None, since: float | None = None,
                     until: float | None = None, vote: Literal["down"] | None = None,
                     batch: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every recorded answer in range as a JSON-able dict (:meth:`FeedbackRecord.as_dict`),
        newest first, read ``batch`` at a time."""
        if (bot is None) == (base is None):
            raise ValueError("name exactly one of bot or base")
        kind: Literal["bot", "kb"] = "bot" if bot is not None else "kb"
        index = self._index(kind, bot if bot is not None else str(base), down=vote == "down")
        lo = max(since if since is not None else 0.0, time.time() - self.retention_s)
        hi: float | str = until if until is not None else "+inf"
        offset = 0
        while True:
            keys = await self.redis.run("feedback export", self.redis.client.zrevrangebyscore, index, hi, lo,
                                        start=offset, num=batch)
            if not keys:
                return
            for record in await self._records(list(keys)):
                yield record.as_dict()
            offset += len(keys)

    async def daily(self, *, bot: str | None = None, base: str | None = None, days: int = 30,
                    today: float | None = None) -> list[DayCount]:
        """Per UTC day, oldest first, the last ``days`` days up to ``today`` (default: now): the
        answers recorded for one bot or one base, and the 👍 / 👎 on them."""
        if (bot is None) == (base is None):
            raise ValueError("name exactly one of bot or base")
        name = f"bot:{bot}:" if bot is not None else f"kb:{base}:"
        end = datetime.fromtimestamp(today if today is not None else time.time(), UTC)
        dates = [(end - timedelta(days=i)).strftime("%Y-%m-%d") for i in range(max(1, days) - 1, -1, -1)]

        async def _read() -> list[Any]:
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for d in dates:
                    pipe.hmget(self._day_key(d), [f"{name}answers", f"{name}up", f"{name}down"])
                return list(await pipe.execute())

        rows = await self.redis.run("feedback daily", _read)
        return [DayCount(d, *(max(0, int(v or 0)) for v in row)) for d, row in zip(dates, rows, strict=True)]

    async def _records(self, keys: Sequence[str]) -> list[FeedbackRecord]:
        if not keys:
            return []

        async def _read() -> list[Any]:
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    answer_id = self._id_of(key)
                    pipe.get(key)
                    pipe.hgetall(self._votes_key(answer_id))
                    pipe.lrange(self._reasons_key(answer_id), 0, -1)
                return list(await pipe.execute())

        raw = await self.redis.run("feedback read", _read)
        records: list[FeedbackRecord] = []
        for i in range(len(keys)):
            facts = _parse_facts(raw[3 * i])
            if facts is None:
                continue  # expired between the index and the read
            votes = {u: Vote(v) for u, v in (raw[3 * i + 1] or {}).items() if v in ("up", "down")}
            reasons: list[Reason] = []
            for item in raw[3 * i + 2] or []:
                try:
                    d = json.loads(item)
                    reasons.append(Reason(str(d["user"]), str(d["text"]), float(d["at"])))
                except (ValueError, KeyError, TypeError):
                    continue
            records.append(FeedbackRecord(facts, votes, tuple(reasons)))
        return records


def _valid_id(answer_id: str) -> bool:
    # Request ids are short hex/url-safe strings; anything else never names a stored answer.
    return 0 < len(answer_id) <= 64 and all(c.isalnum() or c in "-_." for c in answer_id)


def _parse_facts(raw: Any) -> AnswerFacts | None:
    if not raw:
        return None
    try:
        return AnswerFacts.from_dict(json.loads(raw))
    except (ValueError, TypeError):
        return None
