"""Thread histories in Redis: one list per thread, appended one exchange at a time.

Key: ``{prefix}:hist:{platform}:{bot}:{chat}:{thread}``; each item is a JSON object
``{"role", "content", "ts"}``, plus ``"shown"`` when the model was given more than the
user wrote (the documents retrieved for a question). An exchange (user + assistant) is appended in one
MULTI/EXEC with the trim and the idle expiry, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from core.lease import Fenced, Lease
from core.messages import ChatTurn, ThreadKey
from core.redis_store import RedisManager


class HistoryStore:
    def __init__(self, redis: RedisManager, prefix: str, ttl_s: int, max_messages: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_messages = max_messages

    def key(self, thread: ThreadKey) -> str:
        return f"{self.prefix}:hist:{thread.redis_suffix()}"

    async def load(self, thread: ThreadKey, limit: int | None = None) -> list[ChatTurn]:
        """The thread's most recent turns, oldest first (raises StoreUnavailable)."""
        n = min(limit or self.max_messages, self.max_messages)
        raw = await self.redis.run("LRANGE", self.redis.client.lrange, self.key(thread), -n, -1)
        turns: list[ChatTurn] = []
        for item in raw:
            try:
                d = json.loads(item)
                if d.get("role") in ("user", "assistant") and isinstance(d.get("content"), str):
                    shown = d.get("shown")
                    turns.append(ChatTurn(d["role"], d["content"], shown if isinstance(shown, str) else None))
            except (ValueError, AttributeError):
                continue  # a foreign or damaged entry is skipped, not fatal
        return turns

    async def append_exchange(self, thread: ThreadKey, user_text: str, assistant_text: str,
                              also: Callable[[Pipeline], None] | None = None, fence: Lease | None = None,
                              user_shown: str | None = None) -> None:
        """Append one exchange; ``also`` adds commands to the same MULTI (the inbox's "answered").
        With ``fence`` (the thread's turn), nothing is written once the turn has moved to
        another daemon (raises :class:`~core.lease.Fenced`). ``user_shown``: the user turn as
        the model was given it, when that differs from ``user_text``."""
        now = time.time()
        key = self.key(thread)
        user: dict[str, object] = {"role": "user", "content": user_text, "ts": now}
        if user_shown is not None and user_shown != user_text:
            user["shown"] = user_shown
        items = [
            json.dumps(user, ensure_ascii=False),
            json.dumps({"role": "assistant", "content": assistant_text, "ts": now}, ensure_ascii=False),
        ]

        async def _tx() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                if fence is not None:
                    await fence.guard(pipe)
                pipe.rpush(key, *items)
                pipe.ltrim(key, -self.max_messages, -1)
                pipe.expire(key, self.ttl_s)
                if also is not None:
                    also(pipe)
                try:
                    await pipe.execute()
                except WatchError:
                    raise Fenced(f"the turn of {thread} moved to another daemon") from None

        await self.redis.run("append", _tx)

    async def reset(self, thread: ThreadKey) -> bool:
        """Forget one thread; True when there was something to forget."""
        return bool(await self.redis.run("DEL", self.redis.client.delete, self.key(thread)))
