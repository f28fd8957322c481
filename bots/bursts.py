"""Bursts: a few quick messages of one sender in one thread answered as one turn.

People send a question in pieces ("hi" / "the VPN drops" / "since this morning"). Each piece
is recorded (and deduplicated) on its own by the durable inbox as it arrives; then, instead of
a generation per piece, :class:`Bursts` waits until the sender has been quiet for ``[queue]
debounce_s`` and answers the pieces as one message: their lines in order, their attachments
together, the first one's place (reply-to, thread) for the answer. The merge is one atomic
inbox step (:meth:`core.inbox.Inbox.merge`): the first record takes the whole text, the others
go. A crash before it leaves every piece recorded (a restart gathers them again); a crash after
it leaves the merged record: either way the turn is answered once and no piece is lost.

Commands never wait (and close the sender's open burst first); neither do messages that are
not read (refusals, stickers) nor, with ``debounce_s = 0``, anything. A burst is closed early
at :data:`MAX_PIECES` pieces, past ``[http_api] max_input_chars`` together, or once it has
been gathering for :data:`MAX_SPAN` times ``debounce_s``: a chatty user still gets answers.
Bursts are gathered per daemon: pieces that reach two daemons are answered as two turns, one
after the other (the thread's turn orders them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from bots.commands import parse_command
from bots.tasks import TaskRegistry
from connectors.http_api.config import ApiConfig
from connectors.reply import ReplyTarget
from core import metrics
from core.config import Settings
from core.inbox import Inbox
from core.messages import InboundMessage, ThreadKey

log = structlog.get_logger("botd.service")

# A burst is answered at this many pieces even if more are coming.
MAX_PIECES = 8
# ... and once it has gathered for this many times debounce_s since its first piece.
MAX_SPAN = 5

Answer = Callable[[InboundMessage, ReplyTarget], Coroutine[Any, Any, None]]


@dataclass(eq=False)
class _Burst:
    connector: str
    started: float
    deadline: float
    pieces: list[tuple[InboundMessage, ReplyTarget]] = field(default_factory=list)
    closing: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def chars(self) -> int:
        return sum(len(m.text) + 1 for m, _ in self.pieces)


def waits(msg: InboundMessage) -> bool:
    """Whether ``msg`` may be held back for the rest of a burst (a question in pieces)."""
    return msg.readable and msg.history is None and parse_command(msg.text) is None


def merged(pieces: list[InboundMessage]) -> InboundMessage:
    """One message for ``pieces`` (oldest first): their texts one per line, their attachments
    together, everything else the first one's (where the answer goes, its ids)."""
    lead = pieces[0]
    text = "\n".join(t for t in (m.text.strip() for m in pieces) if t)
    return replace(lead, text=text, attachments=[a for m in pieces for a in m.attachments])


class Bursts:
    """The open bursts of this daemon, by (thread, sender)."""

    def __init__(self, settings: Settings, inbox: Inbox, tasks: TaskRegistry, answer: Answer) -> None:
        self.settings = settings
        self.inbox = inbox
        self.tasks = tasks
        self.answer = answer
        self._open: dict[tuple[ThreadKey, str], _Burst] = {}

    def add(self, msg: InboundMessage, target: ReplyTarget, connector: str) -> None:
        """Answer ``msg`` now, or as part of its sender's burst once they are quiet."""
        debounce = self.settings.config.queue.debounce_s
        key = (msg.thread_key, msg.user)
        burst = self._open.get(key)
        if debounce <= 0 or not waits(msg) or target.account.admits(msg.chat, msg.user) is False:
            if burst is not None:
                self._close(burst)  # a command comes after the question the user was writing
            self.tasks.spawn(self.answer(msg, target), connector)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        max_chars = ApiConfig.of(self.settings.config).max_input_chars
        if burst is not None and (burst.closing or len(burst.pieces) >= MAX_PIECES
                                  or burst.chars + len(msg.text) > max_chars):
            self._close(burst)
            burst = None
        if burst is None:
            burst = self._open[key] = _Burst(connector, now, now)
            self.tasks.spawn(self._gather(key, burst), connector)
        burst.pieces.append((msg, target))
        burst.deadline = min(now + debounce, burst.started + MAX_SPAN * debounce)
        burst.changed.set()

    def _close(self, burst: _Burst) -> None:
        burst.closing = True
        burst.changed.set()

    async def _gather(self, key: tuple[ThreadKey, str], burst: _Burst) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not burst.closing and (wait := burst.deadline - loop.time()) > 0:
                burst.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(burst.changed.wait(), wait)
        finally:
            burst.closing = True
            if self._open.get(key) is burst:
                del self._open[key]
        await self._answer(burst.pieces, burst.connector)

    async def _answer(self, pieces: list[tuple[InboundMessage, ReplyTarget]], connector: str) -> None:
        if len(pieces) == 1:
            await self.answer(*pieces[0])
            return
        msgs = [m for m, _ in pieces]
        lead = merged(msgs)
        if await self.inbox.merge(lead, msgs[1:], connector):
            metrics.MERGED_MESSAGES.labels(lead.platform).inc(len(msgs) - 1)
            log.info("a burst of messages answered as one turn", platform=lead.platform, pieces=len(msgs),
                     request_id=lead.request_id)
            for _, target in pieces[1:]:
                # Nothing was shown for them; a platform that opened something per message (a WeCom
                # AI bot stream in callback mode, holding one of the user's places) closes it now.
                try:
                    await target.closed("")
                except Exception as exc:
                    log.warning("closing a merged message's reply failed", error=f"{type(exc).__name__}: {exc}")
            await self.answer(lead, pieces[0][1])
            return
        # Not merged (a piece moved to another daemon, Redis away): each answered on its own, in order.
        for msg, target in pieces:
            await self.answer(msg, target)
