"""What a connector is, and what it is handed.

A platform connector verifies and parses its platform's events, builds an inbound
message and a reply target, and makes one call, ``service.receive(message, target)``.
Request/response edges (the HTTP API, ``botd chat``) call ``service.dispatch`` and
stream the answer themselves. A connector is an async context manager: entering it
starts receiving (polling loops, sockets, API sessions), leaving it closes them.
"""

from __future__ import annotations

from collections.abc import Collection
from types import TracebackType
from typing import Any, Protocol

from connectors.reply import ReplyTarget
from core.config import Config, Settings
from core.dispatch import Answer
from core.kv import KeyValueCache
from core.messages import ChatTurn, InboundMessage, ThreadKey


class Service(Protocol):
    """The bots layer, as the connectors see it."""

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    async def receive(self, msg: InboundMessage, target: ReplyTarget) -> bool:
        """Take a platform message: recorded durably (platform retries dropped in the same
        step), routed, answered into ``target`` in the background. Returns once it is
        recorded (tell the platform "received" then); False for a retry or a refused sender."""
        ...

    async def dispatch(self, msg: InboundMessage) -> Answer: ...

    async def reset(self, thread: ThreadKey) -> bool: ...

    async def history(self, thread: ThreadKey) -> list[ChatTurn]: ...

    def bot_names(self) -> list[str]: ...

    def answered_by(self, answer: Answer) -> str:
        """The name of the model that generates ``answer`` ("" for a fixed text)."""
        ...

    def health(self) -> dict[str, Any]: ...

    # What the web console reads and steers; each takes the bots the asking user may see.

    async def conversations(self, bots: Collection[str], platform: str | None = None,
                            limit: int = 500) -> list[dict[str, Any]]: ...

    async def conversation(self, thread: ThreadKey) -> list[dict[str, Any]]: ...

    def thread_of(self, conversation_id: str) -> ThreadKey | None: ...

    async def knowledge_status(self, bots: Collection[str]) -> list[dict[str, Any]]: ...

    def reingest(self, kb: str) -> bool: ...

    def answer_details(self, answer: Any) -> dict[str, Any]: ...

    async def audit_tail(self, bots: Collection[str] | None, *, user: str = "", day: str = "",
                         limit: int = 200, max_bytes: int = 2_000_000) -> list[dict[str, Any]] | None: ...

    def audit_action(self, who: str, action: str, **details: Any) -> None: ...


# (HTTP method, path, name of the connector's handler method)
Route = tuple[str, str, str]


class Connector:
    """A platform edge. Webhook-style connectors name routes that botd's one aiohttp server
    serves; polling or socket connectors run their own tasks while entered."""

    name: str = ""

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        self.service = service
        self.settings = settings
        # Shared key-value cache (access tokens, thread follow-ups) and dead letters.
        self.cache = cache

    @property
    def config(self) -> Config:
        """The current config (read at use time: a reload swaps it under a running connector)."""
        return self.settings.config

    def routes(self) -> list[Route]:
        return []

    def target(self, msg: InboundMessage) -> ReplyTarget | None:
        """The reply target of a message recorded before a restart, rebuilt from its route;
        None when it cannot be answered any more (its account is gone from the config)."""
        return None

    async def start(self) -> None:
        """Begin receiving (polling loops, sockets, API sessions)."""

    async def stop_receiving(self) -> None:
        """Stop taking new events (polling loops, sockets); answers under way go on."""

    async def close(self) -> None:
        """Release what :meth:`start` opened (the answers are over by now)."""

    async def __aenter__(self) -> Connector:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop_receiving()
        await self.close()
