"""DingTalk (钉钉) connector: the robots of enterprise internal apps, one per ``[dingtalk.NAME]``.

Two ways to receive, per robot (``mode``):

* ``stream`` (the default) -- DingTalk's Stream mode: botd opens a long connection
  (:mod:`connectors.dingtalk.stream`); no public address. Among the daemons sharing one Redis
  only the holder of the app's lease keeps the connection (another takes over within
  ``[redis] lease_s`` when it dies; a daemon that loses the lease closes its connection).
  A dropped connection is reopened with backoff up to ``reconnect_max_s``.
* ``callback`` -- DingTalk POSTs each message to ``/dingtalk/NAME`` with the headers
  ``timestamp`` and ``sign`` (base64 HMAC-SHA256 of ``timestamp + "\\n" + secret``), checked
  before the body is read (:mod:`connectors.dingtalk.callback`).

A message becomes one :class:`InboundMessage` (``event_id`` = robot + ``msgId``: DingTalk's
redeliveries are dropped by the service's durable inbox) and one reply target
(:mod:`connectors.dingtalk.reply`). In groups only messages that @ the robot are answered (the
mention is stripped); one-to-one always. Pictures, files and voice messages arrive as
attachments (their ``downloadCode``; a voice message with DingTalk's transcript); videos are
taken as unreadable: the bot says it reads text only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from connectors.base import Connector, Route, Service
from connectors.dingtalk.api import DingtalkApi, DingtalkApiError
from connectors.dingtalk.callback import read_callback
from connectors.dingtalk.config import DingtalkConfig
from connectors.dingtalk.reply import PLATFORM, CardReply, MarkdownReply
from connectors.dingtalk.stream import Displaced, StreamLink
from connectors.download import mime_of
from connectors.reply import ReplyTarget
from core.config import Settings
from core.feedback import FeedbackEvent, Vote
from core.kv import KeyValueCache
from core.lease import Holding, Lease
from core.messages import Account, Attachment, InboundMessage
from core.secrets import resolve_secret

log = structlog.get_logger("botd.dingtalk")

_MENTION = re.compile(r"^\s*@\S+\s*")
# Message types that carry words; the others are answered "I read text only".
_TEXT_TYPES = ("text", "richText", "markdown")


def text_of(data: dict[str, Any]) -> str:
    """The words of a robot message: its text, or the text pieces of a rich-text message."""
    kind = data.get("msgtype")
    if kind == "text":
        return str((data.get("text") or {}).get("content", "") or "")
    if kind == "richText":
        items = (data.get("content") or {}).get("richText") or []
        return "".join(str(i.get("text", "")) for i in items if isinstance(i, dict)).strip()
    if kind == "markdown":
        return str((data.get("markdown") or data.get("content") or {}).get("text", "") or "")
    return ""


def attachments_of(data: dict[str, Any]) -> list[Attachment]:
    """A picture, file or voice message (``audio``, with DingTalk's own ``recognition`` as its
    transcript), and the pictures of a rich-text message, each by its ``downloadCode``; videos
    are nothing botd reads."""
    kind = data.get("msgtype")
    raw = data.get("content")
    content: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if kind == "richText":
        return [Attachment("image", mime="image/jpeg", ref={"download_code": str(i["downloadCode"])})
                for i in content.get("richText") or []
                if isinstance(i, dict) and i.get("downloadCode") and i.get("type", "picture") == "picture"]
    code = str(content.get("downloadCode") or content.get("pictureDownloadCode") or "")
    if not code or kind not in ("picture", "file", "audio"):
        return []
    ref = {"download_code": code}
    if kind == "picture":
        return [Attachment("image", mime="image/jpeg", ref=ref)]
    if kind == "file":
        name = str(content.get("fileName") or "")
        return [Attachment("file", name=name, mime=mime_of(name), ref=ref)]
    duration = content.get("duration")  # milliseconds
    heard = str(content.get("recognition") or "").strip()
    return [Attachment("voice", ref=ref, transcript=heard or None,
                       duration_s=duration / 1000 if isinstance(duration, int | float) else None)]


class _Robot:
    def __init__(self, name: str, cfg: DingtalkConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.account = Account(connector=PLATFORM, name=name, routes=cfg.routes,
                               allow_chats=frozenset(cfg.allow_chats), allow_users=frozenset(cfg.allow_users),
                               allow_groups=frozenset(map(str, cfg.allow_departments)), tell_refused=True)
        self.secret = resolve_secret(cfg.client_secret)
        self.api: DingtalkApi | None = None
        self.link: StreamLink | None = None
        self.runner: asyncio.Task[None] | None = None
        self.displaced = False


class DingtalkConnector(Connector):
    name = PLATFORM

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.robots = {name: _Robot(name, cfg) for name, cfg in DingtalkConfig.sections(self.config).items()
                       if cfg.enabled}
        self.http: aiohttp.ClientSession | None = None
        self._closed = asyncio.Event()
        self._stopping = False

    def routes(self) -> list[Route]:
        if not any(r.cfg.mode == "callback" for r in self.robots.values()):
            return []
        return [("POST", "/dingtalk/{robot}", "callback")]

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=10))
        for robot in self.robots.values():
            robot.api = DingtalkApi(robot.cfg, robot.secret, self.http, self.cache)
            if robot.cfg.mode == "stream":
                robot.link = StreamLink(robot.name, robot.cfg.api_base, robot.cfg.client_id, robot.secret,
                                        functools.partial(self._on_message, robot),
                                        functools.partial(self._on_card, robot))
                robot.runner = asyncio.create_task(self._run(robot), name=f"dingtalk-{robot.name}")
        log.info("dingtalk robots ready", robots={r.name: r.cfg.mode for r in self.robots.values()})

    async def stop_receiving(self) -> None:
        # The connection stays up until close(): messages arriving meanwhile are recorded for the
        # next start (the replies go out over HTTP, not over the connection).
        self._stopping = True

    async def close(self) -> None:
        self._stopping = True
        self._closed.set()
        for robot in self.robots.values():
            if robot.link is not None:
                await robot.link.close()
            if robot.runner is not None:
                robot.runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await robot.runner
                robot.runner = None
        if self.http is not None:
            await self.http.close()
            self.http = None

    # -- the long connection ------------------------------------------------------------------------

    async def _run(self, robot: _Robot) -> None:
        """Keep the robot's long connection while this daemon holds the app's lease."""
        assert robot.link is not None
        link = robot.link
        lease = Lease(self.cache.redis, self.cache.prefix, f"dingtalk:stream:{robot.cfg.client_id}",
                      self.config.redis.lease_s, self.config.server.instance_name())
        backoff = 1.0
        async with Holding(lease, f"dingtalk-lease-{robot.name}") as holding:
            async for _ in holding.while_held(self._closed.is_set, "dingtalk stream", robot=robot.name):
                began = time.monotonic()
                try:
                    assert self.http is not None, "connector not started"
                    if await link.session(self.http, lambda: holding.held and not self._closed.is_set()):
                        backoff = 1.0  # closed as DingTalk asked ("disconnect"): a new ticket at once
                        continue
                except asyncio.CancelledError:
                    raise
                except Displaced:
                    robot.displaced = True  # the lease moved: the loop waits to take it again
                    continue
                except DingtalkApiError as exc:
                    refused = exc.status in (400, 401, 403)  # the id or secret, not the network
                    if refused:
                        backoff = max(backoff, 30.0)
                    (log.error if refused else log.warning)(
                        "dingtalk stream registration refused (check client_id and client_secret)",
                        robot=robot.name, status=exc.status, code=exc.code, retry_in_s=backoff)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("dingtalk stream connection failed; retrying", robot=robot.name,
                                error=type(exc).__name__, retry_in_s=backoff)
                if self._closed.is_set():
                    break
                if time.monotonic() - began > 60:
                    backoff = 1.0  # it had been up a while: the first retry comes soon
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), backoff)
                backoff = min(backoff * 2, robot.cfg.reconnect_max_s)

    async def _on_message(self, robot: _Robot, data: dict[str, Any]) -> None:
        inbound = self.inbound(robot, data)
        if inbound is None:
            return
        target = self._target(robot, inbound)
        await self.service.receive(inbound, target)

    async def _on_card(self, robot: _Robot, data: dict[str, Any], frame_id: str) -> None:
        """A 👍 / 👎 pressed on an answer's card (its template's buttons, action ids
        ``botd_feedback_up`` / ``botd_feedback_down``), from DingTalk's own long connection: the
        card names the answer and chat (kept when the buttons were offered); the service stores
        it unless this push was taken already."""
        try:
            private = json.loads(str(data.get("content") or "{}")).get("cardPrivateData") or {}
        except (ValueError, AttributeError):
            return
        actions = private.get("actionIds") if isinstance(private, dict) else None
        action = str(actions[0]) if isinstance(actions, list) and actions else ""
        vote = {"botd_feedback_up": Vote.UP, "botd_feedback_down": Vote.DOWN}.get(action)
        card, user = str(data.get("outTrackId") or ""), str(data.get("userId") or "")
        if vote is None or not card or not user:
            return
        raw = await self.cache.get(f"dingtalk:fb:{card}")
        if not raw:
            return  # not a card botd offered feedback on (or past its time)
        offered = json.loads(raw)
        await self.service.feedback(FeedbackEvent(
            PLATFORM, robot.name, str(offered.get("chat", "")), user, str(offered.get("answer", "")), vote,
            event_id=f"{robot.cfg.client_id}:{frame_id}"))

    # -- messages ----------------------------------------------------------------------------------

    def inbound(self, robot: _Robot, data: dict[str, Any]) -> InboundMessage | None:
        """The message DingTalk sent, or None when it is not for the bot (a group message that
        does not @ it, or one without its ids)."""
        msg_id = str(data.get("msgId") or "")
        user = str(data.get("senderStaffId") or data.get("senderId") or "")
        conversation = str(data.get("conversationId") or "")
        if not msg_id or not user:
            log.warning("dingtalk message without msgId or sender ignored", robot=robot.name)
            return None
        group = str(data.get("conversationType", "1")) == "2"
        if group and data.get("isInAtList") is False:
            return None  # DingTalk sends group messages only when the robot is @-mentioned
        kind = str(data.get("msgtype") or "")
        text = text_of(data)
        if group:
            text = _MENTION.sub("", text, count=1)
        text = text.strip()
        attachments = attachments_of(data)
        readable = (kind in _TEXT_TYPES and bool(text)) or bool(attachments)
        chat = conversation if group else user
        thread = "" if not group or robot.cfg.group_history == "chat" else user
        route = {"robot": robot.name, "group": group, "conversation": conversation, "staff_id": user,
                 "webhook": str(data.get("sessionWebhook") or ""),
                 "webhook_until_ms": int(data.get("sessionWebhookExpiredTime") or 0), "msg_id": msg_id}
        return InboundMessage(
            platform=PLATFORM, bot=robot.name, account=robot.name, chat=chat, thread=thread, user=user,
            text=text if readable else f"({kind or 'not text'})", readable=readable, attachments=attachments,
            event_id=f"{robot.cfg.client_id}:{msg_id}", route=route)

    def _target(self, robot: _Robot, msg: InboundMessage, sent: list[Any] | None = None) -> ReplyTarget:
        assert robot.api is not None, "connector not started"
        kind = CardReply if robot.cfg.card_template_id and not robot.api.cards_refused else MarkdownReply
        return kind(robot.account, robot.api, self.cache, msg.route, robot.cfg.update_interval_s, sent or ())

    def target(self, msg: InboundMessage) -> ReplyTarget | None:
        """A message accepted before a restart: the cards it posted are edited on, not posted again."""
        robot = self.robots.get(msg.account or str(msg.route.get("robot", msg.bot)))
        if robot is None or robot.api is None:
            return None
        sent = [s for s in msg.progress.get("sent") or [] if isinstance(s, str | int)]
        return self._target(robot, msg, sent)

    # -- callback mode ------------------------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.StreamResponse:
        robot = self.robots.get(request.match_info["robot"])
        if robot is None or robot.cfg.mode != "callback":
            raise web.HTTPNotFound(text="no DingTalk robot in callback mode is configured at this path")
        data = await read_callback(request, robot.secret, robot.cfg.timestamp_window_s, robot.name)
        if self._stopping:
            raise web.HTTPServiceUnavailable(text="botd is stopping")
        await self._on_message(robot, data)
        return web.json_response({})  # the answer follows through the sessionWebhook or the OpenAPI
