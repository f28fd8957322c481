"""WeCom AI bot long connection (智能机器人长连接): one WebSocket per bot, opened by botd.

Frames are JSON ``{"cmd", "headers": {"req_id"}, "body"}``. botd sends ``aibot_subscribe``
(BotID + Secret) first, a ``ping`` every ``heartbeat_s``, replies (``aibot_respond_msg``,
keyed by the callback's ``req_id``) and pushes (``aibot_send_msg``); WeCom acknowledges each
with a frame without ``cmd`` carrying the same ``req_id`` and an ``errcode``. WeCom sends
``aibot_msg_callback`` (a user's message) and ``aibot_event_callback``; its
``disconnected_event`` means a newer connection of the same bot took over: this one stops
and does not reconnect (two connections would displace each other for ever).

Frames of one ``req_id`` go one at a time (the next after the previous one's ack), as the
official SDK does. Nothing here logs the Secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog

from core.errors import BotdError

log = structlog.get_logger("botd.wecom_aibot")

ACK_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 10.0
# Reported errcodes: what they mean, for the log.
ERRCODES = {
    846605: "invalid req_id (the message's reply window is over, or it came over another connection)",
    846608: "stream message update expired (WeCom's 6-minute stream window is over)",
    6000: "command conflict; retry",
}


def errcode_meaning(code: int) -> str:
    return ERRCODES.get(code, "see https://developer.work.weixin.qq.com/devtool/query")


class AibotError(BotdError, RuntimeError):
    """WeCom refused a frame (errcode), or did not acknowledge it in time (errcode -1)."""

    def __init__(self, errcode: int, errmsg: str = "") -> None:
        super().__init__(f"errcode {errcode}: {errcode_meaning(errcode) if errcode != -1 else errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


class NotConnected(AibotError):
    def __init__(self, why: str) -> None:
        super().__init__(-2, why)


def new_req_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000)}_{os.urandom(4).hex()}"


Handler = Callable[[dict[str, Any]], Awaitable[None]]


class AibotLink:
    """The long connection of one AI bot: connect, subscribe, heartbeat, send with acks."""

    def __init__(self, name: str, url: str, bot_id: str, secret: str, heartbeat_s: float,
                 on_frame: Handler) -> None:
        self.name = name
        self.url = url
        self.bot_id = bot_id
        self._secret = secret
        self.heartbeat_s = heartbeat_s
        self.on_frame = on_frame
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready = asyncio.Event()  # subscribed; frames can be sent
        self.displaced = False
        self.retiring = False  # its daemon or connector is stopping: a takeover is expected
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # req_id -> (lock, its users)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- one connection ------------------------------------------------------------------------

    async def session(self, http: aiohttp.ClientSession, still_wanted: Callable[[], bool]) -> None:
        """Connect, subscribe and read until the connection ends (or ``still_wanted()`` turns
        False, checked at every heartbeat). Raises on a refused subscription or a network error."""
        async with http.ws_connect(self.url, autoping=True, heartbeat=None, max_msg_size=8 * 1024 * 1024,
                                   timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
            self.ws = ws
            try:
                await self._subscribe(ws)
                self.ready.set()
                log.info("wecom ai bot long connection up", bot=self.name, url=self.url)
                beat = asyncio.create_task(self._heartbeat(ws, still_wanted), name=f"wecom-aibot-ping-{self.name}")
                try:
                    await self._read(ws)
                finally:
                    beat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beat
            finally:
                self.ready.clear()
                self.ws = None
                for fut in self._acks.values():
                    if not fut.done():
                        fut.set_exception(NotConnected("the long connection closed"))
                self._acks.clear()

    async def _subscribe(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        req_id = new_req_id("aibot_subscribe")
        await ws.send_str(json.dumps({"cmd": "aibot_subscribe", "headers": {"req_id": req_id},
                                      "body": {"bot_id": self.bot_id, "secret": self._secret}}))
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while True:
            msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AibotError(-1, f"the connection ended before the subscription was answered ({msg.type.name})")
            frame = _loads(msg.data)
            if frame is None or (frame.get("headers") or {}).get("req_id") != req_id:
                continue
            code = int(frame.get("errcode", 0) or 0)
            if code:
                raise AibotError(code, str(frame.get("errmsg", "")))
            return

    async def _heartbeat(self, ws: aiohttp.ClientWebSocketResponse, still_wanted: Callable[[], bool]) -> None:
        missed = 0
        while not ws.closed:
            await asyncio.sleep(self.heartbeat_s)
            if not still_wanted():
                log.info("wecom ai bot long connection handed over", bot=self.name)
                await ws.close()
                return
            try:
                await self.request("ping", new_req_id("ping"), None)
                missed = 0
            except AibotError:
                missed += 1
                if missed >= 2:
                    log.warning("wecom ai bot: heartbeat not answered twice; reconnecting", bot=self.name)
                    await ws.close()
                    return

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    break
                continue
            frame = _loads(msg.data)
            if frame is None:
                log.warning("wecom ai bot: a frame that is not JSON ignored", bot=self.name)
                continue
            cmd = frame.get("cmd")
            if not cmd:
                req_id = str((frame.get("headers") or {}).get("req_id", ""))
                fut = self._acks.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                continue
            body = frame.get("body") or {}
            event = (body.get("event") or {}) if isinstance(body, dict) else {}
            if cmd == "aibot_event_callback" and event.get("eventtype") == "disconnected_event":
                self.displaced = True
                if self.retiring:
                    log.info("wecom ai bot long connection handed over to a new one", bot=self.name)
                else:
                    log.warning("wecom ai bot: another connection of this bot took over; this one stops and does "
                                "not reconnect (restart botd to take it back)", bot=self.name)
                await ws.close()
                return
            task = asyncio.create_task(self._handle(frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, frame: dict[str, Any]) -> None:
        try:
            await self.on_frame(frame)
        except Exception:  # one odd frame must never take the connection down
            log.exception("wecom ai bot frame not handled", bot=self.name, cmd=frame.get("cmd"))

    # -- sending ----------------------------------------------------------------------------------

    async def wait_ready(self, timeout_s: float) -> None:
        if self.displaced:
            raise NotConnected("this bot's long connection was taken over by another connection")
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except TimeoutError:
            raise NotConnected("the long connection is not up (another daemon may hold it)") from None

    async def request(self, cmd: str, req_id: str, body: dict[str, Any] | None,
                      timeout_s: float = ACK_TIMEOUT_S) -> dict[str, Any]:
        """Send one frame and wait for WeCom's ack; frames of one ``req_id`` one at a time."""
        lock, users = self._locks.get(req_id) or (asyncio.Lock(), 0)
        self._locks[req_id] = (lock, users + 1)
        try:
            async with lock:
                ws = self.ws
                if ws is None or ws.closed or (not self.ready.is_set() and cmd != "ping"):
                    raise NotConnected("the long connection is not up")
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._acks[req_id] = fut
                frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
                if body is not None:
                    frame["body"] = body
                try:
                    await ws.send_str(json.dumps(frame, ensure_ascii=False))
                    ack = await asyncio.wait_for(fut, timeout_s)
                except TimeoutError:
                    raise AibotError(-1, f"{cmd}: no ack within {timeout_s:g} s") from None
                except (ConnectionResetError, aiohttp.ClientError) as exc:
                    raise NotConnected(f"{cmd}: {type(exc).__name__}") from None
                finally:
                    self._acks.pop(req_id, None)
        finally:
            lock, users = self._locks[req_id]
            if users <= 1:
                del self._locks[req_id]
            else:
                self._locks[req_id] = (lock, users - 1)
        code = int(ack.get("errcode", 0) or 0)
        if code:
            raise AibotError(code, str(ack.get("errmsg", "")))
        return ack

    async def close(self) -> None:
        ws = self.ws
        if ws is not None and not ws.closed:
            await ws.close()
        for task in list(self._tasks):
            task.cancel()


def _loads(data: Any) -> dict[str, Any] | None:
    try:
        frame = json.loads(data)
    except (TypeError, ValueError):
        return None
    return frame if isinstance(frame, dict) else None
