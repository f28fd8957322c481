"""The one registry of the bots layer's background tasks.

Every task the top floor starts (a platform answer, the history write of a finished job, a
re-ingest) is spawned here, with the connector it answers through ("" for none), so that a
stop drains them all and a connector replaced by a reload waits for its own answers only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskRegistry:
    """Background tasks by the connector they answer through."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], str] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], connector: str = "") -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks[task] = connector
        # Forgotten when done: the registry holds only what is under way.
        task.add_done_callback(self._tasks.pop)
        return task

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for every task under way; those still running after ``timeout_s`` are cancelled."""
        await self._wait(list(self._tasks), timeout_s)

    async def drain_connector(self, connector: str, timeout_s: float) -> None:
        """Wait (bounded) for the tasks answering through ``connector``."""
        await self._wait([t for t, c in self._tasks.items() if c == connector], timeout_s)

    @staticmethod
    async def _wait(tasks: list[asyncio.Task[Any]], timeout_s: float) -> None:
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
