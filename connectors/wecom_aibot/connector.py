"""WeCom AI bot (企业微信智能机器人) connector: single and group chats, streamed answers.

Two ways to receive, per bot (``[wecom_aibot.<bot>] mode``):

* ``websocket`` -- the long connection: botd connects to ``ws_url`` and subscribes with the
  bot's BotID and Secret; no public address, no encryption. WeCom allows one connection per
  bot, so among the daemons sharing one Redis only the holder of the bot's lease connects
  (another takes over within ``[redis] lease_s`` when it dies). A connection displaced by a
  newer one (``disconnected_event``) stops and is not reopened.
* ``callback`` -- WeCom POSTs encrypted JSON to ``/wecom_aibot/<bot>`` (GET verifies the
  URL, as for a self-built app; the receive id is the empty string). The signature is
  checked before anything else. A message is answered at once with the opening of a
  stream; WeCom then polls with stream refresh callbacks, answered from the answer so far
  (kept in Redis, so any daemon can answer them).

In a group chat WeCom delivers only the messages that @mention the bot; the mention is
taken off the text. Each message is recorded once (its ``msgid``); the answer streams as
described in :mod:`connectors.wecom_aibot.reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import re
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from connectors.base import Connector, Route, Service
from connectors.markdown import neutral_links
from connectors.wecom_aibot.config import WecomAibotConfig
from connectors.wecom_aibot.media import AibotMedia, attachments_of
from connectors.wecom_aibot.reply import PLATFORM, AibotReply, Slot, Slots
from connectors.wecom_aibot.ws import AibotError, AibotLink, NotConnected, errcode_meaning, new_req_id
from connectors.wecom_common.callback import check_fresh, open_body, signed_query, verify_url
from connectors.wecom_common.crypto import WeComCrypto
from core.config import Settings
from core.feedback import FeedbackEvent, Vote
from core.kv import KeyValueCache
from core.lease import Holding, Lease
from core.messages import Account, InboundMessage
from core.redis_store import StoreUnavailable
from core.secrets import resolve_secret

log = structlog.get_logger("botd.wecom_aibot")

# How long a stream's state is kept for refresh callbacks (WeCom polls for at most 6 minutes).
STATE_TTL_S = 900
# How long an update or a push waits for the long connection to come (back) up.
UPDATE_WAIT_S = 10.0
PUSH_WAIT_S = 30.0
_MENTION = re.compile(r"^\s*@\S+\s*")
# feedback_event: WeCom's own 👍 / 👎 under a stream that carried a feedback id (the answer's), and the
# reasons a user ticks under a 👎 (kept in the stored reason, in both languages).
_VOTES = {1: Vote.UP, 2: Vote.DOWN, 3: Vote.NONE}
_REASONS = {1: "与问题无关 / irrelevant", 2: "内容不完整 / incomplete", 3: "内容有错误 / wrong",
            4: "数据分析错误 / wrong analysis"}


def stream_body(stream_id: str, finish: bool, content: str, feedback: str = "") -> dict[str, Any]:
    """A stream reply; with ``feedback`` (the answer's id) WeCom shows its 👍 / 👎 under it."""
    stream: dict[str, Any] = {"id": stream_id, "finish": finish, "content": content}
    if feedback:
        stream["feedback"] = {"id": feedback}
    return {"msgtype": "stream", "stream": stream}


def stream_id_of(bot: str, msgid: str) -> str:
    """The stream id of a message's answer: the same for WeCom's redeliveries and after a restart."""
    return hashlib.sha1(f"{bot}:{msgid}".encode()).hexdigest()[:32]


def text_of(body: dict[str, Any]) -> str:
    """The words of a message: text, the text items of a mixed message (a voice message's
    transcript is its Attachment's: :func:`connectors.wecom_aibot.media.attachments_of`)."""
    kind = body.get("msgtype")
    if kind == "text":
        return str((body.get("text") or {}).get("content", ""))
    if kind == "mixed":
        items = (body.get("mixed") or {}).get("msg_item") or []
        return "\n".join(str((i.get("text") or {}).get("content", "")) for i in items
                         if isinstance(i, dict) and i.get("msgtype") == "text").strip()
    return ""


# -- how stream updates and pushes reach WeCom ----------------------------------------------------


class SocketChannel:
    """Over the long connection: updates answer the callback's req_id; pushes are aibot_send_msg."""

    def __init__(self, link: AibotLink, req_id: str, chatid: str, live: bool) -> None:
        self.link = link
        self.req_id = req_id
        self.chatid = chatid
        self.live = live
        self.feedback = ""  # the answer's id when its bot takes feedback

    async def update(self, stream_id: str, content: str, finish: bool) -> None:
        await self.link.wait_ready(UPDATE_WAIT_S)
        await self.link.request("aibot_respond_msg", self.req_id,
                                stream_body(stream_id, finish, neutral_links(content), self.feedback))

    async def push(self, content: str) -> None:
        await self.link.wait_ready(PUSH_WAIT_S)
        await self.link.request("aibot_send_msg", new_req_id("aibot_send_msg"), {
            "chatid": self.chatid, "msgtype": "markdown", "markdown": {"content": neutral_links(content)}})

    def retry_after(self, exc: Exception) -> float | None:
        return 0.5 if isinstance(exc, AibotError) and exc.errcode == 6000 else None

    def stream_dead(self, exc: Exception) -> bool:
        # Expired, a req_id WeCom no longer knows, or no connection to send it on: the rest is pushed
        # (a push waits for the connection to come back).
        return isinstance(exc, NotConnected) or (isinstance(exc, AibotError) and exc.errcode in (846605, 846608))


class CallbackChannel:
    """Callback mode: updates are the state refresh callbacks read; pushes POST to response_url."""

    def __init__(self, connector: WecomAibotConnector, response_url: str, live: bool) -> None:
        self.connector = connector
        self.response_url = response_url
        self.live = live
        self.feedback = ""  # the answer's id when its bot takes feedback

    async def update(self, stream_id: str, content: str, finish: bool) -> None:
        await self.connector.set_state(stream_id, neutral_links(content), finish, self.feedback)

    async def push(self, content: str) -> None:
        if not self.response_url:
            raise AibotError(-1, "the message has no response_url to push to")
        http = self.connector.http
        assert http is not None, "connector not started"
        async with http.post(self.response_url, json={"msgtype": "markdown", "markdown": {
                "content": neutral_links(content)}}) as r:
            if r.status >= 400:
                raise AibotError(-1, f"response_url answered HTTP {r.status}")
            data = await r.json(content_type=None)
        code = int((data or {}).get("errcode", 0) or 0) if isinstance(data, dict) else 0
        if code:
            raise AibotError(code, str(data.get("errmsg", "")))

    def retry_after(self, exc: Exception) -> float | None:
        return None

    def stream_dead(self, exc: Exception) -> bool:
        return False


# -- the connector ----------------------------------------------------------------------------------


class _Bot:
    def __init__(self, name: str, cfg: WecomAibotConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.account = Account(connector=PLATFORM, name=name, routes=cfg.routes,
                               allow_chats=frozenset(cfg.allow_chats), allow_users=frozenset(cfg.allow_users),
                               tell_refused=True)
        self.crypto: WeComCrypto | None = None
        self.link: AibotLink | None = None
        self.runner: asyncio.Task[None] | None = None
        if cfg.mode == "callback":
            assert cfg.token is not None and cfg.encoding_aes_key is not None
            # The AI bot's receive id is the empty string (a self-built app's is its CorpID).
            self.crypto = WeComCrypto(resolve_secret(cfg.token), resolve_secret(cfg.encoding_aes_key), "")
        # Callback mode's files are encrypted with the bot's EncodingAESKey (the long connection
        # names a key in each message).
        self.media_key = resolve_secret(cfg.encoding_aes_key) if cfg.encoding_aes_key is not None else None


class WecomAibotConnector(Connector):
    name = PLATFORM

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.bots = {name: _Bot(name, cfg) for name, cfg in WecomAibotConfig.sections(self.config).items()
                     if cfg.enabled}
        self.slots = Slots()
        self.http: aiohttp.ClientSession | None = None
        self.streams: dict[str, dict[str, Any]] = {}  # callback mode: stream id -> {content, finish}
        self._stopping = False
        self._closed = asyncio.Event()

    def routes(self) -> list[Route]:
        if not any(b.cfg.mode == "callback" for b in self.bots.values()):
            return []
        return [("GET", "/wecom_aibot/{bot}", "verify_url"), ("POST", "/wecom_aibot/{bot}", "callback")]

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=10))
        for bot in self.bots.values():
            if bot.cfg.mode == "websocket":
                assert bot.cfg.secret is not None
                bot.link = AibotLink(bot.name, bot.cfg.ws_url, bot.cfg.bot_id, resolve_secret(bot.cfg.secret),
                                     bot.cfg.heartbeat_s, functools.partial(self._on_frame, bot))
                bot.runner = asyncio.create_task(self._run(bot), name=f"wecom-aibot-{bot.name}")
        log.info("wecom ai bots ready", bots={b.name: b.cfg.mode for b in self.bots.values()})

    async def stop_receiving(self) -> None:
        # The connections stay up: the answers under way still go out over them (and a message
        # arriving meanwhile is recorded for the next start).
        self._stopping = True
        for bot in self.bots.values():
            if bot.link is not None:
                bot.link.retiring = True

    async def close(self) -> None:
        self._stopping = True
        self._closed.set()
        for bot in self.bots.values():
            if bot.link is not None:
                await bot.link.close()
            if bot.runner is not None:
                bot.runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await bot.runner
                bot.runner = None
        if self.http is not None:
            await self.http.close()
            self.http = None

    # -- the long connection ------------------------------------------------------------------------

    async def _run(self, bot: _Bot) -> None:
        """Keep the bot's long connection while this daemon holds its lease."""
        assert bot.link is not None
        link = bot.link
        lease = Lease(self.cache.redis, self.cache.prefix, f"wecom_aibot:ws:{bot.cfg.bot_id}",
                      self.config.redis.lease_s, self.config.server.instance_name())
        backoff = 1.0
        async with Holding(lease, f"wecom-aibot-lease-{bot.name}") as holding:
            async for _ in holding.while_held(lambda: self._closed.is_set() or link.displaced,
                                              "wecom ai bot long connection", bot=bot.name):
                began = time.monotonic()
                try:
                    assert self.http is not None, "connector not started"
                    await link.session(self.http, lambda: holding.held)
                except asyncio.CancelledError:
                    raise
                except NotConnected:
                    pass
                except AibotError as exc:
                    log.error("wecom ai bot subscription refused (check bot_id and secret)", bot=bot.name,
                              errcode=exc.errcode, meaning=errcode_meaning(exc.errcode) if exc.errcode > 0
                              else exc.errmsg)
                    backoff = max(backoff, 30.0)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("wecom ai bot long connection failed; retrying", bot=bot.name,
                                error=type(exc).__name__, retry_in_s=backoff)
                if link.displaced or self._closed.is_set():
                    break
                if time.monotonic() - began > 60:
                    backoff = 1.0  # it had been up a while: the first retry comes soon
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), backoff)
                backoff = min(backoff * 2, bot.cfg.reconnect_max_s)
            if link.displaced:
                # Keep the lease until this daemon stops, so that no other daemon of this cluster
                # connects and displaces the new connection in turn.
                await self._closed.wait()

    async def _on_frame(self, bot: _Bot, frame: dict[str, Any]) -> None:
        cmd = frame.get("cmd")
        body = frame.get("body") or {}
        req_id = str((frame.get("headers") or {}).get("req_id", ""))
        if not isinstance(body, dict):
            return
        if cmd == "aibot_event_callback":
            event = (body.get("event") or {}).get("eventtype")
            log.info("wecom ai bot event", bot=bot.name, eventtype=event)  # "event" is structlog's own argument
            if event == "feedback_event":
                await self._feedback(bot, body)
            return
        # Taken even while stopping: recorded, it is answered after the restart instead of lost.
        if cmd != "aibot_msg_callback" or not req_id:
            return
        inbound = self._inbound(bot, body, {"mode": "websocket", "req_id": req_id})
        if inbound is None:
            return
        assert bot.link is not None
        target = self._target(bot, inbound, SocketChannel(bot.link, req_id, inbound.route["chatid"], live=True))
        await self.service.receive(inbound, target)

    # -- messages ----------------------------------------------------------------------------------

    def _inbound(self, bot: _Bot, body: dict[str, Any], route: dict[str, Any]) -> InboundMessage | None:
        msgid = str(body.get("msgid") or "")
        user = str((body.get("from") or {}).get("userid") or "")
        if not msgid or not user:
            log.warning("wecom ai bot message without msgid or sender ignored", bot=bot.name)
            return None
        group = body.get("chattype") == "group"
        chat = str(body.get("chatid") or user) if group else user
        text = text_of(body)
        if group:
            text = _MENTION.sub("", text, count=1)
        thread = "" if not group or bot.cfg.group_history == "chat" else user
        route = {**route, "chatid": chat, "chattype": "group" if group else "single", "t0": time.time(),
                 "stream_id": stream_id_of(bot.name, msgid)}
        attachments = attachments_of(body)
        msg = InboundMessage(
            platform=PLATFORM, bot=bot.name, account=bot.name, chat=chat, thread=thread, user=user,
            text=text.strip() or ("" if attachments else "(not text)"), readable=bool(text.strip() or attachments),
            attachments=attachments, event_id=f"{body.get('aibotid') or bot.cfg.bot_id or bot.name}:{msgid}",
            route=route)
        settings = self.config.bots.get(bot.name)
        if settings is not None and settings.feedback:
            route["feedback"] = msg.request_id  # WeCom's 👍 / 👎 come back with it (feedback_event)
        return msg

    async def _feedback(self, bot: _Bot, body: dict[str, Any]) -> None:
        """WeCom's 👍 / 👎 (or its withdrawal), with the reasons and words a user gave a 👎: stored
        by the service (same chat, the event's msgid not seen before). WeCom expects no answer."""
        fb = (body.get("event") or {}).get("feedback_event") or {}
        user = str((body.get("from") or {}).get("userid") or "")
        kind = fb.get("type") if isinstance(fb, dict) else None
        vote = _VOTES.get(kind) if isinstance(kind, int) else None
        if not isinstance(fb, dict) or not user or vote is None:
            return
        group = body.get("chattype") == "group"
        chat = str(body.get("chatid") or user) if group else user
        ticked = [_REASONS.get(r, str(r)) for r in fb.get("inaccurate_reason_list") or [] if isinstance(r, int)]
        reason = "; ".join([*ticked, str(fb.get("content") or "").strip()]).strip("; ")
        msgid = str(body.get("msgid") or "")
        try:
            await self.service.feedback(FeedbackEvent(
                PLATFORM, bot.name, chat, user, str(fb.get("id") or ""), vote, reason,
                event_id=f"{body.get('aibotid') or bot.cfg.bot_id or bot.name}:{msgid}" if msgid else ""))
        except Exception:  # feedback must never take the connection down
            log.exception("wecom ai bot feedback not taken", bot=bot.name)

    def _target(self, bot: _Bot, msg: InboundMessage, channel: SocketChannel | CallbackChannel,
                slot: Slot | None = None, covered: int = 0, stream_open: bool = False) -> AibotReply:
        r = msg.route
        channel.feedback = str(r.get("feedback") or "")
        target = AibotReply(bot.account, bot.cfg, channel, self.cache, stream_id=str(r["stream_id"]), user=msg.user,
                            slots=self.slots, slot=slot, covered=covered, stream_open=stream_open,
                            recall=msg.resumed and msg.final_answer is not None,
                            opened_at=float(r["t0"]) if r.get("mode") == "callback" else None)
        if self.http is not None:
            target.media = AibotMedia(self.http, bot.media_key)
        return target

    def target(self, msg: InboundMessage) -> AibotReply | None:
        """A message accepted before a restart. Over the long connection its req_id is gone with
        the old connection: the answer is pushed (after what a finished stream already showed,
        when the words are the stored ones). In callback mode its stream goes on (WeCom keeps
        polling) while its window lasts; the rest goes to its response_url."""
        bot = self.bots.get(msg.account or msg.route.get("account", msg.bot))
        r = msg.route
        if bot is None or "stream_id" not in r:
            return None
        covered = 0
        for mark in msg.progress.get("sent") or []:
            if isinstance(mark, str) and mark.startswith("done:") and msg.final_answer is not None:
                covered = int(mark[5:])
        if r.get("mode") == "callback":
            opened = bool(r.get("opened"))
            channel: SocketChannel | CallbackChannel = CallbackChannel(self, str(r.get("response_url", "")), opened)
            target = self._target(bot, msg, channel, covered=covered, stream_open=opened)
            target.arm()
            return target
        if bot.link is None:
            return None
        return self._target(bot, msg, SocketChannel(bot.link, str(r.get("req_id", "")), str(r["chatid"]), live=False),
                            covered=covered)

    # -- callback mode ------------------------------------------------------------------------------

    async def set_state(self, stream_id: str, content: str, finish: bool, feedback: str = "") -> None:
        state: dict[str, Any] = {"content": content, "finish": finish, "feedback": feedback}
        self.streams[stream_id] = state
        if finish:  # WeCom's next refresh takes it; forget it here anyway once WeCom has stopped asking
            asyncio.get_running_loop().call_later(STATE_TTL_S, self.streams.pop, stream_id, None)
        try:
            await self.cache.set(f"wecom_aibot:stream:{stream_id}", json.dumps(state, ensure_ascii=False),
                                 STATE_TTL_S)
        except StoreUnavailable:
            pass  # this daemon still answers the refreshes it gets

    async def _state(self, stream_id: str) -> dict[str, Any] | None:
        state = self.streams.get(stream_id)
        if state is not None:
            return state
        try:
            raw = await self.cache.get(f"wecom_aibot:stream:{stream_id}")
        except StoreUnavailable:
            return None
        try:
            return dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError):
            return None

    def _bot(self, request: web.Request) -> _Bot:
        bot = self.bots.get(request.match_info["bot"])
        if bot is None or bot.crypto is None:
            raise web.HTTPNotFound(text="no WeCom AI bot in callback mode is configured at this path")
        return bot

    async def verify_url(self, request: web.Request) -> web.StreamResponse:
        bot = self._bot(request)
        assert bot.crypto is not None
        return verify_url(request, bot.crypto, what="wecom ai bot", bot=bot.name, window_s=bot.cfg.timestamp_window_s)

    async def callback(self, request: web.Request) -> web.StreamResponse:
        bot = self._bot(request)
        crypto = bot.crypto
        assert crypto is not None
        q = signed_query(request)
        window = bot.cfg.timestamp_window_s
        check_fresh(q["timestamp"], window, what="wecom ai bot", bot=bot.name)  # a replay: refused before any work
        try:
            envelope = json.loads(await request.read())
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        encrypt = envelope.get("encrypt") if isinstance(envelope, dict) else None
        if not isinstance(encrypt, str) or not encrypt:
            raise web.HTTPBadRequest(text="no encrypt field")
        plain = open_body(q, encrypt, crypto, what="wecom ai bot", bot=bot.name)
        try:
            body = json.loads(plain)
        except ValueError:
            raise web.HTTPBadRequest(text="the decrypted message is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="the decrypted message is not a JSON object")
        if body.get("create_time") is not None:  # the message's own time, inside the ciphertext
            check_fresh(body["create_time"], window, what="wecom ai bot", bot=bot.name, field="create_time")
        kind = body.get("msgtype")
        if kind == "stream":
            sid = str((body.get("stream") or {}).get("id", ""))
            state = await self._state(sid) or {"content": "", "finish": False}
            if state.get("finish"):
                self.streams.pop(sid, None)
            return self._passive(crypto, q["nonce"], stream_body(
                sid, bool(state.get("finish")), str(state.get("content", "")), str(state.get("feedback") or "")))
        if kind == "event":
            event = (body.get("event") or {}).get("eventtype")
            log.info("wecom ai bot event", bot=bot.name, eventtype=event)  # "event" is structlog's own argument
            if event == "feedback_event":
                await self._feedback(bot, body)
            return web.Response(status=200, text="")
        if self._stopping:
            raise web.HTTPServiceUnavailable(text="botd is stopping")
        inbound = self._inbound(bot, body, {"mode": "callback", "response_url": str(body.get("response_url", ""))})
        if inbound is None:
            return web.Response(status=200, text="")
        sid = inbound.route["stream_id"]
        existing = await self._state(sid)  # a redelivery finds the stream its first delivery opened
        # A stream opens now if the user has a free place (WeCom allows 3 at once); otherwise the
        # answer waits its turn and goes to the message's response_url.
        slot = self.slots.try_acquire((bot.name, inbound.user), bot.cfg.max_in_flight) if existing is None else None
        inbound.route["opened"] = slot is not None
        if slot is not None:
            self.streams[sid] = {"content": "", "finish": False, "feedback": inbound.route.get("feedback", "")}
        target = self._target(bot, inbound, CallbackChannel(self, inbound.route["response_url"], slot is not None),
                              slot=slot, stream_open=slot is not None)
        if not await self.service.receive(inbound, target):
            if slot is not None:
                slot.release()
                self.streams.pop(sid, None)
            if existing is None:
                return web.Response(status=200, text="")
            # WeCom delivered it again (our first reply was lost): the same stream, as it is now.
            return self._passive(crypto, q["nonce"], stream_body(
                sid, bool(existing.get("finish")), str(existing.get("content", "")),
                str(existing.get("feedback") or "")))
        if slot is None:
            return web.Response(status=200, text="")
        target.arm()
        return self._passive(crypto, q["nonce"], stream_body(sid, False, "", str(inbound.route.get("feedback") or "")))

    @staticmethod
    def _passive(crypto: WeComCrypto, nonce: str, payload: dict[str, Any]) -> web.Response:
        """An encrypted passive reply: {encrypt, msgsignature, timestamp, nonce}."""
        encrypt = crypto.encrypt(json.dumps(payload, ensure_ascii=False))
        ts = str(int(time.time()))
        return web.json_response({"encrypt": encrypt, "msgsignature": crypto.signature(ts, nonce, encrypt),
                                  "timestamp": int(ts), "nonce": nonce})
