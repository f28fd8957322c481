"""DingTalk Stream mode: one long connection of one app, botd's own client.

The protocol (docs/protocols/dingtalk.md): POST ``/v1.0/gateway/connections/open`` with the
app's client id and secret -> ``{endpoint, ticket}``; a WebSocket to ``endpoint?ticket=...``
(a ticket opens one connection only: a new one for every reconnect); JSON frames
``{specVersion, type, headers: {messageId, topic, ...}, data: "<JSON string>"}``, each answered
with an ACK ``{code: 200, headers: {messageId, contentType}, message: "OK", data}``. The
gateway's ``SYSTEM ping`` is answered by echoing its ``opaque``; ``SYSTEM disconnect`` means
the gateway will close this connection soon: botd closes it and reconnects with a new ticket.

Why not the official ``dingtalk-stream`` SDK (0.24.3; the tests run it against the same fake,
so the fake and this client speak the same protocol as the SDK): its ``start()`` catches
``asyncio.CancelledError`` and reconnects, so a daemon cannot stop it; its HTTP calls are
blocking ``requests`` inside the event loop; its gateway URL comes only from an environment
variable read when the module is imported; after a failure it waits a fixed 10 s, no backoff;
and it learns the local address by "connecting" a UDP socket to 8.8.8.8.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import structlog

from connectors.dingtalk.api import DingtalkApiError

log = structlog.get_logger("botd.dingtalk")

ROBOT_TOPIC = "/v1.0/im/bot/messages/get"
CARD_TOPIC = "/v1.0/card/instances/callback"
USER_AGENT = "botd-dingtalk-stream/1"
# The gateway pings by frame; the WebSocket-level heartbeat finds a dead TCP connection sooner.
HEARTBEAT_S = 30.0


class Displaced(Exception):
    """This daemon no longer holds the app's long connection (the lease moved)."""


def local_ip() -> str:
    """This machine's address for the registration's ``localIp`` (informative only; no packet sent)."""
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return ""


class StreamLink:
    """One app's long connection: opened by :meth:`session`, which returns when it closes."""

    def __init__(self, name: str, api_base: str, client_id: str, secret: str,
                 on_robot_message: Callable[[dict[str, Any]], Awaitable[None]],
                 on_card: Callable[[dict[str, Any], str], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.api_base = api_base
        # A card's button pressed (the 👍 / 👎 under answers): the callback's data and the frame's messageId.
        self.on_card = on_card
        self.client_id = client_id
        self._secret = secret
        self.on_robot_message = on_robot_message
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.connected = asyncio.Event()
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _open(self, http: aiohttp.ClientSession) -> str:
        body = {"clientId": self.client_id, "clientSecret": self._secret,
                "subscriptions": [{"type": "CALLBACK", "topic": ROBOT_TOPIC}, {"type": "CALLBACK", "topic": CARD_TOPIC},
                                  {"type": "EVENT", "topic": "*"}],
                "ua": USER_AGENT, "localIp": local_ip()}
        async with http.post(f"{self.api_base}/v1.0/gateway/connections/open", json=body) as r:
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = {}
        if r.status >= 400 or not isinstance(data, dict) or not data.get("endpoint") or not data.get("ticket"):
            data = data if isinstance(data, dict) else {}
            raise DingtalkApiError(r.status, str(data.get("code", "")), str(data.get("message", "no endpoint")))
        endpoint = str(data["endpoint"])
        if not endpoint.startswith(("wss://", "ws://")):
            raise DingtalkApiError(r.status, "endpoint", "the gateway endpoint is not a ws(s):// URL")
        return f"{endpoint}{'&' if '?' in endpoint else '?'}ticket={quote_plus(str(data['ticket']))}"

    async def session(self, http: aiohttp.ClientSession, holding: Callable[[], bool]) -> bool:
        """Open the connection and serve it until it closes, DingTalk says ``disconnect``, or
        ``holding()`` turns False (raises :class:`Displaced` then). True when DingTalk asked to
        reconnect (``disconnect``): the next connection may open at once."""
        url = await self._open(http)
        asked = False
        async with http.ws_connect(url, heartbeat=HEARTBEAT_S, autoping=True) as ws:
            self.ws = ws
            self.connections += 1
            self.connected.set()
            log.info("dingtalk stream connected", robot=self.name)
            watch = asyncio.create_task(self._watch_lease(ws, holding))
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        if await self._frame(ws, msg.data) == "disconnect":
                            asked = True
                            break
                    elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break
            finally:
                self.connected.clear()
                self.ws = None
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
        if not holding():
            raise Displaced(self.name)
        log.info("dingtalk stream closed", robot=self.name, asked=asked)
        return asked

    async def _watch_lease(self, ws: aiohttp.ClientWebSocketResponse, holding: Callable[[], bool]) -> None:
        while not ws.closed:
            await asyncio.sleep(0.2)
            if not holding():
                log.info("dingtalk stream handed over to another daemon", robot=self.name)
                await ws.close()
                return

    async def close(self) -> None:
        ws = self.ws
        if ws is not None:
            await ws.close()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _frame(self, ws: aiohttp.ClientWebSocketResponse, raw: str) -> str:
        try:
            frame = json.loads(raw)
        except ValueError:
            log.warning("dingtalk stream frame is not JSON; ignored", robot=self.name)
            return ""
        if not isinstance(frame, dict):
            return ""
        kind = frame.get("type")
        raw_headers = frame.get("headers")
        headers: dict[str, Any] = raw_headers if isinstance(raw_headers, dict) else {}
        topic = headers.get("topic")
        mid = str(headers.get("messageId", ""))
        try:
            data = json.loads(frame.get("data") or "{}")
        except (ValueError, TypeError):
            data = {}
        if kind == "SYSTEM":
            if topic == "disconnect":
                # No ACK: the gateway closes this connection about 10 s later; a new ticket now.
                log.info("dingtalk gateway asks to reconnect", robot=self.name,
                         reason=str((data or {}).get("reason", ""))[:200] if isinstance(data, dict) else "")
                return "disconnect"
            if topic == "ping":
                opaque = data.get("opaque") if isinstance(data, dict) else None
                await self._ack(ws, mid, {"opaque": opaque})
            return ""
        if kind == "EVENT":
            await self._ack(ws, mid, {"status": "SUCCESS", "message": "success"})
            log.info("dingtalk event", robot=self.name, eventtype=headers.get("eventType"))  # "event": structlog's own
            return ""
        if kind == "CALLBACK":
            if topic == ROBOT_TOPIC and isinstance(data, dict):
                # Recorded before the ACK (DingTalk does not push a robot message twice on its own).
                task = asyncio.create_task(self._robot(ws, mid, data))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return ""
            if topic == CARD_TOPIC and isinstance(data, dict) and self.on_card is not None:
                try:
                    await self.on_card(data, mid)
                except Exception:
                    log.exception("dingtalk card callback not taken", robot=self.name)
            await self._ack(ws, mid, {"response": None})
        return ""

    async def _robot(self, ws: aiohttp.ClientWebSocketResponse, mid: str, data: dict[str, Any]) -> None:
        try:
            await self.on_robot_message(data)
        except Exception:
            log.exception("dingtalk robot message not taken", robot=self.name)
        await self._ack(ws, mid, {"response": None})

    async def _ack(self, ws: aiohttp.ClientWebSocketResponse, mid: str, data: dict[str, Any]) -> None:
        if ws.closed:
            return
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
            await ws.send_str(json.dumps({"code": 200, "headers": {"messageId": mid, "contentType": "application/json"},
                                          "message": "OK", "data": json.dumps(data)}))
