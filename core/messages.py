"""The core's message types: thread keys, chat turns, inbound messages and reply events.

Connectors turn platform events into :class:`InboundMessage`; the bots layer answers
with a stream of :class:`ReplyEvent`. Nothing here knows about a platform or a model.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ThreadKey:
    """One conversation: (platform, bot, chat, thread). Its history lives under this key."""

    platform: str
    bot: str
    chat: str
    thread: str = ""

    def redis_suffix(self) -> str:
        # Percent-escape ':' and '%' so that ids holding ':' cannot collide with other keys.
        def esc(part: str) -> str:
            return part.replace("%", "%25").replace(":", "%3A")

        return ":".join(esc(p) for p in (self.platform, self.bot, self.chat, self.thread))

    def __str__(self) -> str:
        return self.redis_suffix()


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(slots=True)
class InboundMessage:
    """A user's message, normalised by a connector."""

    platform: str
    bot: str
    chat: str
    user: str
    text: str
    thread: str = ""
    event_id: str = ""
    # Client-held history (stateless API calls); None means "use the server-side history".
    history: list[ChatTurn] | None = None
    # An explicit system prompt from the client (OpenAI-style); None: the bot's persona.
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # Where the answer goes on the platform (chat ids, thread ts, ...): JSON-able, kept with
    # the durable record so that a restarted daemon can answer.
    route: dict[str, Any] = field(default_factory=dict)
    # Set by the durable inbox: recorded in Redis; read back after a restart; what was
    # already posted; the finished answer when it was stored before the restart.
    durable: bool = False
    resumed: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    final_answer: str | None = None

    @property
    def thread_key(self) -> ThreadKey:
        return ThreadKey(self.platform, self.bot, self.chat, self.thread)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Finish(StrEnum):
    """How an answer ended. A ``StrEnum``: each member equals its plain string."""

    STOP = "stop"  # the model finished (or a command / fixed text was answered)
    LENGTH = "length"  # the token budget was spent
    TIMEOUT = "timeout"  # [queue] job_timeout_s stopped the generation
    CANCELLED = "cancelled"  # the client went away
    SHUTDOWN = "shutdown"  # the daemon stopped first; a platform message is answered after the restart
    BUSY = "busy"  # it waited past [queue] max_wait_s without being started: nothing was generated
    ERROR = "error"  # the generation failed

    @property
    def complete(self) -> bool:
        """The text is the whole answer the model meant to give (or was allowed to)."""
        return self in (Finish.STOP, Finish.LENGTH, Finish.TIMEOUT)


@dataclass(frozen=True, slots=True)
class ReplyEvent:
    """One step of an answer: a text delta, or the end with its reason and usage.

    ``finish_reason`` (a :class:`Finish`) is set on the last event only. ``text`` on the
    last event is the whole answer; ``retry_after`` (seconds) comes with ``busy``.
    """

    delta: str = ""
    finish_reason: Finish | None = None
    text: str = ""
    usage: Usage | None = None
    error: str | None = None
    # On the last event: the documents the answer was given ("file › heading").
    sources: tuple[str, ...] = ()
    retry_after: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
