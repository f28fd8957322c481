"""Feishu / Lark's long connection (长连接): one app's WebSocket, botd's own client.

The protocol (docs/protocols/feishu.md): POST ``{domain}/callback/ws/endpoint`` with the App ID
and Secret -> ``{code, data: {URL, ClientConfig}}``; a WebSocket to that URL (its query holds
``device_id`` and ``service_id``); binary protobuf frames (:mod:`connectors.feishu.frame`). The
client pings (a CONTROL frame ``type=ping``) every ``PingInterval`` seconds and takes the
settings a pong carries; an event is a DATA frame ``type=event`` (split into ``sum`` frames when
large), answered with the same frame, ``biz_rt`` added, payload ``{"code": 200}`` -- within 3 s,
or Feishu pushes it again.

Why not lark-oapi's ``ws.Client`` (1.7.5; the tests run it against the same fake, so the fake
and this client speak the same protocol as the SDK): it runs on an event loop taken when its
module is imported and ``start()`` blocks on it forever, so it cannot run inside botd's
running loop, has no way to stop, and handles one app per process; its endpoint request is a
blocking ``requests`` call; its event handler is synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp
import structlog

from connectors.feishu.frame import CONTROL, DATA, Frame, FrameError

log = structlog.get_logger("botd.feishu")

# Codes of the endpoint request that are worth retrying (busy, internal); any other is a
# configuration problem (lark-oapi stops on them too).
RETRYABLE = {1, 1000040343}
EXCEED_CONN_LIMIT = 1000040350
# Events are answered within this (Feishu's limit is 3 s); the message keeps being recorded after.
ANSWER_WITHIN_S = 2.5
COMBINE_S = 5.0


class FeishuWsError(Exception):
    """The long connection was refused: ``fatal`` when retrying cannot help (bad app id or secret)."""

    def __init__(self, code: int, msg: str, fatal: bool) -> None:
        super().__init__(f"code {code}: {msg}")
        self.code = code
        self.fatal = fatal


class Displaced(Exception):
    """This daemon no longer holds the app's long connection (the lease moved)."""


class FeishuLink:
    """One app's long connection: opened by :meth:`session`, which returns when it closes."""

    def __init__(self, name: str, base: str, app_id: str, secret: str,
                 on_event: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.name = name
        self.base = base
        self.app_id = app_id
        self._secret = secret
        self.on_event = on_event
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.connected = asyncio.Event()
        self.ping_interval = 120.0
        self.service_id = 0
        self._parts: dict[str, tuple[float, list[bytes | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def _endpoint(self, http: aiohttp.ClientSession) -> str:
        async with http.post(f"{self.base}/callback/ws/endpoint", json={"AppID": self.app_id,
                                                                       "AppSecret": self._secret},
                             headers={"locale": "zh"}) as r:
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = None
        if r.status != 200 or not isinstance(data, dict):
            raise FeishuWsError(r.status, "endpoint request failed", fatal=False)
        code = int(data.get("code") or 0)
        if code:
            raise FeishuWsError(code, str(data.get("msg", "")), fatal=code not in RETRYABLE)
        body = data.get("data") or {}
        self._configure(body.get("ClientConfig") or {})
        url = str(body.get("URL") or "")
        if not url.startswith(("wss://", "ws://")):
            raise FeishuWsError(-1, "the endpoint answer holds no ws(s):// URL", fatal=False)
        return url

    def _configure(self, conf: dict[str, Any]) -> None:
        with contextlib.suppress(TypeError, ValueError):
            if conf.get("PingInterval"):
                self.ping_interval = max(1.0, float(conf["PingInterval"]))

    async def session(self, http: aiohttp.ClientSession, holding: Callable[[], bool]) -> None:
        """Open the connection and serve it until it closes or ``holding()`` turns False
        (raises :class:`Displaced` then)."""
        url = await self._endpoint(http)
        query = parse_qs(urlparse(url).query)
        try:
            self.service_id = int((query.get("service_id") or ["0"])[0])
        except ValueError:
            self.service_id = 0
        try:
            ws = await http.ws_connect(url, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            hdrs: Any = exc.headers or {}
            status = hdrs.get("handshake-status", "")
            auth = hdrs.get("handshake-autherrcode", "")
            if auth == str(EXCEED_CONN_LIMIT):
                raise FeishuWsError(EXCEED_CONN_LIMIT, "too many long connections for this app", fatal=False) from None
            if status == "403":
                raise FeishuWsError(403, str(hdrs.get("handshake-msg", "forbidden")), fatal=True) from None
            raise
        async with ws:
            self.ws = ws
            self.connected.set()
            log.info("feishu long connection up", app=self.name)
            helpers = [asyncio.create_task(self._ping_loop(ws)), asyncio.create_task(self._watch_lease(ws, holding))]
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        await self._frame(ws, msg.data)
                    elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break
            finally:
                self.connected.clear()
                self.ws = None
                for task in helpers:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if not holding():
            raise Displaced(self.name)
        log.info("feishu long connection closed", app=self.name)

    async def close(self) -> None:
        ws = self.ws
        if ws is not None:
            await ws.close()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _watch_lease(self, ws: aiohttp.ClientWebSocketResponse, holding: Callable[[], bool]) -> None:
        while not ws.closed:
            await asyncio.sleep(0.2)
            if not holding():
                log.info("feishu long connection handed over to another daemon", app=self.name)
                await ws.close()
                return

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed:
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                await ws.send_bytes(Frame(service=self.service_id, method=CONTROL,
                                          headers=[("type", "ping")]).encode())
            await asyncio.sleep(self.ping_interval)

    async def _frame(self, ws: aiohttp.ClientWebSocketResponse, raw: bytes) -> None:
        try:
            frame = Frame.decode(raw)
        except FrameError as exc:
            log.warning("feishu frame not understood; ignored", app=self.name, error=str(exc))
            return
        kind = frame.header("type")
        if frame.method == CONTROL:
            if kind == "pong" and frame.payload:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    self._configure(json.loads(frame.payload))
            return
        if frame.method != DATA:
            return
        mid, total, seq = frame.header("message_id"), frame.header("sum"), frame.header("seq")
        if mid is None or total is None or seq is None or frame.header("trace_id") is None:
            return  # as lark-oapi does: a frame missing one is dropped unanswered
        payload = self._combine(mid, total, seq, frame.payload or b"")
        if payload is None:
            return
        task = asyncio.create_task(self._answer(ws, frame, kind, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _combine(self, mid: str, total: str, seq: str, part: bytes) -> bytes | None:
        try:
            n, i = int(total), int(seq)
        except ValueError:
            return None
        if n <= 1:
            return part
        if not 0 <= i < n or n > 1000:
            return None
        now = time.monotonic()
        self._parts = {k: v for k, v in self._parts.items() if now - v[0] < COMBINE_S}
        _, parts = self._parts.setdefault(mid, (now, [None] * n))
        if len(parts) != n:
            return None
        parts[i] = part
        if any(p is None for p in parts):
            return None
        del self._parts[mid]
        return b"".join(p or b"" for p in parts)

    async def _answer(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame, kind: str | None,
                      payload: bytes) -> None:
        started = time.monotonic()
        code = 200
        # "card": a card's button pressed (card.action.trigger, the 👍 / 👎 under answers), as lark-oapi
        # dispatches it: the same JSON as an event.
        if kind in ("event", "card"):
            try:
                event = json.loads(payload)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
                handling: asyncio.Task[None] = asyncio.ensure_future(self.on_event(event))
                # Answered in time even when recording is slow; the recording goes on.
                await asyncio.wait({handling}, timeout=ANSWER_WITHIN_S)
                failure = handling.exception() if handling.done() else None
                if failure is not None:
                    raise failure
                if not handling.done():
                    self._tasks.add(handling)
                    handling.add_done_callback(self._tasks.discard)
            except Exception as exc:
                log.warning("feishu event not taken", app=self.name, error=f"{type(exc).__name__}: {exc}")
                code = 500
        reply = Frame(seq_id=frame.seq_id, log_id=frame.log_id, service=frame.service, method=frame.method,
                      headers=[*frame.headers, ("biz_rt", str(int((time.monotonic() - started) * 1000)))],
                      payload=json.dumps({"code": code}).encode())
        if not ws.closed:
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                await ws.send_bytes(reply.encode())
