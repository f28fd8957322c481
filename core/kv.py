"""A small namespaced key-value cache in Redis for connectors (access tokens, bot ids),
and a dead-letter list for replies that could not be delivered.

Connectors never build Redis keys themselves; they name a key and this module puts it
under ``{prefix}:cache:``. Values are shared by every botd worker using the same Redis.
"""

from __future__ import annotations

import json
import time
from typing import Any

from core.redis_store import RedisManager, StoreUnavailable


class KeyValueCache:
    def __init__(self, redis: RedisManager, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, name: str) -> str:
        return f"{self.prefix}:cache:{name}"

    async def get(self, name: str) -> str | None:
        return await self.redis.run("GET", self.redis.client.get, self._key(name))

    async def set(self, name: str, value: str, ttl_s: int) -> None:
        await self.redis.run("SET", self.redis.client.set, self._key(name), value, ex=max(1, ttl_s))

    async def claim_once(self, name: str, ttl_s: int) -> bool:
        """True for exactly one caller among all daemons within ``ttl_s`` (a scheduled job's run);
        True as well when Redis is unreachable (doing it twice beats not at all)."""
        try:
            return bool(await self.redis.run("SET NX", self.redis.client.set, self._key(f"once:{name}"), "1",
                                             nx=True, ex=max(1, ttl_s)))
        except StoreUnavailable:
            return True

    async def delete(self, name: str) -> None:
        await self.redis.run("DEL", self.redis.client.delete, self._key(name))

    async def dead_letter(self, platform: str, item: dict[str, Any]) -> None:
        """Keep an undeliverable reply for an admin to see (LRANGE {prefix}:deadletter 0 -1)."""
        entry = json.dumps({"platform": platform, "ts": time.time(), **item}, ensure_ascii=False)
        key = f"{self.prefix}:deadletter"

        async def _push() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.lpush(key, entry)
                pipe.ltrim(key, 0, 9999)
                await pipe.execute()

        await self.redis.run("LPUSH", _push)
