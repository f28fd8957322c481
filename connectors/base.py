"""What every connector looks like to the daemon that runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod

from aiohttp import web

from core.config import Config
from core.dispatch import Dispatcher


class Connector(ABC):
    """A platform edge. Webhook-style connectors add routes to botd's one aiohttp server;
    polling or socket connectors run their own tasks between :meth:`start` and :meth:`stop`."""

    name: str = ""

    def __init__(self, dispatcher: Dispatcher, config: Config) -> None:
        self.dispatcher = dispatcher
        self.config = config

    @classmethod
    @abstractmethod
    def enabled(cls, config: Config) -> bool:
        """Whether the config asks for this connector."""

    def routes(self) -> list[web.RouteDef]:
        return []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin receiving (polling loops, sockets). Routes are served by the daemon's server."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop receiving new events."""
