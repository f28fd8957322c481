"""The last hour of figures, kept in memory: tokens/s, prompt cache hits, queue, per-platform events.

A sampler reads the process's counters (core.metrics) and the runtime's health every few
seconds and keeps the differences; :meth:`LastHour.snapshot` folds them into one-minute
buckets for charts. Nothing is stored anywhere: a restart starts an empty hour. One
:data:`LAST_HOUR` per process, like the metrics registry, so a connector that is replaced by a
reload keeps the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core import metrics

WINDOW_S = 3600
BUCKET_S = 60
# Outcomes (botd_messages_total) that count as a platform's errors.
ERROR_OUTCOMES = frozenset({"error"})


@dataclass(slots=True)
class Sample:
    t: float  # wall clock
    dt: float
    completion_tokens: float
    prompt_read: float
    prompt_reused: float
    queue_depth: int
    active: int
    messages: int
    errors: int


@dataclass(slots=True)
class PlatformActivity:
    events: int = 0
    errors: int = 0
    last_event: float | None = None
    last_error: float | None = None
    last_outcome: str = ""


@dataclass
class LastHour:
    window_s: int = WINDOW_S
    samples: deque[Sample] = field(default_factory=deque)
    platforms: dict[str, PlatformActivity] = field(default_factory=dict)
    # (time, what): errors seen by the sampler, newest last, at most 50.
    errors: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=50))
    _last: dict[str, float] | None = None
    _last_t: float = 0.0
    _last_redis_error: str | None = None

    def sample(self, health: dict[str, Any], now: float | None = None) -> None:
        """Take one reading of the counters and ``health`` (the runtime's health dict)."""
        now = time.time() if now is None else now
        engine = health.get("engine") or {}
        current: dict[str, float] = {
            "completion": metrics.REGISTRY.get_sample_value("botd_tokens_total", {"kind": "completion"}) or 0.0,
            "read": float(engine.get("prompt_tokens_read", 0)),
            "reused": float(engine.get("prompt_tokens_reused", 0)),
        }
        outcomes: dict[tuple[str, str], float] = {}
        for family in metrics.MESSAGES.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    outcomes[(s.labels["platform"], s.labels["outcome"])] = s.value
        for (platform, outcome), value in outcomes.items():
            current[f"m:{platform}:{outcome}"] = value
        redis_error = health.get("redis_error")
        if redis_error and redis_error != self._last_redis_error:
            self.errors.append((now, f"redis: {redis_error}"))
        self._last_redis_error = redis_error
        last, self._last = self._last, current
        if last is None:  # the first reading is the baseline
            self._last_t = now
            return

        def delta(key: str) -> float:
            # A counter that went back (a new engine after a reload) starts a new baseline.
            return max(0.0, current.get(key, 0.0) - last.get(key, 0.0))

        messages = errors = 0
        for platform, outcome in outcomes:
            d = int(delta(f"m:{platform}:{outcome}"))
            if not d:
                continue
            act = self.platforms.setdefault(platform, PlatformActivity())
            act.events += d
            act.last_event, act.last_outcome = now, outcome
            messages += d
            if outcome in ERROR_OUTCOMES:
                act.errors += d
                act.last_error = now
                errors += d
                self.errors.append((now, f"{platform}: {d} answer(s) ended with {outcome}"))
        dt, self._last_t = max(1e-6, now - self._last_t), now
        self.samples.append(Sample(
            t=now, dt=dt, completion_tokens=delta("completion"), prompt_read=delta("read"),
            prompt_reused=delta("reused"), queue_depth=int(health.get("queue_depth", 0)),
            active=int(engine.get("active_sequences", 1 if health.get("generating") else 0)),
            messages=messages, errors=errors,
        ))
        while self.samples and self.samples[0].t < now - self.window_s:
            self.samples.popleft()

    def snapshot(self, now: float | None = None, bucket_s: int = BUCKET_S) -> dict[str, Any]:
        """The hour in ``bucket_s`` buckets (oldest first), and each platform's last event and error."""
        now = time.time() if now is None else now
        buckets: dict[int, list[Sample]] = {}
        for s in self.samples:
            if s.t >= now - self.window_s:
                buckets.setdefault(int(s.t // bucket_s), []).append(s)
        series = []
        for start, items in sorted(buckets.items()):
            seconds = sum(s.dt for s in items)
            prompt = sum(s.prompt_read + s.prompt_reused for s in items)
            series.append({
                "t": start * bucket_s,
                "tokens_per_s": round(sum(s.completion_tokens for s in items) / seconds, 2),
                "cache_hit_ratio": round(sum(s.prompt_reused for s in items) / prompt, 3) if prompt else None,
                "queue_depth": max(s.queue_depth for s in items),
                "active_sequences": max(s.active for s in items),
                "messages": sum(s.messages for s in items),
                "errors": sum(s.errors for s in items),
            })
        return {
            "bucket_s": bucket_s,
            "series": series,
            "platforms": {p: {"events": a.events, "errors": a.errors, "last_event": a.last_event,
                              "last_error": a.last_error, "last_outcome": a.last_outcome}
                          for p, a in sorted(self.platforms.items())},
            "recent_errors": [{"t": t, "what": w} for t, w in reversed(self.errors)],
        }


LAST_HOUR = LastHour()


async def run_sampler(health: Callable[[], dict[str, Any]], every_s: float, into: LastHour = LAST_HOUR) -> None:
    """Sample ``health()`` and the counters every ``every_s`` seconds until cancelled."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            with contextlib.suppress(Exception):  # a figure that cannot be read is no reason to stop
                into.sample(health())
            await asyncio.sleep(every_s)
