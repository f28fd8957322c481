"""What a connector is, and what it is handed.

A platform connector verifies and parses its platform's events, builds an inbound
message and a reply target, and makes one call, ``service.receive(message, target)``.
Request/response edges (the HTTP API, ``botd chat``) call ``service.dispatch`` and
stream the answer themselves. A connector is an async context manager: entering it
starts receiving (polling loops, sockets, API sessions), leaving it closes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import ClassVar, Protocol, Self

from connectors.reply import ReplyTarget
from core.config import Config, Settings
from core.dispatch import Answer
from core.feedback import FeedbackEvent, FeedbackReply
from core.kv import KeyValueCache
from core.messages import Account, Attachment, ChatTurn, InboundMessage, ThreadKey


class Service(Protocol):
    """The bots layer, as a connector sees it: the few calls connectors make (the web console
    is handed its own backend instead: ``connectors/web_console/backend.py``)."""

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def command_names(self) -> Sequence[str]:
        """The chat commands botd answers (``help``, ``reset``, ...): a platform that addresses
        commands to one bot (Telegram's ``/reset@bot``) tells them from other text with it."""
        ...

    def bot_names(self) -> list[str]: ...

    async def route(self, msg: InboundMessage, account: Account,
                    departments: Callable[[], Awaitable[Sequence[str]]] | None = None) -> str:
        """The bot that answers ``msg`` (``[[routes]]``, then the account's own routes)."""
        ...

    async def receive(self, msg: InboundMessage, target: ReplyTarget) -> bool:
        """Take a platform message: recorded durably (platform retries dropped in the same
        step), routed, answered into ``target`` in the background. Returns once it is
        recorded (tell the platform "received" then); False for a retry or a refused sender."""
        ...

    async def dispatch(self, msg: InboundMessage,
                       download: Callable[[Attachment, int], Awaitable[bytes]] | None = None) -> Answer:
        """``msg`` answered; ``download`` fetches its attachments (the API's inline parts)."""
        ...

    def answered_by(self, answer: Answer) -> str:
        """The name of the model that generates ``answer`` ("" for a fixed text)."""
        ...

    async def reset(self, thread: ThreadKey) -> bool: ...

    async def history(self, thread: ThreadKey) -> list[ChatTurn]: ...

    async def feedback(self, event: FeedbackEvent) -> FeedbackReply:
        """A 👍 / 👎 (or a reason) on an answer, verified by the connector: checked (same chat, not
        a replay, the bot's feedback on) and stored; the reply says what to tell the user."""
        ...


# (HTTP method, path, name of the connector's handler method)
Route = tuple[str, str, str]


class Edge:
    """What the daemon starts, routes to and stops: a platform connector, or the web console.
    Webhook-style edges name routes that botd's one aiohttp server serves; polling or socket
    connectors run their own tasks while entered."""

    name: str = ""
    # What the daemon hands this edge: "service" (:class:`Service`), or "admin" (the console's
    # backend, declared by the console itself).
    hands: ClassVar[str] = "service"

    def __init__(self, backend: object, settings: Settings, cache: KeyValueCache) -> None:
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

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop_receiving()
        await self.close()


class Connector(Edge):
    """A platform edge (or a request/response one: the HTTP API, ``botd chat``): handed the service."""

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.service = service
