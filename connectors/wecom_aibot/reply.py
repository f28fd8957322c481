"""An answer as a WeCom AI bot stream message, continued by pushed messages.

The stream shows the whole answer so far (cumulative ``{"msgtype": "stream", "stream": {"id",
"finish", "content"}}``), updated no more often than ``update_interval_s`` and at least every
``keepalive_s`` while nothing new is written; it is finished (``finish: true``) when the answer
is over, when it reaches WeCom's 20,480-byte cap, or when ``stream_window_s`` (below WeCom's
6 minutes) has passed -- whichever comes first. What the stream could not show follows as
pushed markdown messages: ``aibot_send_msg`` over the long connection, or a POST to the
message's ``response_url`` in callback mode.

How a stream update reaches WeCom differs by mode (a :class:`Channel`): over the long
connection botd sends each update itself (``aibot_respond_msg`` with the callback's
``req_id``); in callback mode WeCom polls with stream refresh callbacks, answered from the
state this target keeps in Redis (any daemon can answer them).

At most ``max_in_flight`` streams are open per user and bot (WeCom allows 3): a further
answer waits for a free slot before its stream opens (:class:`Slots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import structlog

from connectors.reply import AttachmentUnavailable, ReplyTarget
from connectors.textsplit import split_text, utf8_len
from connectors.wecom_aibot.config import WecomAibotConfig
from connectors.wecom_aibot.media import AibotMedia
from core.kv import KeyValueCache
from core.messages import Account, Attachment
from core.redis_store import StoreUnavailable

log = structlog.get_logger("botd.wecom_aibot")

PLATFORM = "wecom_aibot"
STREAM_BYTES = 20_480  # WeCom's cap on stream content (and on a pushed markdown message)
EMPTY = "…"


class Channel(Protocol):
    """How one message's stream updates and pushes reach WeCom."""

    live: bool  # False: no stream can be opened any more (pushes only)

    async def update(self, stream_id: str, content: str, finish: bool) -> None: ...

    async def push(self, content: str) -> None: ...

    def retry_after(self, exc: Exception) -> float | None: ...

    def stream_dead(self, exc: Exception) -> bool:
        """Whether ``exc`` means the stream cannot be updated any more (expired, req_id gone)."""
        ...


class Slot:
    """One held place among a user's open streams; released once."""

    def __init__(self, slots: Slots, key: tuple[str, str]) -> None:
        self._slots: Slots | None = slots
        self.key = key

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._release(self.key)


class Slots:
    """Open streams per (bot, user): at most ``limit`` at once; a further one waits (never refused)."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, str], int] = {}
        self._waiters: dict[tuple[str, str], deque[asyncio.Future[None]]] = {}

    def used(self, key: tuple[str, str]) -> int:
        return self._used.get(key, 0)

    async def acquire(self, key: tuple[str, str], limit: int) -> Slot:
        while self.used(key) >= limit:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._waiters.setdefault(key, deque())
            queue.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
                if not queue:
                    self._waiters.pop(key, None)
        self._used[key] = self.used(key) + 1
        return Slot(self, key)

    def try_acquire(self, key: tuple[str, str], limit: int) -> Slot | None:
        if self.used(key) >= limit:
            return None
        self._used[key] = self.used(key) + 1
        return Slot(self, key)

    def _release(self, key: tuple[str, str]) -> None:
        left = self.used(key) - 1
        if left > 0:
            self._used[key] = left
        else:
            self._used.pop(key, None)
        for fut in self._waiters.get(key, ()):
            if not fut.done():
                fut.set_result(None)
                break


class AibotReply(ReplyTarget):
    """One message's answer: a stream, finished in time, the rest pushed."""

    edits = True
    limit = STREAM_BYTES
    measure = staticmethod(utf8_len)

    # Set by the connector: fetches and decrypts the pictures and files users send.
    media: AibotMedia | None = None

    def __init__(self, account: Account, cfg: WecomAibotConfig, channel: Channel, cache: KeyValueCache,
                 *, stream_id: str, user: str, slots: Slots, slot: Slot | None = None,
                 opened_at: float | None = None, covered: int = 0, stream_open: bool = False,
                 recall: bool = False) -> None:
        super().__init__(account, cfg.update_interval_s)
        self.cfg = cfg
        self.channel = channel
        self.cache = cache
        self.stream_id = stream_id
        self.user = user
        self.slots = slots
        self._slot = slot  # held while the stream is open
        # Wall-clock start of WeCom's window (callback mode: the user's message; long
        # connection: the first update), or None until the stream opens.
        self.opened_at = opened_at
        self.stream_open = stream_open
        self.stream_done = False
        self.shown = ""  # what the stream shows
        self.covered = covered  # characters of the answer already delivered (finished stream or pushes)
        # A replayed answer with the words of the first run: what that run delivered (its finished
        # stream, its pushes) is read back before the rest is pushed.
        self.recall = recall
        self.last_sent = time.monotonic()
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None

    # -- progress, for a replay after a restart --------------------------------------------------

    def progress(self) -> list[Any]:
        out: list[Any] = [f"stream:{self.stream_id}"] if self.stream_open or self.stream_done else []
        if self.stream_done:
            out.append(f"done:{self.covered}")
        return out

    # -- what the shared loop calls ------------------------------------------------------------------

    async def post(self, part: str, first: bool) -> Any:  # not used: updates() is this target's own
        raise NotImplementedError

    async def updates(self, text: str) -> AsyncIterator[list[Any]]:
        async with self._lock:
            changed = await self._update(text)
        if changed:
            yield self.progress()

    def retry_after(self, exc: Exception) -> float | None:
        return self.channel.retry_after(exc)

    async def closed(self, text: str) -> None:
        """Finish the stream with the whole answer (or what fits) and push the rest."""
        self._stop_watch()
        async with self._lock:
            try:
                if text.strip():
                    await self._update(text, final=True)
                if self.stream_open and not self.stream_done:
                    await self._finish(self.shown or EMPTY)
            finally:
                self._release()
            if self.recall:
                self.covered = max(self.covered, await self._recalled())
            rest = self._rest(text)
        for part in split_text(rest, STREAM_BYTES, utf8_len):
            if part.strip():
                await self.call(functools.partial(self.channel.push, part))
            self.covered += len(part)
            await self._note_covered()

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        if self.media is None:
            raise AttachmentUnavailable("wecom ai bot: the connector is not started")
        return await self.media.download(attachment, max_bytes)

    async def failed(self, exc: Exception, text: str) -> None:
        log.error("wecom ai bot reply could not be delivered", bot=self.account.name, user=self.user,
                  error=f"{type(exc).__name__}: {exc}")
        try:
            await self.cache.dead_letter(PLATFORM, {"bot": self.account.name, "user": self.user, "text": text,
                                                    "error": type(exc).__name__})
        except StoreUnavailable:
            log.error("dead letter lost: redis unreachable", user=self.user)

    # -- the stream -----------------------------------------------------------------------------------

    def _head(self, text: str) -> tuple[str, bool]:
        """What the stream can show of ``text``, and whether that is less than all of it."""
        if utf8_len(text) <= STREAM_BYTES:
            return text, False
        return split_text(text, STREAM_BYTES, utf8_len)[0], True

    async def _update(self, text: str, final: bool = False) -> bool:
        """Show ``text`` in the stream; True when the stream opened or finished (progress to record)."""
        if self.stream_done or (not self.channel.live and not self.stream_open):
            return False
        now = time.time()
        if self.stream_open and self.opened_at is not None and now >= self.opened_at + self.cfg.stream_window_s:
            await self._finish(self.shown or EMPTY)
            return True
        head, overflow = self._head(text)
        if not self.stream_open:
            if self._slot is None:
                self._slot = await self.slots.acquire((self.account.name, self.user), self.cfg.max_in_flight)
            if self.opened_at is None:
                self.opened_at = time.time()  # WeCom's window starts with the first update
            if not await self._send(head, finish=False):
                return True
            self.stream_open = True
            self._start_watch()
            if overflow or final:
                await self._finish(head)
            return True
        if overflow or final:
            await self._finish(head)
            return True
        if head != self.shown:
            await self._send(head, finish=False)
        return False

    async def _send(self, content: str, finish: bool) -> bool:
        """One stream update; False (and the stream counts as done) when WeCom no longer takes it."""
        try:
            await self.call(functools.partial(self.channel.update, self.stream_id, content, finish))
        except Exception as exc:
            if not self.channel.stream_dead(exc):
                raise
            log.warning("wecom ai bot stream can no longer be updated; the rest is pushed", bot=self.account.name,
                        error=str(exc))
            self.stream_done = True
            self._release()
            return False
        self.last_sent = time.monotonic()
        self.shown = content
        if finish:
            self.stream_done = True
            self._release()
        return True

    async def _finish(self, content: str) -> None:
        if await self._send(content, finish=True) and content != EMPTY:
            self.covered = max(self.covered, len(content))
            await self._note_covered()

    def _rest(self, text: str) -> str:
        # What the stream showed is always the start of the answer (it only grows).
        return text[self.covered:]

    @property
    def _covered_key(self) -> str:
        return f"wecom_aibot:covered:{self.stream_id}"

    async def _note_covered(self) -> None:
        """Remember how much of the answer the user has (a replay after a crash pushes only the rest)."""
        try:
            await self.cache.set(self._covered_key, str(self.covered), 86_400)
        except StoreUnavailable:
            pass

    async def _recalled(self) -> int:
        try:
            raw = await self.cache.get(self._covered_key)
        except StoreUnavailable:
            return 0
        return int(raw) if raw and raw.isdigit() else 0

    def abandon(self) -> None:
        # Another daemon answers this message now: no keepalive from here, the user's slot freed.
        self._stop_watch()
        self._release()

    def _release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    # -- keepalive and the window ---------------------------------------------------------------------

    def arm(self) -> None:
        """A stream opened before this target (callback mode: by the reply to the message itself):
        keep it alive and finish it within its window, also while the answer waits its turn."""
        if self.stream_open and not self.stream_done:
            self._start_watch()

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._watchdog(), name=f"wecom-aibot-stream-{self.stream_id}")

    def _stop_watch(self) -> None:
        task, self._watch = self._watch, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _watchdog(self) -> None:
        """Keep a quiet stream alive, and finish it before WeCom's window closes."""
        with contextlib.suppress(asyncio.CancelledError):
            while self.stream_open and not self.stream_done:
                deadline = (self.opened_at or time.time()) + self.cfg.stream_window_s
                keep_at = time.time() + self.last_sent + self.cfg.keepalive_s - time.monotonic()
                await asyncio.sleep(max(0.05, min(deadline, keep_at) - time.time()))
                async with self._lock:
                    if self.stream_done:
                        return
                    try:
                        if time.time() >= deadline:
                            log.info("wecom ai bot stream finished at the end of its window; the rest is pushed",
                                     bot=self.account.name, window_s=self.cfg.stream_window_s)
                            await self._finish(self.shown or EMPTY)
                        elif time.monotonic() >= self.last_sent + self.cfg.keepalive_s:
                            await self._send(self.shown or EMPTY, finish=False)
                    except Exception as exc:
                        log.warning("wecom ai bot stream keepalive failed", bot=self.account.name,
                                    error=f"{type(exc).__name__}: {exc}")
                        self.last_sent = time.monotonic()
