"""An answer's events with a hook for a slow start: the plumbing behind the waiting notice.

:func:`with_notice` passes an answer's events through unchanged; when the first one has not
come after ``after_s`` seconds, it awaits ``notify`` once (which shows the user where they
stand) and then goes on waiting. The platforms' delivery (bots/delivery.py) and the console's
chat stream share it; what the notice says is decided above, in the bots layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def with_notice(events: AsyncIterable[T], after_s: float,
                      notify: Callable[[], Awaitable[None]]) -> AsyncIterator[T]:
    """``events``, with ``notify`` awaited once if the first one takes longer than ``after_s``
    (0: never). An exception from ``notify`` ends the iteration (the answer is stopped by the
    caller)."""
    it = aiter(events)
    if after_s > 0:
        first = asyncio.ensure_future(anext(it))
        try:
            done, _ = await asyncio.wait({first}, timeout=after_s)
            if not done:
                await notify()
            ev = await first
        except StopAsyncIteration:
            return
        finally:
            if not first.done():
                first.cancel()
        yield ev
    async for ev in it:
        yield ev
