"""Feishu / Lark (飞书) connector: the bots of self-built apps, one per ``[feishu.NAME]``.

Two ways to receive, per app (``mode``):

* ``websocket`` (the default) -- the long connection (:mod:`connectors.feishu.ws`); no public
  address. Among the daemons sharing one Redis only the holder of the app's lease keeps it
  (another takes over within ``[redis] lease_s`` when it dies; a daemon that loses the lease
  closes its connection). A dropped connection is reopened with backoff.
* ``callback`` -- Feishu POSTs events to ``/feishu/NAME``, signed and encrypted
  (:mod:`connectors.feishu.callback`), answered at once.

``im.message.receive_v1`` becomes one :class:`InboundMessage` (``event_id`` = app +
``message_id``: Feishu's redeliveries, which keep the message id, are dropped by the service's
durable inbox) and one reply target (:mod:`connectors.feishu.reply`). In groups only messages
that @ the bot are answered (the mention taken out), unless ``all_group_messages``; p2p always.
Images, files and audio arrive as attachments (resources of their message); video and stickers
are taken as unreadable: the bot says it reads text only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from connectors.base import Connector, Route, Service
from connectors.download import mime_of
from connectors.feishu.api import FeishuApi, FeishuApiError
from connectors.feishu.callback import CallbackRefused, open_callback, read_body
from connectors.feishu.config import FeishuConfig
from connectors.feishu.reply import PLATFORM, CardKitReply, FeishuReply, PatchReply, TextReply
from connectors.feishu.ws import Displaced, FeishuLink, FeishuWsError
from connectors.reply import ReplyTarget
from core.config import Settings
from core.feedback import FeedbackEvent, Vote
from core.kv import KeyValueCache
from core.lease import Holding, Lease
from core.messages import Account, Attachment, InboundMessage
from core.secrets import resolve_secret

log = structlog.get_logger("botd.feishu")

_TEXT_TYPES = ("text", "post")
_TARGETS: dict[str, type[FeishuReply]] = {"cardkit": CardKitReply, "patch": PatchReply, "off": TextReply}


def text_of(kind: str, content: dict[str, Any], mentions: dict[str, str]) -> str:
    """The words of a text or rich-text (post) message; each @ placeholder replaced by
    ``mentions[key]`` (the bot's by "")."""
    if kind == "text":
        text = str(content.get("text", ""))
        for key, name in mentions.items():
            text = text.replace(key, name)
        return text
    if kind == "post":
        body = content
        if "content" not in body:  # a localised post: {"zh_cn": {...}}
            body = next((v for v in content.values() if isinstance(v, dict) and "content" in v), {})
        lines = []
        title = str(body.get("title") or "")
        if title:
            lines.append(title)
        for para in body.get("content") or []:
            words = []
            for el in para if isinstance(para, list) else []:
                if not isinstance(el, dict):
                    continue
                if el.get("tag") in ("text", "a", "md"):
                    words.append(str(el.get("text", "")))
                elif el.get("tag") == "at":
                    key = str(el.get("user_id", ""))
                    words.append(mentions.get(key, f"@{el.get('user_name', '')}") if key else "")
            lines.append("".join(words))
        return "\n".join(lines)
    return ""


def attachments_of(kind: str, content: dict[str, Any], message_id: str) -> list[Attachment]:
    """A picture (``image_key``), file (``file_key``, ``file_name``) or voice message (``audio``,
    Opus, ``duration`` in ms), and the pictures of a rich-text (post) message: each a resource of
    its message. Videos (``media``) and stickers are nothing botd reads."""
    def ref(key: str, rtype: str) -> dict[str, str]:
        return {"message_id": message_id, "file_key": key, "type": rtype}

    if kind == "image" and content.get("image_key"):
        return [Attachment("image", mime="image/jpeg", ref=ref(str(content["image_key"]), "image"))]
    if kind == "file" and content.get("file_key"):
        name = str(content.get("file_name") or "")
        return [Attachment("file", name=name, mime=mime_of(name), ref=ref(str(content["file_key"]), "file"))]
    if kind == "audio" and content.get("file_key"):
        duration = content.get("duration")
        return [Attachment("voice", mime="audio/opus", ref=ref(str(content["file_key"]), "file"),
                           duration_s=duration / 1000 if isinstance(duration, int | float) else None)]
    if kind == "post":
        body = content if "content" in content else next(
            (v for v in content.values() if isinstance(v, dict) and "content" in v), {})
        return [Attachment("image", mime="image/jpeg", ref=ref(str(el["image_key"]), "image"))
                for para in body.get("content") or [] if isinstance(para, list)
                for el in para if isinstance(el, dict) and el.get("tag") == "img" and el.get("image_key")]
    return []


class _App:
    def __init__(self, name: str, cfg: FeishuConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.account = Account(connector=PLATFORM, name=name, routes=cfg.routes,
                               allow_chats=frozenset(cfg.allow_chats), allow_users=frozenset(cfg.allow_users),
                               allow_groups=frozenset(cfg.allow_departments), tell_refused=True)
        self.secret = resolve_secret(cfg.app_secret)
        self.encrypt_key = resolve_secret(cfg.encrypt_key) if cfg.encrypt_key else ""
        self.token = resolve_secret(cfg.verification_token) if cfg.verification_token else ""
        self.api: FeishuApi | None = None
        self.link: FeishuLink | None = None
        self.runner: asyncio.Task[None] | None = None
        self.bot_open_id = ""
        self.displaced = False


class FeishuConnector(Connector):
    name = PLATFORM

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.apps = {name: _App(name, cfg) for name, cfg in FeishuConfig.sections(self.config).items()
                     if cfg.enabled}
        self.http: aiohttp.ClientSession | None = None
        self._closed = asyncio.Event()
        self._stopping = False
        self._prefetch: set[asyncio.Task[str]] = set()

    def routes(self) -> list[Route]:
        if not any(a.cfg.mode == "callback" for a in self.apps.values()):
            return []
        return [("POST", "/feishu/{app}", "callback")]

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=10))
        for app in self.apps.values():
            app.api = FeishuApi(app.cfg, app.secret, self.http, self.cache)
            # The bot's own open_id tells an @ of the bot from other mentions: read once, ahead.
            self._prefetch.add(asyncio.create_task(self._bot_open_id(app), name=f"feishu-bot-{app.name}"))
            if app.cfg.mode == "websocket":
                app.link = FeishuLink(app.name, app.cfg.base, app.cfg.app_id, app.secret,
                                      functools.partial(self._on_event, app))
                app.runner = asyncio.create_task(self._run(app), name=f"feishu-{app.name}")
        log.info("feishu apps ready", apps={a.name: a.cfg.mode for a in self.apps.values()})

    async def stop_receiving(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        self._stopping = True
        self._closed.set()
        for task in self._prefetch:
            task.cancel()
        await asyncio.gather(*self._prefetch, return_exceptions=True)
        for app in self.apps.values():
            if app.link is not None:
                await app.link.close()
            if app.runner is not None:
                app.runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app.runner
                app.runner = None
        if self.http is not None:
            await self.http.close()
            self.http = None

    # -- the long connection ------------------------------------------------------------------------

    async def _run(self, app: _App) -> None:
        """Keep the app's long connection while this daemon holds its lease."""
        assert app.link is not None
        link = app.link
        lease = Lease(self.cache.redis, self.cache.prefix, f"feishu:ws:{app.cfg.app_id}",
                      self.config.redis.lease_s, self.config.server.instance_name())
        backoff = 1.0
        async with Holding(lease, f"feishu-lease-{app.name}") as holding:
            async for _ in holding.while_held(self._closed.is_set, "feishu long connection", app=app.name):
                began = time.monotonic()
                try:
                    assert self.http is not None, "connector not started"
                    await link.session(self.http, lambda: holding.held and not self._closed.is_set())
                except asyncio.CancelledError:
                    raise
                except Displaced:
                    app.displaced = True  # the lease moved: the loop waits to take it again
                    continue
                except FeishuWsError as exc:
                    if exc.fatal:
                        log.error("feishu long connection refused (check app_id and app_secret, and that the app "
                                  "uses 长连接 for events)", app=app.name, code=exc.code, error=str(exc))
                        backoff = max(backoff, 30.0)
                    else:
                        log.warning("feishu long connection not available; retrying", app=app.name, code=exc.code,
                                    retry_in_s=backoff)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("feishu long connection failed; retrying", app=app.name, error=type(exc).__name__,
                                retry_in_s=backoff)
                if self._closed.is_set():
                    break
                if time.monotonic() - began > 60:
                    backoff = 1.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), backoff)
                backoff = min(backoff * 2, app.cfg.reconnect_max_s)

    async def _on_event(self, app: _App, event: dict[str, Any]) -> None:
        header = event.get("header") or {}
        if header.get("event_type") == "card.action.trigger":
            await self._card_action(app, event)
            return
        if header.get("event_type") != "im.message.receive_v1":
            log.info("feishu event", app=app.name, eventtype=header.get("event_type"))  # "event": structlog's own
            return
        inbound = await self.inbound(app, event.get("event") or {})
        if inbound is None:
            return
        await self.service.receive(inbound, self._target(app, inbound))

    async def _card_action(self, app: _App, event: dict[str, Any]) -> dict[str, Any]:
        """A 👍 / 👎 pressed on a feedback card (``card.action.trigger``; signed like any event in
        callback mode): stored by the service (the chat it was pressed in, the event id not seen
        before); the answer to Feishu is a toast with the acknowledgement."""
        body = event.get("event") or {}
        value = (body.get("action") or {}).get("value") or {}
        if not isinstance(value, dict) or "botd_feedback" not in value:
            return {}
        vote = value.get("vote")
        user = str((body.get("operator") or {}).get("open_id") or "")
        if vote not in ("up", "down") or not user:
            return {}
        # In a group the chat it was pressed in; one-to-one chats are keyed by the user.
        chat = str((body.get("context") or {}).get("open_chat_id") or "") if value.get("group") else user
        event_id = str((event.get("header") or {}).get("event_id") or "")
        try:
            reply = await self.service.feedback(FeedbackEvent(
                PLATFORM, app.name, chat, user, str(value.get("botd_feedback") or ""), Vote(vote),
                event_id=f"{app.cfg.app_id}:{event_id}" if event_id else ""))
        except Exception:  # feedback must never take the connection down
            log.exception("feishu feedback not taken", app=app.name)
            return {}
        return {"toast": {"type": "success" if reply.status.accepted else "info",
                          "content": reply.text}} if reply.text else {}

    # -- messages ----------------------------------------------------------------------------------

    async def _bot_open_id(self, app: _App) -> str:
        if not app.bot_open_id and app.api is not None:
            try:
                app.bot_open_id = await app.api.bot_open_id()
            except (FeishuApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("feishu bot info not read (bot/v3/info)", app=app.name, error=str(exc))
        return app.bot_open_id

    async def inbound(self, app: _App, event: dict[str, Any]) -> InboundMessage | None:
        message = event.get("message") or {}
        sender = event.get("sender") or {}
        if sender.get("sender_type") not in (None, "user"):
            return None  # another bot, or this one
        msg_id = str(message.get("message_id") or "")
        user = str((sender.get("sender_id") or {}).get("open_id") or "")
        if not msg_id or not user:
            log.warning("feishu message without message_id or sender ignored", app=app.name)
            return None
        group = message.get("chat_type") == "group"
        kind = str(message.get("message_type") or "")
        mentions: dict[str, str] = {}
        at_bot = False
        bot_id = await self._bot_open_id(app) if group else ""
        for m in message.get("mentions") or []:
            if not isinstance(m, dict):
                continue
            is_bot = bool(bot_id) and (m.get("id") or {}).get("open_id") == bot_id
            at_bot = at_bot or is_bot or (not bot_id and group)
            mentions[str(m.get("key", ""))] = "" if is_bot or (not bot_id and group) else f"@{m.get('name', '')}"
        if group and not at_bot and not app.cfg.all_group_messages:
            return None
        try:
            content = json.loads(message.get("content") or "{}")
        except ValueError:
            content = {}
        text = text_of(kind, content if isinstance(content, dict) else {}, mentions).strip()
        attachments = attachments_of(kind, content if isinstance(content, dict) else {}, msg_id)
        readable = (kind in _TEXT_TYPES and bool(text)) or bool(attachments)
        chat = str(message.get("chat_id") or user) if group else user
        thread = "" if not group or app.cfg.group_history == "chat" else user
        route = {"app": app.name, "message_id": msg_id, "chat_id": str(message.get("chat_id") or ""),
                 "open_id": user, "group": group}
        return InboundMessage(
            platform=PLATFORM, bot=app.name, account=app.name, chat=chat, thread=thread, user=user,
            text=text if readable else f"({kind or 'not text'})", readable=readable, attachments=attachments,
            event_id=f"{app.cfg.app_id}:{msg_id}", route=route)

    def _target(self, app: _App, msg: InboundMessage, sent: list[Any] | None = None) -> ReplyTarget:
        assert app.api is not None, "connector not started"
        kind = _TARGETS["patch" if app.cfg.streaming == "cardkit" and app.api.cardkit_refused else app.cfg.streaming]
        return kind(app.account, app.api, self.cache, msg.route, app.cfg.update_interval_s, sent or ())

    def target(self, msg: InboundMessage) -> ReplyTarget | None:
        """A message accepted before a restart: its cards are updated on, not posted again."""
        app = self.apps.get(msg.account or str(msg.route.get("app", msg.bot)))
        if app is None or app.api is None:
            return None
        sent = [s for s in msg.progress.get("sent") or [] if isinstance(s, str)]
        return self._target(app, msg, sent)

    # -- callback mode ------------------------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.StreamResponse:
        app = self.apps.get(request.match_info["app"])
        if app is None or app.cfg.mode != "callback":
            raise web.HTTPNotFound(text="no Feishu app in callback mode is configured at this path")
        body = await read_body(request)
        try:
            event = open_callback(request.headers, body, app.encrypt_key, app.token, app.cfg.timestamp_window_s)
        except CallbackRefused as exc:
            log.warning("feishu callback refused", app=app.name, reason=str(exc), peer=request.remote)
            raise web.HTTPForbidden(text=str(exc)) from None
        if event.get("type") == "url_verification":
            return web.json_response({"challenge": event.get("challenge", "")})
        if (event.get("header") or {}).get("event_type") == "card.action.trigger":
            return web.json_response(await self._card_action(app, event))  # the toast
        if self._stopping:
            raise web.HTTPServiceUnavailable(text="botd is stopping")
        await self._on_event(app, event)
        return web.json_response({})
