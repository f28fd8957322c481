"""A department's conversations as rows to export: JSON lines or an Excel-safe CSV (the console's).

The rows are the stored conversations (the threads' histories in Redis, as the console's
conversations page lists them) of the bots asked for, one row per message whose time falls in
the range asked: when, which conversation (platform, bot, chat, thread), who spoke (user or
assistant) and what. The bots are the ones the asking user may see: the console decides that,
this module reads only what it is handed. Bounded: at most :data:`MAX_ROWS` rows per export.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime
from typing import Any, Protocol

from core.messages import ThreadKey

MAX_ROWS = 100_000
MAX_THREADS = 5_000
COLUMNS = ("ts", "conversation", "platform", "bot", "chat", "thread", "role", "content")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ExportError(ValueError):
    """A range that cannot be read: the message says which field."""


class Conversations(Protocol):
    """What the export reads: the console backend's listing and one thread's messages."""

    async def conversations(self, bots: Collection[str], platform: str | None = None,
                            limit: int = 500) -> list[dict[str, Any]]: ...

    async def conversation(self, thread: ThreadKey) -> list[dict[str, Any]]: ...


def day_range(since: str, until: str) -> tuple[float, float]:
    """``since``..``until`` (YYYY-MM-DD, UTC, both days included; either may be empty) as unix times."""
    lo, hi = 0.0, float("inf")
    for name, value in (("from", since), ("to", until)):
        if not value:
            continue
        if not _DAY.match(value):
            raise ExportError(f"{name}: a day as YYYY-MM-DD")
        try:
            t = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise ExportError(f"{name}: {value!r} is not a day") from None
        if name == "from":
            lo = t
        else:
            hi = t + 86400
    if lo >= hi:
        raise ExportError("from: the range ends before it begins")
    return lo, hi


def iso(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def rows(source: Conversations, bots: Collection[str], since: float, until: float,
               ) -> AsyncIterator[dict[str, Any]]:
    """One row per stored message of ``bots`` sent in [since, until), conversation by conversation
    (the most recent conversation first, its messages in order)."""
    if not bots:
        return
    n = 0
    for c in await source.conversations(bots, limit=MAX_THREADS):
        if c.get("last_ts") is not None and c["last_ts"] < since:
            continue
        thread = ThreadKey(c["platform"], c["bot"], c["chat"], c["thread"])
        if thread.bot not in bots:  # the listing is the caller's, checked once more here
            continue
        for m in await source.conversation(thread):
            ts = m.get("ts")
            if not isinstance(ts, int | float) or not since <= ts < until:
                continue
            yield {"ts": iso(ts), "conversation": c["id"], "platform": thread.platform, "bot": thread.bot,
                   "chat": thread.chat, "thread": thread.thread, "role": m["role"], "content": m["content"]}
            n += 1
            if n >= MAX_ROWS:
                return
