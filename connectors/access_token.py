"""An app access token shared by every daemon of a cluster: held in memory, kept in the shared
cache (``"<token> <unix time it stops being used>"``) so one daemon's fetch serves the others,
fetched again by one task at a time, and forgotten everywhere when the platform calls it bad.

DingTalk's accessToken and Feishu's tenant_access_token work alike; each connector hands in how
its platform fetches one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from core.kv import KeyValueCache
from core.redis_store import StoreUnavailable
from core.secrets import remember_secret

# A fetch returns the token and how many seconds it is good for (the platform's expiry, less a margin).
Fetch = Callable[[], Awaitable[tuple[str, float]]]


class SharedToken:
    def __init__(self, cache: KeyValueCache, key: str, fetch: Fetch) -> None:
        self.cache = cache
        self.key = key
        self._fetch = fetch
        self._held: tuple[str, float] | None = None  # (token, monotonic time it stops being used)
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self) -> str:
        """The token: this daemon's, else the cluster's, else a new one."""
        held = self._held
        if held is not None and time.monotonic() < held[1]:
            return held[0]
        async with self._lock:
            held = self._held
            if held is not None and time.monotonic() < held[1]:
                return held[0]
            try:  # another daemon of the cluster may have fetched it already
                raw = await self.cache.get(self.key)
            except StoreUnavailable:
                raw = None
            if raw:
                token, _, until = raw.partition(" ")
                left = float(until or 0) - time.time()
                if token and left > 0:
                    remember_secret(token)
                    self._held = (token, time.monotonic() + left)
                    return token
            self.fetches += 1
            token, life = await self._fetch()
            remember_secret(token)  # never in a log line
            self._held = (token, time.monotonic() + life)
            try:
                await self.cache.set(self.key, f"{token} {time.time() + life}", int(life))
            except StoreUnavailable:
                pass
            return token

    async def drop(self, token: str) -> None:
        """The platform called ``token`` invalid: forget it here and in the cluster's cache."""
        if self._held is not None and self._held[0] == token:
            self._held = None
        try:
            raw = await self.cache.get(self.key)
            if raw and raw.split(" ")[0] == token:
                await self.cache.delete(self.key)
        except StoreUnavailable:
            pass
