"""Where a Feishu / Lark answer goes: a reply to the user's message (threaded with ``reply``),
shown one of three ways (``streaming``):

* ``cardkit`` (:class:`CardKitReply`): a card entity in streaming mode (CardKit), sent as the
  reply; its markdown element is updated with the whole answer so far (``PUT
  .../elements/answer/content``, ``sequence`` strictly increasing across every operation on the
  card), no more often than ``update_interval_s``; at the end streaming mode is turned off.
* ``patch`` (:class:`PatchReply`): an interactive card (``update_multi``) patched in place.
* ``off`` (:class:`TextReply`): one message per part, with the final text.

A longer answer continues in a further card or message. Every call obeys Feishu's rate-limit
codes through :attr:`FeishuApiError.retry_after`. A patched card's or a text reply's ``uuid`` is
derived from the user's message and the part, so a replay after a restart does not post that
part twice (Feishu sends the same uuid once within an hour, answering with the first message,
which the replay then patches).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog

from connectors.download import check_announced
from connectors.feishu.api import FeishuApi, FeishuApiError
from connectors.markdown import neutral_links
from connectors.reply import AttachmentUnavailable, InheritedMarks, ReplyTarget
from connectors.textsplit import utf8_len
from core.feedback import FeedbackLabels
from core.kv import KeyValueCache
from core.messages import Account, Attachment
from core.redis_store import StoreUnavailable

log = structlog.get_logger("botd.feishu")

PLATFORM = "feishu"
ELEMENT = "answer"
# A card (and its JSON) must stay under 30 KB; a text message under 150 KB.
CARD_BYTES = 24_000
TEXT_BYTES = 60_000
# Sequences start from the clock (tenths of a second since 2026): a target rebuilt after a
# restart continues above every sequence the card has seen.
_EPOCH = 1_767_225_600


# The reference of a patched card that stands in for a card entity CardKit refused.
PATCHED = "patched:"


def _sequence_start() -> int:
    return int((time.time() - _EPOCH) * 10)


class FeishuReply(ReplyTarget):
    measure = staticmethod(utf8_len)

    def __init__(self, account: Account, api: FeishuApi, cache: KeyValueCache, route: dict[str, Any],
                 interval: float, sent: Sequence[Any] = ()) -> None:
        super().__init__(account, interval, sent)
        self.api = api
        self.cache = cache
        self.route = route
        self.message_id = str(route.get("message_id", ""))
        self.user = str(route.get("open_id", ""))

    def _uuid(self, n: int) -> str:
        return f"{self.message_id}-{n}"

    def retry_after(self, exc: Exception) -> float | None:
        return exc.retry_after if isinstance(exc, FeishuApiError) else None

    async def user_groups(self, user: str) -> list[str]:
        return await self.api.departments(user)

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        ref = attachment.ref
        key, kind = str(ref.get("file_key") or ""), str(ref.get("type") or "file")
        message_id = str(ref.get("message_id") or self.message_id)
        if not key or kind not in ("image", "file"):
            raise AttachmentUnavailable("feishu: the attachment has no resource key")
        check_announced(attachment.size, max_bytes)
        return await self.api.download_resource(message_id, key, kind, max_bytes)

    async def failed(self, exc: Exception, text: str) -> None:
        log.error("feishu reply could not be delivered", app=self.account.name, user=self.user,
                  error=f"{type(exc).__name__}: {exc}")
        try:
            await self.cache.dead_letter(PLATFORM, {"bot": self.account.name, "user": self.user,
                                                    "message_id": self.message_id, "text": text,
                                                    "error": type(exc).__name__})
        except StoreUnavailable:
            log.error("dead letter lost: redis unreachable", user=self.user)


def feedback_elements(answer_id: str, labels: FeedbackLabels, group: bool) -> list[dict[str, Any]]:
    """The 👍 / 👎 buttons (card JSON 2.0) put under an answer's last card, below its text; each
    button's value names the answer, the vote and whether it was given in a group (the chat a
    press is checked against). A press comes back as ``card.action.trigger``."""
    def button(vote: str, label: str) -> dict[str, Any]:
        return {"tag": "column", "width": "auto", "elements": [
            {"tag": "button", "type": "default", "size": "small", "text": {"tag": "plain_text", "content": label},
             "behaviors": [{"type": "callback", "value": {"botd_feedback": answer_id, "vote": vote,
                                                           "group": group}}]}]}

    return [{"tag": "column_set", "element_id": "botd_feedback", "columns": [button("up", labels.up),
                                                                             button("down", labels.down)]}]


def streaming_card(text: str) -> dict[str, Any]:
    """A card JSON 2.0 in streaming mode with one markdown element."""
    return {"schema": "2.0", "config": {"streaming_mode": True, "update_multi": True,
                                        "streaming_config": {"print_strategy": "fast"}},
            "body": {"elements": [{"tag": "markdown", "element_id": ELEMENT, "content": text}]}}


def static_card(text: str) -> dict[str, Any]:
    """An interactive card that can be patched (``update_multi``)."""
    return {"schema": "2.0", "config": {"update_multi": True},
            "body": {"elements": [{"tag": "markdown", "element_id": ELEMENT, "content": text}]}}


class CardKitReply(FeishuReply):
    edits = True
    limit = CARD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sequence = _sequence_start()
        self.streaming_off: set[str] = set()
        # Cards posted before a restart, asked about once: a daemon that died before acking the
        # message may have turned their streaming off (the mark is set first), and Feishu refuses
        # content updates then; the text they show is the whole answer already.
        self._off_marks = InheritedMarks(self.cache, "feishu:card:off:{ref}",
                                         (str(ref) for ref, _ in self.sent if not str(ref).startswith(PATCHED)))

    async def _off_elsewhere(self, ref: str) -> bool:
        return await self._off_marks.marked(ref)

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    async def post(self, part: str, first: bool) -> str:
        if not self.api.cardkit_refused:
            try:
                card_id = await self.api.card_create(streaming_card(neutral_links(part)))
            except FeishuApiError as exc:
                if exc.retry_after is not None or exc.bad_token:
                    raise
                # No CardKit for this app (the permission 创建与更新卡片, or a deployment without
                # it): a patched card instead, for this answer and the app's next ones.
                log.error("feishu refused to create a card entity; answering with patched cards",
                          app=self.account.name, code=exc.code, error=exc.msg[:200])
                self.api.cardkit_refused = True
            else:
                # Keyed on the card, not the part: a repeated uuid would answer with an earlier
                # message showing another card than the one this target streams into.
                await self.api.reply(self.message_id, "interactive", {"type": "card", "data": {"card_id": card_id}},
                                     f"card-{card_id}")
                return card_id
        mid = await self.api.reply(self.message_id, "interactive", static_card(neutral_links(part)),
                                   self._uuid(len(self.sent)))
        return PATCHED + mid

    async def edit(self, ref: Any, part: str) -> None:
        if str(ref).startswith(PATCHED):
            await self.api.patch(str(ref)[len(PATCHED):], static_card(neutral_links(part)))
            return
        if await self._off_elsewhere(str(ref)):
            return
        await self.api.card_text(str(ref), ELEMENT, neutral_links(part), self._next(), uuid.uuid4().hex)

    async def offer_feedback(self, answer_id: str, labels: FeedbackLabels) -> None:
        """The buttons appended to the answer's last card (its text element stays as it is)."""
        if not self.sent:
            return
        ref, part = self.sent[-1]
        buttons = feedback_elements(answer_id, labels, bool(self.route.get("group")))
        if str(ref).startswith(PATCHED):
            if not part:
                return  # posted before a restart: its text is not known here, so it is not touched
            card = static_card(neutral_links(part))
            card["body"]["elements"] += buttons
            await self.call(functools.partial(self.api.patch, str(ref)[len(PATCHED):], card))
            return
        if await self._off_elsewhere(str(ref)):
            return

        async def _append() -> None:
            await self.api.card_append(str(ref), buttons, self._next(), uuid.uuid4().hex)

        await self.call(_append)

    async def closed(self, text: str) -> None:
        """Streaming mode off on every card of the answer (the card stops showing "typing")."""
        for ref, _ in self.sent:
            if ref in self.streaming_off or str(ref).startswith(PATCHED):
                continue
            if not await self._off_elsewhere(str(ref)):
                try:  # marked first: a daemon that takes the message over must not stream into it
                    await self.cache.set(f"feishu:card:off:{ref}", "1", 86_400)
                except StoreUnavailable:
                    pass

            async def off(ref: str = str(ref)) -> None:
                await self.api.card_settings(ref, {"config": {"streaming_mode": False}}, self._next(),
                                             uuid.uuid4().hex)

            await self.call(off)
            self.streaming_off.add(ref)


class PatchReply(FeishuReply):
    edits = True
    limit = CARD_BYTES

    async def post(self, part: str, first: bool) -> str:
        return await self.api.reply(self.message_id, "interactive", static_card(neutral_links(part)),
                                    self._uuid(len(self.sent)))

    async def edit(self, ref: Any, part: str) -> None:
        await self.api.patch(str(ref), static_card(neutral_links(part)))

    async def offer_feedback(self, answer_id: str, labels: FeedbackLabels) -> None:
        """The last card patched with the same text and the buttons below it."""
        if not self.sent or not self.sent[-1][1]:
            return  # posted before a restart: its text is not known here, so it is not touched
        ref, part = self.sent[-1]
        card = static_card(neutral_links(part))
        card["body"]["elements"] += feedback_elements(answer_id, labels, bool(self.route.get("group")))
        await self.call(functools.partial(self.api.patch, str(ref), card))


class TextReply(FeishuReply):
    edits = False
    limit = TEXT_BYTES

    async def post(self, part: str, first: bool) -> str:
        return await self.api.reply(self.message_id, "text", {"text": part}, self._uuid(len(self.sent)))

    async def notice(self, text: str) -> None:
        # Its own uuid: the answer's first part (uuid ...-0) must not be taken for a repeat of it.
        await self.call(lambda: self.api.reply(self.message_id, "text", {"text": text}, f"{self.message_id}-notice"))
