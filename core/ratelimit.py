"""Per-user and per-chat limits kept in Redis, so they hold across restarts and across
several botd instances: messages per minute (fixed one-minute windows) and tokens per
day (UTC days). A limit of 0 is off. When Redis is unreachable nothing is limited.

"Per user" is per :attr:`~core.messages.InboundMessage.quota_key`: the identity the
connector authenticated (an API key, a token's subject), never a name the caller chose.
Tool commands (``/calc``, ``/tool``) also hold one of the user's few places for
concurrent tool calls while they run (kept in this process: a place is a running call).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from core.config import LimitsConfig
from core.errors import BotdError
from core.messages import InboundMessage
from core.redis_store import RedisManager, StoreUnavailable


class LimitExceeded(BotdError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, redis: RedisManager, prefix: str, cfg: LimitsConfig) -> None:
        self.redis = redis
        self.prefix = prefix
        self.cfg = cfg
        self._tool_calls: dict[str, int] = {}  # quota key -> tool calls running now

    @contextlib.contextmanager
    def tool_call(self, msg: InboundMessage) -> Iterator[None]:
        """Hold one of the user's places for a concurrent tool call while the block runs; raise
        :class:`LimitExceeded` at once when they are all taken (``user_tool_calls_in_flight``)."""
        cap, key = self.cfg.user_tool_calls_in_flight, msg.quota_key
        running = self._tool_calls.get(key, 0)
        if cap and running >= cap:
            raise LimitExceeded(f"This user already has {running} tool calls running (the limit is {cap}); "
                                "please wait for them to finish.", 5)
        self._tool_calls[key] = running + 1
        try:
            yield
        finally:
            left = self._tool_calls.get(key, 1) - 1
            if left > 0:
                self._tool_calls[key] = left
            else:
                self._tool_calls.pop(key, None)

    def _scopes(self, msg: InboundMessage) -> list[tuple[str, str, int, int]]:
        """(what, id, messages per minute, tokens per day) for the user and for the chat."""
        return [
            ("user", msg.quota_key, self.cfg.user_messages_per_minute, self.cfg.user_tokens_per_day),
            ("chat", f"{msg.platform}:{msg.bot}:{msg.chat}", self.cfg.chat_messages_per_minute,
             self.cfg.chat_tokens_per_day),
        ]

    async def admit(self, msg: InboundMessage) -> None:
        """Count this message; raise :class:`LimitExceeded` (counting nothing more) when over a limit."""
        now = time.time()
        minute, day = int(now // 60), time.strftime("%Y%m%d", time.gmtime(now))
        client = self.redis.client
        try:
            for what, ident, per_minute, per_day in self._scopes(msg):
                if per_day:
                    used = int(await self.redis.run("GET", client.get, f"{self.prefix}:rl:tok:{ident}:{day}") or 0)
                    if used >= per_day:
                        wait = int(86400 - now % 86400) + 1
                        raise LimitExceeded(
                            f"This {what} has used its {per_day} tokens for today; "
                            f"the allowance renews in {wait // 3600} h {wait % 3600 // 60} min (00:00 UTC).", wait)
                if per_minute:
                    key = f"{self.prefix}:rl:msg:{ident}:{minute}"

                    async def count(key: str = key) -> int:
                        async with client.pipeline(transaction=True) as pipe:
                            pipe.incr(key)
                            pipe.expire(key, 120)
                            n, _ = await pipe.execute()
                        return int(n)

                    n = await self.redis.run("INCR", count)
                    if n > per_minute:
                        wait = int(60 - now % 60) + 1
                        raise LimitExceeded(
                            f"This {what} has sent {per_minute} messages this minute; please try again in {wait} s.",
                            wait)
        except StoreUnavailable:
            return

    async def spend(self, msg: InboundMessage, tokens: int) -> None:
        """Add an answer's tokens (prompt + reply) to today's totals."""
        if tokens <= 0:
            return
        day = time.strftime("%Y%m%d", time.gmtime())
        try:
            client = self.redis.client
        except StoreUnavailable:
            return
        for _what, ident, _per_minute, per_day in self._scopes(msg):
            if not per_day:
                continue
            key = f"{self.prefix}:rl:tok:{ident}:{day}"

            async def add(key: str = key) -> None:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.incrby(key, tokens)
                    pipe.expire(key, 2 * 86400)
                    await pipe.execute()

            try:
                await self.redis.run("INCRBY", add)
            except StoreUnavailable:
                return
