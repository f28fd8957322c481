"""Where a DingTalk answer goes: an AI card streamed in place, or markdown messages.

* :class:`CardReply` (``card_template_id`` set; needs the card permission): the first words
  create and deliver a card (``createAndDeliver``, the template's content variable filled),
  each later update streams the whole answer so far into it (``PUT /v1.0/card/streaming``,
  ``isFull``), no more often than ``update_interval_s``; at the end the card is finalised
  (``isFinalize``) and its ``flowStatus`` set to finished. A longer answer continues in a new card.
* :class:`MarkdownReply`: each part sent once, finished, as a markdown message through the
  message's ``sessionWebhook`` while it is valid, else (expired, or refused) through the
  robot's OpenAPI send (one-to-one ``oToMessages/batchSend`` or ``groupMessages/send``).

Both wait as DingTalk asks on its throttling codes (:attr:`DingtalkApiError.retry_after`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog

from connectors.dingtalk.api import DingtalkApi, DingtalkApiError
from connectors.download import check_announced
from connectors.markdown import neutral_links
from connectors.reply import AttachmentUnavailable, InheritedMarks, ReplyTarget
from core.feedback import FeedbackLabels
from core.kv import KeyValueCache
from core.messages import Account, Attachment
from core.redis_store import StoreUnavailable

log = structlog.get_logger("botd.dingtalk")

PLATFORM = "dingtalk"
# Not documented by DingTalk; botd keeps a card's text and a markdown message below these.
CARD_CHARS = 6000
MARKDOWN_CHARS = 5000
# A sessionWebhook is not used in its last minute (the answer may take that long to arrive).
WEBHOOK_MARGIN_MS = 60_000
FLOW_INPUTTING, FLOW_FINISHED = "2", "3"
# A part no card took (DingTalk refused the card): sent as markdown when the answer ends.
PENDING, MARKDOWN_SENT = "pending", "markdown"
# How long a finalised card is remembered in the shared cache: a daemon that takes over a message
# whose answer was finalised just before its daemon died must not stream into the card again
# (DingTalk refuses updates of a finalised card).
FINAL_MARK_TTL_S = 86_400
# How long a card's 👍 / 👎 can be pressed (the shared cache remembers which answer it shows).
FEEDBACK_CARD_TTL_S = 30 * 86_400


class _DingtalkReply(ReplyTarget):
    def __init__(self, account: Account, api: DingtalkApi, cache: KeyValueCache, route: dict[str, Any],
                 interval: float, sent: Sequence[Any] = ()) -> None:
        super().__init__(account, interval, sent)
        self.api = api
        self.cache = cache
        self.route = route
        self.group = bool(route.get("group"))
        self.conversation = str(route.get("conversation", ""))
        self.user = str(route.get("staff_id", ""))

    def retry_after(self, exc: Exception) -> float | None:
        return exc.retry_after if isinstance(exc, DingtalkApiError) else None

    async def user_groups(self, user: str) -> list[str]:
        return await self.api.departments(user)

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        code = str(attachment.ref.get("download_code") or "")
        if not code:
            raise AttachmentUnavailable("dingtalk: the attachment has no downloadCode")
        check_announced(attachment.size, max_bytes)
        return await self.api.download_file(code, max_bytes)

    async def failed(self, exc: Exception, text: str) -> None:
        log.error("dingtalk reply could not be delivered", robot=self.account.name, user=self.user,
                  error=f"{type(exc).__name__}: {exc}")
        try:
            await self.cache.dead_letter(PLATFORM, {"bot": self.account.name, "user": self.user,
                                                    "conversation": self.conversation, "text": text,
                                                    "error": type(exc).__name__})
        except StoreUnavailable:
            log.error("dead letter lost: redis unreachable", user=self.user)


class CardReply(_DingtalkReply):
    """The answer streamed into AI cards (one per ``CARD_CHARS``).

    When DingTalk refuses to create a card for another reason than throttling (the app lacks the
    card permissions, the template id is wrong), the answer is sent as markdown at its end
    instead (:data:`PENDING` stands for a part not shown yet), and the robot's later answers go
    out as markdown until botd restarts; the refusal is logged once with DingTalk's code.
    """

    edits = True
    limit = CARD_CHARS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finalised: set[str] = set()
        self.fallback = False
        # Cards posted before a restart (by this daemon or one that died): asked about once.
        self._final_marks = InheritedMarks(self.cache, "dingtalk:card:final:{ref}",
                                           (str(ref) for ref, _ in self.sent if ref not in (PENDING, MARKDOWN_SENT)))

    async def _final_elsewhere(self, ref: str) -> bool:
        """Whether a card posted before a restart was being finalised by a daemon that died before
        it acked the message (the mark is set before the finalising call): then it is not streamed
        into again (DingTalk refuses updates of a finalised card), only its fields are set."""
        return await self._final_marks.marked(ref)

    def _fall_back(self) -> None:
        self.fallback = True
        self.edits = False  # nothing to update in place: the bots layer shows the final text only

    async def post(self, part: str, first: bool) -> str:
        if self.fallback:
            return PENDING
        ref = f"botd-{uuid.uuid4().hex}"
        try:
            await self.api.card_create(ref, {self.api.cfg.card_content_key: neutral_links(part),
                                             "flowStatus": FLOW_INPUTTING},
                                       group=self.group, conversation=self.conversation, user=self.user)
        except DingtalkApiError as exc:
            if not exc.card_refused:
                raise
            if not self.api.cards_refused:
                log.error("dingtalk refused to create an AI card (check the app's card permissions and "
                          "card_template_id); answering in markdown", robot=self.account.name, status=exc.status,
                          code=exc.code)
            self.api.cards_refused = True
            self._fall_back()
            return PENDING
        return ref

    async def edit(self, ref: Any, part: str) -> None:
        if ref != PENDING and not await self._final_elsewhere(str(ref)):
            await self.api.card_stream(str(ref), neutral_links(part))

    async def offer_feedback(self, answer_id: str, labels: FeedbackLabels) -> None:
        """The answer's last card gets the fields its template's 👍 / 👎 buttons show with
        (``botd_feedback``: the answer's id; the buttons' words); the card remembers, in the shared
        cache, which answer and chat a press on it names. Its content is not touched."""
        if not self.sent or self.sent[-1][0] in (PENDING, MARKDOWN_SENT):
            return
        ref = str(self.sent[-1][0])
        chat = str(self.route.get("conversation") if self.route.get("group") else self.route.get("staff_id"))
        with contextlib.suppress(StoreUnavailable):
            await self.cache.set(f"dingtalk:fb:{ref}", json.dumps({"answer": answer_id, "chat": chat}),
                                 FEEDBACK_CARD_TTL_S)
        await self.call(functools.partial(self.api.card_update, ref, {
            "botd_feedback": answer_id, "botd_feedback_up": labels.up, "botd_feedback_down": labels.down}))

    async def closed(self, text: str) -> None:
        """Finalise every card of the answer with what it shows; send the parts no card took."""
        parts = self.parts(text)
        markdown = MarkdownReply(self.account, self.api, self.cache, self.route, 0)
        for i, part in enumerate(parts):
            pending = self.sent[i][0] == PENDING if i < len(self.sent) else self.fallback
            if pending:
                await self.call(functools.partial(markdown.post, part, i == 0))
                if i < len(self.sent):
                    self.sent[i] = (MARKDOWN_SENT, part)
        for i, (ref, shown) in enumerate(self.sent):
            if ref in self.finalised or ref in (PENDING, MARKDOWN_SENT):
                continue
            final = parts[i] if i < len(parts) else shown
            if not final.strip():
                continue
            if not await self._final_elsewhere(str(ref)):
                try:  # marked first: a daemon that takes the message over must not stream into it
                    await self.cache.set(f"dingtalk:card:final:{ref}", "1", FINAL_MARK_TTL_S)
                except StoreUnavailable:
                    pass
                await self.call(functools.partial(self.api.card_stream, str(ref), neutral_links(final),
                                                  finalize=True))
            await self.call(functools.partial(self.api.card_update, str(ref), {
                self.api.cfg.card_content_key: neutral_links(final), "flowStatus": FLOW_FINISHED}))
            self.finalised.add(ref)


class MarkdownReply(_DingtalkReply):
    """Each part sent once as markdown: the sessionWebhook while valid, else the OpenAPI send."""

    edits = False
    limit = MARKDOWN_CHARS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.webhook = str(self.route.get("webhook", ""))
        self.webhook_until_ms = int(self.route.get("webhook_until_ms") or 0)

    def _webhook_usable(self) -> bool:
        return bool(self.webhook) and time.time() * 1000 < self.webhook_until_ms - WEBHOOK_MARGIN_MS

    async def post(self, part: str, first: bool) -> int:
        text = neutral_links(part)
        title = _title(part)
        if self._webhook_usable():
            try:
                payload: dict[str, Any] = {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
                await self.api.webhook(self.webhook, payload)
                return len(self.sent) + 1
            except DingtalkApiError as exc:
                if exc.retry_after is not None:
                    raise
                # Refused (expired early, revoked): the robot's own send reaches the same place.
                log.info("dingtalk sessionWebhook refused; sending through the OpenAPI", robot=self.account.name,
                         code=exc.code)
                self.webhook = ""
        await self.api.send_markdown(group=self.group, conversation=self.conversation, user=self.user,
                                     title=title, text=text)
        return len(self.sent) + 1


def _title(text: str) -> str:
    """The notification's title: the answer's first words, without markup."""
    first = next((line for line in text.splitlines() if line.strip()), "…")
    return re.sub(r"[*_`#>~\[\]]", "", first).strip().lstrip("- ").strip()[:20] or "…"
