"""What every connector looks like to the daemon that runs it."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any

import structlog
from aiohttp import web

from core.config import Config
from core.dispatch import Dispatcher
from core.messages import InboundMessage

log = structlog.get_logger("botd.connector")


class Connector(ABC):
    """A platform edge. Webhook-style connectors add routes to botd's one aiohttp server;
    polling or socket connectors run their own tasks between :meth:`start` and :meth:`stop`."""

    name: str = ""
    # The config section this connector reads: a reload that changes it replaces the connector.
    section: str = ""

    def __init__(self, dispatcher: Dispatcher, config: Config) -> None:
        self.dispatcher = dispatcher
        self.config = config
        # Answers under way: kept so that stop() can wait for them.
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    @abstractmethod
    def enabled(cls, config: Config) -> bool:
        """Whether the config asks for this connector."""

    def routes(self) -> list[web.RouteDef]:
        return []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin receiving (polling loops, sockets). Routes are served by the daemon's server."""

    async def stop_receiving(self) -> None:  # noqa: B027 - optional hook
        """Stop taking new events (polling loops, sockets); answers under way go on."""

    async def stop(self, grace_s: float = 30.0) -> None:  # noqa: B027 - optional hook
        """Stop receiving, then wait (up to ``grace_s``) for the answers under way and clean up."""

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def replay(self, inbound: InboundMessage) -> Coroutine[Any, Any, None] | None:
        """The coroutine that answers a message accepted before a restart; None when it cannot
        be answered any more (its platform account is gone from the config)."""
        return None

    async def resume(self, messages: list[InboundMessage]) -> None:
        """Answer messages accepted before a restart (from the durable inbox)."""
        for inbound in messages:
            coro = self.replay(inbound)
            if coro is None:
                log.warning("a message accepted before the restart cannot be answered: its account is no longer "
                            "configured; dropped", connector=self.name, bot=inbound.bot)
                await self.dispatcher.finished(inbound)
            else:
                self._spawn(coro)
