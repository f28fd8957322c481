"""Exactly-once for platform redeliveries: an atomic "first time I see this id?" in Redis.

Platforms retry events they think we missed (Slack event_id, Telegram update_id, WeCom
MsgId). ``SET key 1 NX EX ttl`` answers for all workers at once. When Redis is
unreachable the event is let through (an answer twice beats no answer) and logged.
"""

from __future__ import annotations

import structlog

from core import metrics
from core.redis_store import RedisManager, StoreUnavailable

log = structlog.get_logger("botd.dedupe")


class Deduper:
    def __init__(self, redis: RedisManager, prefix: str, ttl_s: int = 24 * 3600) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    async def first_time(self, platform: str, event_id: str) -> bool:
        key = f"{self.prefix}:seen:{platform}:{event_id}"
        try:
            fresh = await self.redis.run("SET NX", self.redis.client.set, key, "1", nx=True, ex=self.ttl_s)
        except StoreUnavailable:
            log.warning("dedupe unavailable: redis unreachable; processing the event", platform=platform)
            return True
        if not fresh:
            metrics.DUPLICATES.labels(platform).inc()
            log.info("duplicate delivery dropped", platform=platform, event_id=event_id)
        return bool(fresh)
