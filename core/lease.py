"""Leases in Redis: one holder at a time among all daemons on one Redis, with a fencing token.

A lease is a key set with ``NX`` and an expiry, holding a token from one counter shared by
every lease (``{prefix}:fence``): a later holder always has a larger token, so a write
guarded by the token (:meth:`Lease.guard`) is refused once the lease has moved on, even
from a holder that paused past its expiry. The holder renews it well before it expires
(every third of ``ttl_s``); a holder that dies lets it expire and another takes over.

While Redis is out of reach the holder keeps acting as holder only for half the TTL since
its last successful renewal (nobody can take the lease before the TTL has run out); past
that it lets go. A thread's turn, once lost, is never taken again by the same holder: the
answer it guarded has moved to another daemon, and a fresh token would let its stale
history write through.

Used for the singletons (Telegram long polling) and for a thread's turn (one answer at a
time per conversation, across daemons). Redis' own ``SET NX PX`` and two short Lua
scripts are all it needs; a library (e.g. redis-py's ``Lock``) has no fencing token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import structlog
from redis.asyncio.client import Pipeline

from core.errors import BotdError
from core.redis_store import RedisManager, StoreUnavailable

log = structlog.get_logger("botd.lease")

# KEYS: the lease; ARGV: value ("token|owner/run"), ttl ms, owner, owner/run. Taken when free,
# or when held by an earlier run of this same daemon (same instance name, so that run is gone:
# a restart does not wait out its own leases).
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder = string.match(cur, '|(.*)$') or ''
  local owner = string.match(holder, '^(.*)/[^/]*$') or ''
  if ARGV[3] == '' or owner ~= ARGV[3] or holder == ARGV[4] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Fenced(BotdError):
    """The lease moved to another holder: the guarded write was not made."""


# This process: a restart is a new run of the same daemon (instance name).
RUN = uuid.uuid4().hex[:12]


class Lease:
    def __init__(self, redis: RedisManager, prefix: str, name: str, ttl_s: float, owner: str = "",
                 regain: bool = True) -> None:
        self.redis = redis
        self.name = name
        self.key = f"{prefix}:lease:{name}"
        self._fence = f"{prefix}:fence"
        self.ttl_ms = int(ttl_s * 1000)
        # The daemon's instance name: its own leases from an earlier run are taken back at once.
        self.owner = owner
        self.token: str | None = None
        # Whether :meth:`keep` takes the lease again after losing it (singletons: yes; a turn: no).
        self.regain = regain
        # monotonic time at which the last successful acquire or renewal was sent.
        self._renewed_at = 0.0

    @property
    def held(self) -> bool:
        return self.token is not None

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (or renew it if we do)."""
        if self.token is not None:
            return await self.renew()
        token = f"{await self.redis.run('INCR', self.redis.client.incr, self._fence)}|{self.owner}/{RUN}"
        sent_at = time.monotonic()
        if await self.redis.run("acquire", self.redis.client.eval, _ACQUIRE, 1, self.key, token, self.ttl_ms,
                                self.owner, f"{self.owner}/{RUN}"):
            self.token, self._renewed_at = token, sent_at
            return True
        return False

    async def renew(self) -> bool:
        if self.token is None:
            return False
        sent_at = time.monotonic()
        ok = await self.redis.run("renew", self.redis.client.eval, _RENEW, 1, self.key, self.token, self.ttl_ms)
        if not ok:
            log.warning("lease lost to another holder", lease=self.name)
            self.token = None
        else:
            self._renewed_at = sent_at
        return bool(ok)

    async def release(self) -> None:
        token, self.token = self.token, None
        if token is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.redis.run("release", self.redis.client.eval, _RELEASE, 1, self.key, token)

    async def guard(self, pipe: Pipeline) -> None:
        """On a pipeline about to run a MULTI: WATCH the lease and check it is still ours, so the
        transaction is refused (:class:`Fenced`) if the lease moves before it runs."""
        await pipe.watch(self.key)
        if self.token is None or await pipe.get(self.key) != self.token:
            raise Fenced(f"the lease {self.name} is no longer held here")
        pipe.multi()

    async def keep(self, stop: asyncio.Event, on_change: asyncio.Event | None = None) -> None:
        """Hold the lease whenever it is free, renew it while held, until ``stop`` is set (then
        release it). Stopped by an event, not by cancelling: redis-py can swallow a
        cancellation that lands inside a command, and the loop would then renew forever."""
        try:
            while not stop.is_set():
                was = self.held
                try:
                    if self.held or self.regain:
                        await self.acquire()
                except StoreUnavailable:
                    # Still ours until the TTL since the last renewal runs out; past half of it,
                    # another daemon may take it soon: do not act as holder.
                    if time.monotonic() - self._renewed_at >= self.ttl_ms / 2000:
                        self.token = None
                if self.held != was:
                    log.info("lease taken" if self.held else "lease lost", lease=self.name)
                    if on_change is not None:
                        on_change.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.ttl_ms / 3000)
        finally:
            await asyncio.shield(self.release())


@contextlib.asynccontextmanager
async def turn(redis: RedisManager, prefix: str, name: str, ttl_s: float, owner: str = "",
               poll_s: float = 0.05) -> AsyncIterator[Lease | None]:
    """Wait for, hold and release the lease ``name`` (renewed meanwhile). Yields the lease, or
    None when Redis is unreachable: the caller goes on unguarded (an answer beats none)."""
    lease = Lease(redis, prefix, name, ttl_s, owner, regain=False)
    try:
        while not await lease.acquire():
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 1.5, 0.5)
    except StoreUnavailable:
        log.warning("redis unreachable: going on without the lease", lease=name)
        yield None
        return
    stop = asyncio.Event()
    renewer = asyncio.create_task(lease.keep(stop))
    try:
        yield lease
    finally:
        stop.set()
        await renewer


class Holding:
    """A singleton's lease kept for a block: ``async with Holding(lease, "task-name") as holding:``
    renews it in a task (:meth:`Lease.keep`, taking it again whenever it is free) and releases it
    on the way out. ``async for _ in holding.while_held(...)`` runs the block's work only while
    this daemon holds the lease: each turn of the loop comes while it is held; while another
    daemon holds it, the loop waits. The work itself checks :attr:`held` (e.g. between frames of
    a connection) and stops when the lease is lost; the loop then waits to take it again.

    The loop of every "one daemon at a time" edge: Telegram long polling, the WeCom AI bot's
    long connection, and the like.
    """

    def __init__(self, lease: Lease, task_name: str) -> None:
        self.lease = lease
        self._task_name = task_name
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self.lease.held

    async def __aenter__(self) -> Holding:
        self._keeper = asyncio.create_task(self.lease.keep(self._stop, self._changed), name=self._task_name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._keeper is not None:
            await asyncio.shield(self._keeper)

    async def wait_held(self) -> bool:
        """Whether the lease is held, waiting up to a renewal period for it to change hands."""
        if self.lease.held:
            return True
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), self.lease.ttl_ms / 3000)
        return self.lease.held

    async def while_held(self, stopping: Callable[[], bool], what: str, **fields: object) -> AsyncIterator[None]:
        """Yield once per turn of the caller's loop while the lease is held, until ``stopping()``;
        logs "<what> runs in this daemon" each time it is taken."""
        while not stopping():
            if not self.lease.held:
                if await self.wait_held():
                    log.info(f"{what} runs in this daemon", **fields)
                continue
            yield
