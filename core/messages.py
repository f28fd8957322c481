"""The core's message types: thread keys, chat turns, inbound messages and reply events.

Connectors turn platform events into :class:`InboundMessage`; the bots layer answers
with a stream of :class:`ReplyEvent`. Nothing here knows about a platform or a model.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
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
    """One turn of a thread. ``content`` is what its author wrote (what people are shown);
    ``shown`` is the text the model was given for it when that differs (a question with the
    documents retrieved for it), kept so that the next turn's prompt repeats it token for
    token and the thread's KV prefix stays valid."""

    role: Role
    content: str
    shown: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    def for_model(self) -> dict[str, str]:
        """The turn as the model saw it."""
        return {"role": self.role, "content": self.content if self.shown is None else self.shown}

    def plain(self) -> ChatTurn:
        """The turn without what was added for the model."""
        return self if self.shown is None else ChatTurn(self.role, self.content)


AttachmentKind = Literal["file", "image", "voice"]


@dataclass(frozen=True, slots=True)
class Attachment:
    """Something sent with (or instead of) text: a document, a picture, a voice message.

    Only the platform's handle is kept (``ref``: a file id, a media id, a download code, a
    console upload key; JSON-able), never the bytes: the message is recorded durably and a
    restarted daemon fetches the content again through its reply target
    (:meth:`connectors.reply.ReplyTarget.download`)."""

    kind: AttachmentKind
    name: str = ""  # the file name as sent (cited in answers); "" when the platform gives none
    mime: str = ""
    size: int | None = None  # bytes, as the platform announced it (None: not said)
    ref: Mapping[str, Any] = field(default_factory=dict)
    # The platform's own speech-to-text of a voice message (WeCom AI bot, DingTalk), if any.
    transcript: str | None = None
    duration_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "mime": self.mime, "size": self.size,
                "ref": dict(self.ref), "transcript": self.transcript, "duration_s": self.duration_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attachment:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


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
    # A client running its own tools (OpenAI API): their definitions, its choice ("auto",
    # "none", "required" or a tool's name), and its whole conversation with the calls and
    # results in it (rendered as given, never stored).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"
    messages: list[dict[str, Any]] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # The platform account (a Telegram bot, a Slack app, a WeCom app) that received it.
    account: str = ""
    # Who the connector authenticated, when that is not ``user`` itself: the API key, the
    # token's subject, an anonymous caller's address. The API's ``user`` field is the caller's
    # word: it may narrow the identity (its own history), never widen its quota.
    principal: str = ""
    # False for what the bot cannot read (a sticker, a video): it is told so, not answered.
    readable: bool = True
    # Files, pictures and voice messages sent with it (``text`` may then be empty).
    attachments: list[Attachment] = field(default_factory=list)
    # Where the answer goes on the platform (chat ids, thread ts, ...): JSON-able, kept with
    # the durable record so that a restarted daemon can answer.
    route: dict[str, Any] = field(default_factory=dict)
    # Set by the durable inbox: recorded in Redis; read back after a restart; what was
    # already posted; the finished answer when it was stored before the restart.
    durable: bool = False
    resumed: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    final_answer: str | None = None
    # Its entry in the inbox's stream (the daemon answering it keeps the entry fresh).
    entry: str = ""

    @property
    def thread_key(self) -> ThreadKey:
        return ThreadKey(self.platform, self.bot, self.chat, self.thread)

    @property
    def quota_key(self) -> str:
        """Whose limits and queue share this message counts against: the authenticated
        principal when the connector named one, else the platform's (verified) user."""
        return f"{self.platform}:{self.principal or self.user}"


@dataclass(frozen=True, slots=True)
class Account:
    """One configured platform account (a Telegram bot, a Slack app, a WeCom app) as the bots
    layer sees it: which bot answers where, and who may talk to it. Each connector builds
    these from its own config section; the rules are applied once, above the connectors.
    """

    connector: str  # the registry name of the connector that owns it
    name: str  # the config key, which is also the bot that answers by default
    # chat id -> bot: some chats go to another bot (and so to its knowledge bases).
    routes: Mapping[str, str] = field(default_factory=dict)
    # Empty sets allow everyone; ``groups`` (departments) are looked up by the reply target.
    allow_chats: frozenset[str] = frozenset()
    allow_users: frozenset[str] = frozenset()
    allow_groups: frozenset[str] = frozenset()
    # Say "not allowed" to a refused user (a private app) rather than stay silent (a group).
    tell_refused: bool = False

    def bot_for(self, chat: str) -> str:
        return self.routes.get(chat, self.name)

    def admits(self, chat: str, user: str) -> bool | None:
        """True: allowed; False: refused; None: only the user's groups can tell."""
        if self.allow_chats and chat not in self.allow_chats:
            return False
        if not self.allow_users and not self.allow_groups:
            return True
        if user in self.allow_users:
            return True
        return None if self.allow_groups else False


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
    EXPIRED = "expired"  # it waited past [queue] max_wait_s without being started: nothing was generated
    ERROR = "error"  # the generation failed

    @property
    def complete(self) -> bool:
        """The text is the whole answer the model meant to give (or was allowed to)."""
        return self in (Finish.STOP, Finish.LENGTH, Finish.TIMEOUT)


@dataclass(frozen=True, slots=True)
class ReplyEvent:
    """One step of an answer: a text delta, or the end with its reason and usage.

    ``finish_reason`` (a :class:`Finish`) is set on the last event only. ``text`` on the
    last event is the whole answer; ``retry_after`` (seconds) comes with ``expired``.
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
