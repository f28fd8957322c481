"""Usage per bot and day, the last 30 days, kept in Redis: what the console's usage page shows.

One Redis hash per bot and UTC day, ``{prefix}:usage:{bot}:{YYYY-MM-DD}``, that expires
:data:`DAYS` + 1 days after its last write, so the store is bounded by bots x days whatever
the traffic. Each answer adds to its counters in one pipelined step: answers, errors,
refusals for lack of knowledge, tokens in and out, and two latency
histograms (time to first token, queue wait) in fixed millisecond buckets, from which the
median and the 95th percentile are read (interpolated inside the bucket, as Prometheus'
``histogram_quantile`` does). Every daemon of a cluster adds to the same hashes. The 👍 / 👎 of each day are the
feedback store's (core.feedback), merged in when the page is built (:func:`with_votes`).

The same events go to the process's Prometheus counters labelled by bot (core.metrics); the
label is the configured bot's name, so its cardinality is the number of bots in config.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core import metrics
from core.redis_store import RedisManager, StoreUnavailable

DAYS = 30
EVAL_PLATFORM = "eval"  # botd eval's questions (bots.eval.PLATFORM): tests, not usage
# Bucket upper bounds in ms; the last bucket (index len(BUCKETS_MS)) holds everything above.
BUCKETS_MS = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10_000, 15_000, 20_000,
              30_000, 60_000, 120_000)
COUNTERS = ("answers", "errors", "refusals", "tokens_in", "tokens_out", "up", "down")


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def last_days(n: int = DAYS, now: float | None = None) -> list[str]:
    """The ``n`` UTC days ending today, oldest first."""
    now = time.time() if now is None else now
    return [day_of(now - 86400 * i) for i in range(n - 1, -1, -1)]


def bucket_of(ms: float) -> int:
    for i, bound in enumerate(BUCKETS_MS):
        if ms <= bound:
            return i
    return len(BUCKETS_MS)


def quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a bucketed histogram, in ms; None when it is empty. Linear
    inside the bucket; the open last bucket answers its lower bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(BUCKETS_MS):
                return float(BUCKETS_MS[-1])
            lo = BUCKETS_MS[i - 1] if i else 0
            return lo + (BUCKETS_MS[i] - lo) * (rank - seen) / n
        seen += n
    return float(BUCKETS_MS[-1])


@dataclass
class DayUsage:
    """One bot's (or several bots') figures of one day."""

    day: str
    answers: int = 0
    errors: int = 0
    refusals: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    up: int = 0
    down: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))
    wait: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))

    def add(self, other: DayUsage) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ttft = [a + b for a, b in zip(self.ttft, other.ttft, strict=True)]
        self.wait = [a + b for a, b in zip(self.wait, other.wait, strict=True)]

    def to_json(self) -> dict[str, Any]:
        votes = self.up + self.down

        def ms(v: float | None) -> int | None:
            return None if v is None else round(v)

        return {"day": self.day, **{n: getattr(self, n) for n in COUNTERS},
                "up_ratio": round(self.up / votes, 3) if votes else None,
                "ttft_p50_ms": ms(quantile(self.ttft, 0.5)), "ttft_p95_ms": ms(quantile(self.ttft, 0.95)),
                "wait_p50_ms": ms(quantile(self.wait, 0.5)), "wait_p95_ms": ms(quantile(self.wait, 0.95))}


def _parse(day: str, raw: dict[str, str]) -> DayUsage:
    d = DayUsage(day)
    for k, v in raw.items():
        try:
            n = int(v)
        except ValueError:
            continue
        if k in COUNTERS:
            setattr(d, k, n)
        elif k[:1] in ("t", "w") and k[1:].isdigit() and int(k[1:]) <= len(BUCKETS_MS):
            (d.ttft if k[0] == "t" else d.wait)[int(k[1:])] = n
    return d


class UsageStore:
    """The per-bot, per-day counters in Redis; every write is one pipelined round trip."""

    def __init__(self, redis: RedisManager, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, bot: str, day: str) -> str:
        return f"{self.prefix}:usage:{bot}:{day}"

    async def _add(self, bot: str, values: dict[str, int], now: float | None = None) -> None:
        key = self.key(bot, day_of(time.time() if now is None else now))

        async def write() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                for name, n in values.items():
                    pipe.hincrby(key, name, n)
                pipe.expire(key, (DAYS + 1) * 86400)
                await pipe.execute()

        await self.redis.run("HINCRBY", write)

    async def answered(self, bot: str, *, complete: bool, tokens_in: int, tokens_out: int,
                       ttft_ms: float | None, wait_ms: float, now: float | None = None) -> None:
        """One generated answer (``complete``: not an error, cancel or expiry)."""
        values = {"answers" if complete else "errors": 1, "tokens_in": tokens_in, "tokens_out": tokens_out,
                  f"w{bucket_of(wait_ms)}": 1}
        if ttft_ms is not None:
            values[f"t{bucket_of(ttft_ms)}"] = 1
        metrics.BOT_ANSWERS.labels(bot, "answered" if complete else "error").inc()
        metrics.BOT_TOKENS.labels(bot, "in").inc(tokens_in)
        metrics.BOT_TOKENS.labels(bot, "out").inc(tokens_out)
        if ttft_ms is not None:
            metrics.BOT_TTFT.labels(bot).observe(ttft_ms / 1000)
        metrics.BOT_QUEUE_WAIT.labels(bot).observe(wait_ms / 1000)
        await self._add(bot, values, now)

    async def refused(self, bot: str, now: float | None = None) -> None:
        """A refusal for lack of knowledge (no document matched)."""
        metrics.BOT_ANSWERS.labels(bot, "refused").inc()
        await self._add(bot, {"refusals": 1}, now)

    async def days(self, bots: Iterable[str], n: int = DAYS, now: float | None = None,
                   ) -> dict[str, list[DayUsage]]:
        """Each bot's last ``n`` days, oldest first (days without a figure are zeros)."""
        bots = list(bots)
        days = last_days(min(max(n, 1), DAYS), now)

        async def read() -> list[Any]:
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for bot in bots:
                    for day in days:
                        pipe.hgetall(self.key(bot, day))
                return list(await pipe.execute())

        raw = await self.redis.run("HGETALL", read) if bots else []
        out: dict[str, list[DayUsage]] = {}
        for i, bot in enumerate(bots):
            out[bot] = [_parse(day, raw[i * len(days) + j] or {}) for j, day in enumerate(days)]
        return out


def summary(per_bot: dict[str, list[DayUsage]], bots: Collection[str] | None = None) -> dict[str, Any]:
    """The page's figures: per bot (each day and the period's total) and all ``bots`` together."""
    out: dict[str, Any] = {"bots": {}, "days": []}
    together: list[DayUsage] = []
    for bot, days in per_bot.items():
        if bots is not None and bot not in bots:
            continue
        total = DayUsage("total")
        for d in days:
            total.add(d)
        out["bots"][bot] = {"days": [d.to_json() for d in days], "total": total.to_json()}
        if not together:
            together = [DayUsage(d.day) for d in days]
        for acc, d in zip(together, days, strict=True):
            acc.add(d)
    all_total = DayUsage("total")
    for d in together:
        all_total.add(d)
    out["days"] = [d.to_json() for d in together]
    out["total"] = all_total.to_json()
    return out


class QualityLog:
    """What the answer pipeline reports of each answer: the usage counters and the questions it
    could not answer well (bots.unanswered). A Redis outage loses the figure, never the answer;
    the eval's own questions (platform "eval") are not counted."""

    def __init__(self, redis: RedisManager, prefix: str, embedder: Callable[[], Any] | None = None,
                 spawn: Callable[[Coroutine[Any, Any, Any]], Any] | None = None) -> None:
        from bots.unanswered import UnansweredStore

        self.usage = UsageStore(redis, prefix)
        self.unanswered = UnansweredStore(redis, prefix)
        # The runtime's embedder (it changes with a reload), and how to start a background task:
        # a recorded question is embedded in the background, so the console's page finds it ready.
        self._embedder = embedder
        self._spawn = spawn

    async def _record(self, entry: Any) -> None:
        from bots.unanswered import GROUPER

        await self.unanswered.record(entry)
        embedder = self._embedder() if self._embedder is not None else None
        if embedder is not None and self._spawn is not None:
            self._spawn(asyncio.to_thread(GROUPER.warm, embedder, [entry.question]))

    async def refused(self, platform: str, bot: str, kbs: Sequence[str], question: str) -> None:
        """A refusal for lack of knowledge."""
        from bots.unanswered import Entry

        if platform == EVAL_PLATFORM:
            return
        with contextlib.suppress(StoreUnavailable):
            await self.usage.refused(bot)
            await self._record(Entry(question, bot, tuple(kbs), "no_match", time.time()))

    async def answered(self, platform: str, bot: str, kbs: Sequence[str], question: str, answer_id: str, *,
                       complete: bool, tokens_in: int, tokens_out: int, ttft_ms: float | None, wait_ms: float,
                       best_similarity: float | None, cut: float | None, given: int) -> None:
        """A generated answer; with knowledge bases, its best chunk's similarity against the cut
        (``given``: chunks in its prompt; none given is a no_match answered without documents)."""
        from bots.unanswered import LOW_MARGIN, Entry

        if platform == EVAL_PLATFORM:
            return
        with contextlib.suppress(StoreUnavailable):
            await self.usage.answered(bot, complete=complete, tokens_in=tokens_in, tokens_out=tokens_out,
                                      ttft_ms=ttft_ms, wait_ms=wait_ms)
            if not kbs or not complete:
                return
            kind = "no_match" if not given else (
                "low_score" if best_similarity is None or (cut is not None and best_similarity < cut + LOW_MARGIN)
                else "")
            if kind:
                await self._record(Entry(question, bot, tuple(kbs), kind, time.time(), best_similarity, answer_id))
