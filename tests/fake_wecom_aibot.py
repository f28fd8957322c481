"""WeCom's side of an AI bot (智能机器人), on 127.0.0.1, written from the protocol facts
(PROTOCOLS.md "WeCom AI bot", WeCom's docs 100719 / 101031 / 101463):

* :class:`FakeAibot` -- the long connection (a WebSocket server: ``aibot_subscribe``, ``ping``,
  ``aibot_msg_callback`` sent by the test, ``aibot_respond_msg`` stream replies,
  ``aibot_send_msg`` pushes; a second subscription of the same bot gets the first one a
  ``disconnected_event`` and closes it) and the ``response_url`` endpoint of callback mode.
* :class:`CallbackSender` -- WeCom calling a bot in callback mode: encrypted JSON (wechatpy,
  an independent implementation, receive id ""), stream refresh callbacks until the stream
  finishes.

It enforces what WeCom enforces, as errors a test can see (:attr:`FakeAibot.errors`): at most
3 messages in flight per user and bot (a 4th stream opened while 3 are open), the stream
window (``window_s``, 6 minutes in WeCom; a test sets a few seconds), the 20,480-byte cap on
stream content and on a pushed message, updates after ``finish``, unknown req_ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from wechatpy.enterprise.crypto import WeChatCrypto

STREAM_BYTES = 20_480


@dataclass
class Stream:
    id: str
    req_id: str
    user: str
    msgid: str
    chat: str
    opened_at: float
    contents: list[str] = field(default_factory=list)
    finished: bool = False
    finished_at: float | None = None
    feedback: str = ""  # the feedback id the bot gave the stream (WeCom then shows 👍 / 👎 under it)

    @property
    def content(self) -> str:
        return self.contents[-1] if self.contents else ""


class FakeAibot:
    def __init__(self, bot_id: str = "aib-test-bot", secret: str = "aibot-long-secret", *, window_s: float = 360.0,
                 max_in_flight: int = 3) -> None:
        self.bot_id = bot_id
        self.secret = secret
        self.window_s = window_s
        self.max_in_flight = max_in_flight
        self.conns: dict[str, web.WebSocketResponse] = {}
        self.subscribes: list[tuple[str, bool]] = []  # (bot id, accepted)
        self.displaced = 0
        self.pings = 0
        self.errors: list[str] = []
        self.callbacks: dict[str, dict[str, str]] = {}  # req_id -> user, msgid, chat
        self.streams: dict[str, Stream] = {}
        self.pushes: list[dict[str, Any]] = []  # {"chatid"|"user", "content", "via"}
        self.response_urls: dict[str, dict[str, str]] = {}  # code -> user, msgid, chat
        self.url = ""
        from tests.fakes import FileShelf

        self.files = FileShelf()  # what users sent, stored encrypted as WeCom serves it (/media/<id>)

    # -- the test's side ------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def connected(self, bot_id: str | None = None) -> bool:
        ws = self.conns.get(bot_id or self.bot_id)
        return ws is not None and not ws.closed

    async def send_message(self, user: str, text: str, *, msgid: str | None = None, chat: str | None = None,
                           bot_id: str | None = None, kind: str = "text", content: Any = None) -> str:
        """A user's message over the long connection; returns its req_id."""
        bot_id = bot_id or self.bot_id
        ws = self.conns[bot_id]
        req_id = f"req-{os.urandom(6).hex()}"
        msgid = msgid or f"msg-{os.urandom(6).hex()}"
        body: dict[str, Any] = {"msgid": msgid, "aibotid": bot_id, "chattype": "group" if chat else "single",
                                "from": {"userid": user}, "msgtype": kind}
        if chat:
            body["chatid"] = chat
        if kind == "text":
            body["text"] = {"content": text}
        elif kind == "image" and content is None:
            body["image"] = {"url": "https://example.invalid/img", "aeskey": "x"}
        if content is not None:  # the message's own item: {"url", "aeskey"}, {"content"}, {"msg_item"}
            body[kind] = content
        self.callbacks[req_id] = {"user": user, "msgid": msgid, "chat": chat or user}
        await ws.send_str(json.dumps({"cmd": "aibot_msg_callback", "headers": {"req_id": req_id}, "body": body},
                                     ensure_ascii=False))
        return req_id

    async def send_event(self, user: str, event: dict[str, Any], *, msgid: str | None = None,
                         chat: str | None = None) -> str:
        """An event callback over the long connection (``{"eventtype": "feedback_event", ...}``)."""
        ws = self.conns[self.bot_id]
        req_id = f"req-{os.urandom(6).hex()}"
        await ws.send_str(json.dumps({"cmd": "aibot_event_callback", "headers": {"req_id": req_id},
                                      "body": event_body(self.bot_id, user, event, msgid, chat)}, ensure_ascii=False))
        return req_id

    def media(self, data: bytes, aeskey: str | None = None) -> dict[str, str]:
        """A picture's or file's ``{url, aeskey}`` item: ``data`` AES-256-CBC encrypted (iv = key[:16],
        PKCS#7 to 32 bytes) with ``aeskey`` (callback mode: the bot's EncodingAESKey) or a new key."""
        import base64

        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        aeskey = aeskey or base64.b64encode(os.urandom(32)).decode().rstrip("=")
        key = base64.b64decode(aeskey + "=")
        padder = padding.PKCS7(256).padder()
        enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
        mid = os.urandom(6).hex()
        self.files.put(mid, enc.update(padder.update(data) + padder.finalize()) + enc.finalize())
        return {"url": f"{self.url}/media/{mid}", "aeskey": aeskey}

    async def drop_connections(self) -> None:
        """The network fails: every connection closes without a word."""
        for ws in list(self.conns.values()):
            await ws.close()

    def open_streams(self, user: str, now: float | None = None) -> list[Stream]:
        now = time.monotonic() if now is None else now
        return [s for s in self.streams.values()
                if s.user == user and not s.finished and now - s.opened_at < self.window_s]

    def answers(self, user: str) -> int:
        """Finished streams plus pushed messages for ``user`` (in single chats)."""
        return (sum(1 for s in self.streams.values() if s.user == user and s.finished)
                + sum(1 for p in self.pushes if p.get("chatid") == user or p.get("user") == user))

    def shown_to(self, user: str) -> str:
        """What a user reads at the end: finished streams, then pushes, in order."""
        finished = [s for s in self.streams.values() if s.user == user and s.finished]
        return "".join(s.content for s in finished) + "".join(
            p["content"] for p in self.pushes if p.get("chatid") == user or p.get("user") == user)

    # -- the server ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/ws", self.ws_handler), web.post("/response/{code}", self.response_url),
                        web.get("/media/{mid}", self.media_file)])
        return app

    async def media_file(self, request: web.Request) -> web.StreamResponse:
        return await self.files.respond(request, request.match_info["mid"])

    def _error(self, text: str) -> None:
        self.errors.append(text)

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        bot_id: str | None = None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                cmd = frame.get("cmd")
                req_id = (frame.get("headers") or {}).get("req_id", "")
                body = frame.get("body") or {}
                if bot_id is None:
                    if cmd != "aibot_subscribe":
                        self._error(f"{cmd} before aibot_subscribe")
                        await ws.close()
                        break
                    ok = body.get("bot_id") == self.bot_id and body.get("secret") == self.secret
                    self.subscribes.append((str(body.get("bot_id")), ok))
                    if not ok:
                        await self._ack(ws, req_id, 40058, "invalid bot_id or secret")
                        continue
                    bot_id = body["bot_id"]
                    old = self.conns.get(bot_id)
                    self.conns[bot_id] = ws
                    await self._ack(ws, req_id, 0)
                    if old is not None and not old.closed:
                        self.displaced += 1
                        await old.send_str(json.dumps({
                            "cmd": "aibot_event_callback", "headers": {"req_id": f"ev-{os.urandom(4).hex()}"},
                            "body": {"msgid": os.urandom(6).hex(), "create_time": int(time.time()), "aibotid": bot_id,
                                     "msgtype": "event", "event": {"eventtype": "disconnected_event"}}}))
                        await old.close()
                    continue
                if cmd == "ping":
                    self.pings += 1
                    await self._ack(ws, req_id, 0)
                elif cmd == "aibot_respond_msg":
                    await self._ack(ws, req_id, self._respond(req_id, body))
                elif cmd == "aibot_send_msg":
                    await self._ack(ws, req_id, self._push(body))
                elif cmd == "aibot_respond_welcome_msg":
                    await self._ack(ws, req_id, 0)
                else:
                    self._error(f"unknown command {cmd!r}")
                    await self._ack(ws, req_id, 40000, "unknown cmd")
        finally:
            if bot_id is not None and self.conns.get(bot_id) is ws:
                del self.conns[bot_id]
        return ws

    @staticmethod
    async def _ack(ws: web.WebSocketResponse, req_id: str, errcode: int, errmsg: str = "ok") -> None:
        if not ws.closed:
            await ws.send_str(json.dumps({"headers": {"req_id": req_id}, "errcode": errcode, "errmsg": errmsg}))

    def _respond(self, req_id: str, body: dict[str, Any]) -> int:
        cb = self.callbacks.get(req_id)
        if cb is None:
            self._error(f"aibot_respond_msg with an unknown req_id {req_id}")
            return 846605
        if body.get("msgtype") != "stream":
            self._error(f"aibot_respond_msg msgtype {body.get('msgtype')!r}")
            return 40000
        s = body.get("stream") or {}
        code = self._stream_update(str(s.get("id", "")), str(s.get("content", "")), bool(s.get("finish")), req_id,
                                   cb)
        st = self.streams.get(str(s.get("id", "")))
        if code == 0 and st is not None and (s.get("feedback") or {}).get("id"):
            st.feedback = str(s["feedback"]["id"])
        return code

    def _stream_update(self, sid: str, content: str, finish: bool, req_id: str, cb: dict[str, str]) -> int:
        now = time.monotonic()
        if len(content.encode()) > STREAM_BYTES:
            self._error(f"stream {sid}: content of {len(content.encode())} bytes (cap {STREAM_BYTES})")
            return 40058
        st = self.streams.get(sid)
        if st is None:
            if not sid:
                self._error("a stream reply without a stream id")
                return 40058
            open_now = self.open_streams(cb["user"], now)
            if len(open_now) >= self.max_in_flight:
                self._error(f"user {cb['user']}: a stream opened while {len(open_now)} are in flight")
                return 846607
            st = self.streams[sid] = Stream(sid, req_id, cb["user"], cb["msgid"], cb["chat"], now)
        else:
            if st.finished:
                self._error(f"stream {sid}: updated after finish")
                return 846608
            if now - st.opened_at > self.window_s:
                self._error(f"stream {sid}: updated {now - st.opened_at:.1f} s after it opened "
                            f"(window {self.window_s} s)")
                return 846608
        st.contents.append(content)
        if finish:
            st.finished, st.finished_at = True, now
        return 0

    def _push(self, body: dict[str, Any]) -> int:
        if body.get("msgtype") != "markdown":
            self._error(f"aibot_send_msg msgtype {body.get('msgtype')!r}")
            return 40000
        content = str((body.get("markdown") or {}).get("content", ""))
        if len(content.encode()) > STREAM_BYTES:
            self._error(f"push of {len(content.encode())} bytes (cap {STREAM_BYTES})")
            return 40058
        self.pushes.append({"chatid": body.get("chatid"), "content": content, "via": "aibot_send_msg"})
        return 0

    async def response_url(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        who = self.response_urls.get(code)
        body = await request.json()
        if who is None:
            self._error(f"response_url {code} unknown")
            return web.json_response({"errcode": 40000, "errmsg": "invalid response_code"})
        content = str((body.get("markdown") or {}).get("content", ""))
        if body.get("msgtype") != "markdown" or len(content.encode()) > STREAM_BYTES:
            self._error(f"response_url {code}: bad push {body.get('msgtype')!r} of {len(content.encode())} bytes")
            return web.json_response({"errcode": 40058, "errmsg": "invalid"})
        self.pushes.append({"user": who["user"], "content": content, "via": "response_url"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})


def event_body(bot_id: str, user: str, event: dict[str, Any], msgid: str | None = None,
               chat: str | None = None) -> dict[str, Any]:
    """An event as WeCom sends it to an AI bot (``msgtype: event``)."""
    body: dict[str, Any] = {"msgid": msgid or f"ev-{os.urandom(6).hex()}", "aibotid": bot_id,
                            "create_time": int(time.time()), "chattype": "group" if chat else "single",
                            "from": {"userid": user}, "msgtype": "event", "event": event}
    if chat:
        body["chatid"] = chat
    return body


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


class CallbackSender:
    """WeCom calling an AI bot in callback mode at ``url`` (…/wecom_aibot/<bot>)."""

    def __init__(self, fake: FakeAibot, session: aiohttp.ClientSession, url: str, token: str, aes_key: str,
                 refresh_every_s: float = 0.2) -> None:
        self.fake = fake
        self.session = session
        self.url = url
        self.token = token
        self.crypto = WeChatCrypto(token, aes_key, "")  # the AI bot's receive id is ""
        self.refresh_every_s = refresh_every_s
        self.passive: list[dict[str, Any]] = []  # every decrypted passive reply

    def encrypt(self, payload: dict[str, Any]) -> str:
        xml = self.crypto.encrypt_message(json.dumps(payload, ensure_ascii=False), "nonce1", "1700000000")
        return re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]></Encrypt>", xml).group(1)

    async def post(self, payload: dict[str, Any] | None = None, *, encrypt: str | None = None,
                   msg_signature: str | None = None, ts: str | None = None) -> tuple[int, dict[str, Any] | None]:
        """POST one callback (signed at ``ts``, default now); returns the HTTP status and the
        decrypted passive reply (None: empty)."""
        enc = encrypt if encrypt is not None else self.encrypt(payload or {})
        ts, nonce = ts or str(int(time.time())), os.urandom(4).hex()
        sig = msg_signature or signature(self.token, ts, nonce, enc)
        async with self.session.post(f"{self.url}?msg_signature={sig}&timestamp={ts}&nonce={nonce}",
                                     json={"encrypt": enc}) as r:
            text = await r.text()
            if r.status != 200 or not text:
                return r.status, None
        reply = json.loads(text)
        if reply.get("nonce") != nonce:
            self.fake.errors.append("a passive reply did not echo the callback's nonce")
        if signature(self.token, str(reply["timestamp"]), reply["nonce"], reply["encrypt"]) != reply["msgsignature"]:
            self.fake.errors.append("a passive reply with a bad msgsignature")
        plain = json.loads(self.crypto.decrypt_message({"Encrypt": reply["encrypt"]}, reply["msgsignature"],
                                                       str(reply["timestamp"]), reply["nonce"]))
        self.passive.append(plain)
        return r.status, plain

    def message(self, user: str, text: str, msgid: str, chat: str | None = None) -> dict[str, Any]:
        code = f"rc-{msgid}"
        self.fake.response_urls[code] = {"user": user, "msgid": msgid, "chat": chat or user}
        body: dict[str, Any] = {"msgid": msgid, "aibotid": self.fake.bot_id, "chattype": "group" if chat else "single",
                                "from": {"userid": user}, "response_url": f"{self.fake.url}/response/{code}",
                                "msgtype": "text", "text": {"content": text}}
        if chat:
            body["chatid"] = chat
        return body

    async def converse(self, user: str, text: str, msgid: str, chat: str | None = None) -> Stream | None:
        """Send a message and follow its stream with refresh callbacks, as WeCom does, until it
        finishes or the window closes; the stream as the user saw it (None: no stream opened)."""
        status, reply = await self.post(self.message(user, text, msgid, chat))
        if status != 200:
            self.fake.errors.append(f"message {msgid}: HTTP {status}")
            return None
        if reply is None:
            return None
        sid = str(reply["stream"]["id"])
        cb = {"user": user, "msgid": msgid, "chat": chat or user}
        code = self.fake._stream_update(sid, reply["stream"].get("content", ""), bool(reply["stream"].get("finish")),
                                        msgid, cb)
        st = self.fake.streams.get(sid)
        while code == 0 and st is not None and not st.finished:
            if time.monotonic() - st.opened_at > self.fake.window_s:
                self.fake.errors.append(f"stream {sid}: not finished within the window ({self.fake.window_s} s)")
                break
            await asyncio.sleep(self.refresh_every_s)
            ts = int(time.time())
            status, reply = await self.post({"msgid": f"refresh-{os.urandom(4).hex()}", "aibotid": self.fake.bot_id,
                                             "chattype": "group" if chat else "single", "from": {"userid": user},
                                             "msgtype": "stream", "stream": {"id": sid}, "create_time": ts})
            if status != 200 or reply is None or reply.get("msgtype") != "stream":
                self.fake.errors.append(f"refresh of {sid}: HTTP {status}, reply {reply}")
                break
            s = reply["stream"]
            if s.get("id") != sid:
                self.fake.errors.append(f"refresh of {sid} answered for stream {s.get('id')}")
            if s.get("content", "") == st.content and not s.get("finish"):
                continue  # nothing new: WeCom shows the same
            code = self.fake._stream_update(sid, s.get("content", ""), bool(s.get("finish")), msgid, cb)
        return st
