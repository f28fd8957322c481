"""Reply targets: where one message's answer goes on its platform, and how it gets there.

A connector builds one :class:`ReplyTarget` per message beside the inbound message and
hands both up in one call. The target knows the platform's side of showing an answer:
post, edit in place, split past the length limit, remember what it posted (so that a
replay after a restart edits instead of posting twice) and obey "429, retry after".
*When* to show (the first text, then at most every ``interval``, once more at the end)
is the bots layer's policy, not the target's.

A platform subclass says only how to post one part and how to edit one, how long a
part may be, and which of its errors mean "slow down".

Every platform call that shows something goes through :meth:`ReplyTarget.call`, which first
awaits the target's ``fence`` when it has one (the bots layer sets it: "is this message
still this daemon's to answer?"); a fence that raises stops the answer before the call.
"""

from __future__ import annotations

import asyncio
import functools
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import structlog

from connectors.textsplit import split_text
from core.errors import BotdError
from core.feedback import FeedbackLabels
from core.kv import KeyValueCache
from core.messages import Account, Attachment
from core.redis_store import StoreUnavailable

log = structlog.get_logger("botd.reply")

_ATTEMPTS = 5


class RateLimited(BotdError):
    """The platform kept answering "slow down" for one call."""


class InheritedMarks:
    """Which parts posted before a restart another daemon marked in the shared cache (a card it
    was finalising when it died: the mark is set before the finalising call). Each part is
    looked up once; a marked one is remembered."""

    def __init__(self, cache: KeyValueCache, key: str, refs: Iterable[str]) -> None:
        self.cache = cache
        self.key = key  # with "{ref}" in it
        self._unchecked = set(refs)
        self._marked: set[str] = set()

    async def marked(self, ref: str) -> bool:
        if ref in self._marked:
            return True
        if ref not in self._unchecked:
            return False
        self._unchecked.discard(ref)
        try:
            done = await self.cache.get(self.key.format(ref=ref))
        except StoreUnavailable:
            done = None
        if done:
            self._marked.add(ref)
        return bool(done)


class AttachmentUnavailable(BotdError):
    """An attachment's content cannot be fetched from the platform."""


class AttachmentTooLarge(BotdError):
    """An attachment is larger than the limit it was fetched under."""


class ReplyTarget(ABC):
    """One message's answer on its platform: a list of posted parts, edited as the text grows."""

    # Whether a posted part can be changed: False sends each part once, with its final text.
    edits: bool = True
    # Shown while the model has not written anything yet (None: nothing).
    placeholder: str | None = None
    # The longest part the platform accepts, in ``measure`` units.
    limit: int = 4000
    measure: Callable[[str], int] = staticmethod(len)
    # How often "typing…" must be repeated while the answer is prepared (None: not shown).
    typing_every_s: float | None = None

    def __init__(self, account: Account, interval: float, sent: Sequence[Any] = ()) -> None:
        self.account = account
        self.interval = interval
        # Platform ids of the parts posted so far, with the text each shows; parts posted
        # before a restart are known by id only (their text: unknown, so edited again).
        self.sent: list[tuple[Any, str]] = [(ref, "") for ref in sent]
        self.not_before = 0.0  # "retry after": no call before this monotonic time
        # Awaited before every platform call that shows something; raises to stop the answer
        # (another daemon answers this message now). None: nothing to check.
        self.fence: Callable[[], Awaitable[None]] | None = None

    # -- what a platform says --------------------------------------------------------------

    @abstractmethod
    async def post(self, part: str, first: bool) -> Any:
        """Post one new part; returns its platform id. ``first``: the answer's first part."""

    async def edit(self, ref: Any, part: str) -> None:
        """Make the posted part ``ref`` show ``part`` (only called when :attr:`edits`)."""
        raise NotImplementedError

    def retry_after(self, exc: Exception) -> float | None:
        """Seconds to wait when ``exc`` means "slow down, then repeat"; None: it does not."""
        return None

    async def typing(self) -> None:  # noqa: B027 - optional
        """Show "typing…" once."""

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        """The content of ``attachment`` (a file, picture or voice message sent with the
        message), fetched from the platform with this target's credentials. Raises
        :class:`AttachmentTooLarge` past ``max_bytes`` (checked while reading, not after), and
        :class:`AttachmentUnavailable` when the platform cannot give it (expired, no access,
        or a platform that cannot download)."""
        raise AttachmentUnavailable(f"{type(self).__name__} cannot download attachments")

    async def user_groups(self, user: str) -> Sequence[str]:
        """The groups (departments) ``user`` belongs to, for accounts that allow by group."""
        return ()

    async def notice(self, text: str) -> None:
        """Show a short message of its own that the answer then follows (the waiting notice on a
        platform that cannot edit): one more post, not among the answer's parts."""
        await self.call(functools.partial(self.post, text, False))

    async def answered(self) -> None:  # noqa: B027 - optional
        """The answer is complete; called just before its last words are shown (e.g. Slack
        follows the thread from now on, before the user can reply to them)."""

    async def closed(self, text: str) -> None:  # noqa: B027 - optional
        """The answer is over (complete, refused or failed) and ``text`` was the last text shown.
        For a platform whose message stays open until told (a WeCom AI bot stream)."""

    async def offer_feedback(self, answer_id: str, labels: FeedbackLabels) -> None:  # noqa: B027 - optional
        """Put 👍 / 👎 buttons carrying ``answer_id`` under the answer just delivered (its last part),
        without changing its text; a platform without buttons does nothing."""

    def abandon(self) -> None:  # noqa: B027 - optional
        """This daemon stops answering the message (another one answers it now): no platform call
        follows; stop any background work (a stream's keepalive) and free what it holds."""

    async def failed(self, exc: Exception, text: str) -> None:
        """The platform did not take ``text``; log it the way its errors read best."""
        log.error("reply failed", connector=self.account.connector, error=f"{type(exc).__name__}: {exc}")

    # -- the shared loop --------------------------------------------------------------------

    async def call(self, fn: Callable[[], Any]) -> Any:
        """One platform call, repeated after the waits the platform asks for; each attempt only
        while the fence (if any) lets it."""
        for _ in range(_ATTEMPTS):
            wait = self.not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.fence is not None:
                await self.fence()
            try:
                return await fn()
            except Exception as exc:
                secs = self.retry_after(exc)
                if secs is None:
                    raise
                self.not_before = time.monotonic() + secs
                log.info("platform rate limit: waiting", connector=self.account.connector, retry_after_s=secs)
        raise RateLimited(f"{self.account.connector}: still rate limited after {_ATTEMPTS} attempts")

    def parts(self, text: str) -> list[str]:
        return [p for p in split_text(text, self.limit, self.measure) if p.strip()]

    async def updates(self, text: str) -> AsyncIterator[list[Any]]:
        """Show ``text`` (the whole answer so far); yields the posted ids after each new post,
        so that the caller can record them before the next one."""
        for i, part in enumerate(self.parts(text)):
            if i < len(self.sent):
                ref, shown = self.sent[i]
                if self.edits and shown != part:
                    await self.call(functools.partial(self.edit, ref, part))
                    self.sent[i] = (ref, part)
                continue
            ref = await self.call(functools.partial(self.post, part, not self.sent))
            self.sent.append((ref, part))
            yield [r for r, _ in self.sent]

    async def show(self, text: str) -> None:
        """Show ``text`` without recording progress (tests, one-off notices)."""
        async for _ in self.updates(text):
            pass
