"""The contract between connectors and the bots layer.

A connector is handed a :class:`Dispatcher`; it turns platform events into
:class:`~core.messages.InboundMessage`, records them (``accept``) and calls ``dispatch``,
which either raises at once (:class:`Busy`, :class:`Rejected`; :class:`Interrupted` for a
recorded message while the daemon stops) or returns an :class:`Answer` to stream.
Connectors never see models, prompts or Redis keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from core.kv import KeyValueCache
from core.messages import ChatTurn, InboundMessage, ReplyEvent, ThreadKey


class Busy(Exception):
    """No room for this message now; the caller should answer "busy, try again" at once."""

    def __init__(self, reason: str, retry_after: int, per_user: bool = False, user_message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.per_user = per_user
        # When set, what the user should read instead of a generic "busy".
        self.user_message = user_message


class Rejected(Exception):
    """The message itself cannot be answered (unknown bot, too long, ...); ``status`` is HTTP-like."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Interrupted(Exception):
    """The daemon is stopping before this answer was finished: leave the message in the
    durable inbox (do not call ``finished``); the next start answers it."""


class Answer(Protocol):
    id: str

    def events(self) -> AsyncIterator[ReplyEvent]:
        """Deltas as they are produced, then one final event (``done``) with the whole text."""
        ...

    def cancel(self) -> None:
        """The client went away: stop generating."""
        ...


class Dispatcher(Protocol):
    model_name: str
    n_ctx: int

    async def dispatch(self, msg: InboundMessage) -> Answer: ...

    async def reset(self, thread: ThreadKey) -> bool: ...

    async def history(self, thread: ThreadKey) -> list[ChatTurn]: ...

    def bot_names(self) -> list[str]: ...

    def health(self) -> dict[str, Any]: ...

    async def first_time(self, platform: str, event_id: str) -> bool:
        """True the first time an event id is seen (atomic across workers); False for a redelivery."""
        ...

    async def accept(self, msg: InboundMessage, connector: str) -> bool:
        """Record ``msg`` durably before the platform is told "received"; False for a redelivery.

        Call before acknowledging the event; call :meth:`finished` once the answer is shown.
        """
        ...

    async def note_progress(self, msg: InboundMessage, progress: dict[str, Any]) -> None:
        """Remember what was posted for ``msg`` (message ids), so a replay edits rather than reposts."""
        ...

    async def finished(self, msg: InboundMessage) -> None:
        """The platform has the final answer (or refusal) for ``msg``: drop its durable record."""
        ...

    @property
    def cache(self) -> KeyValueCache:
        """Shared key-value cache (access tokens and the like) and dead letters."""
        ...
