"""What asking the bots layer for an answer can come to, besides an answer.

``dispatch`` either raises at once (:class:`Busy`, :class:`Rejected`; :class:`Interrupted`
for a recorded message while the daemon stops) or returns an :class:`Answer` to stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from core.errors import BotdError
from core.messages import ReplyEvent


class Busy(BotdError):
    """No room for this message now; the caller should answer "busy, try again" at once."""

    def __init__(self, reason: str, retry_after: int, per_user: bool = False, user_message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.per_user = per_user
        # When set, what the user should read instead of a generic "busy".
        self.user_message = user_message


class Rejected(BotdError):
    """The message itself cannot be answered (unknown bot, too long, ...); ``status`` is HTTP-like."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Interrupted(BotdError):
    """The daemon is stopping before this answer was finished: its durable record stays and
    the next start answers it."""


class Answer(Protocol):
    id: str

    def events(self) -> AsyncIterator[ReplyEvent]:
        """Deltas as they are produced, then one final event (``done``) with the whole text."""
        ...

    def cancel(self) -> None:
        """The client went away: stop generating."""
        ...
