"""Feishu / Lark's side of a self-built app's bot, on 127.0.0.1, written from the published
protocol (docs/protocols/feishu.md, each fact with its source):

* the OpenAPI: ``tenant_access_token/internal`` (tokens checked on every call; a refused one
  answers HTTP 400 code 99991663), ``bot/v3/info``, message reply (``uuid`` sent once) and
  patch, CardKit card entities (``sequence`` strictly increasing: 300317; content updates
  only in streaming mode: 300309), the contact API;
* the long connection: ``POST /callback/ws/endpoint`` -> ``{URL, ClientConfig}``, and a
  WebSocket speaking binary ``pbbp2.Frame`` with lark-oapi's own generated protobuf class (an
  implementation independent of botd's codec): pings answered with pongs carrying the
  ClientConfig, events pushed as DATA frames (split in ``sum`` parts on request), every
  answer recorded;
* rate limits injected by the test (:meth:`FakeFeishu.throttle`): HTTP 429 code 99991400 with
  ``x-ogw-ratelimit-reset``.

Every protocol error botd makes lands in :attr:`FakeFeishu.errors`.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from lark_oapi.ws.pb.pbbp2_pb2 import Frame as PbFrame

BOT_OPEN_ID = "ou_botd_bot"


@dataclass
class CardEntity:
    card_id: str
    card: dict[str, Any]
    streaming: bool
    sequence: int = -1
    contents: list[str] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def content(self) -> str:
        if self.contents:
            return self.contents[-1]
        return str(self.card["body"]["elements"][0].get("content", ""))


class FakeFeishu:
    def __init__(self, app_id: str = "cli_botdtest", secret: str = "feishu-app-secret", *,
                 ping_interval: int = 120, marker: str = "") -> None:
        self.app_id = app_id
        self.marker = marker  # put into every token and connection URL (a log test looks for it)
        self.secret = secret
        self.ping_interval = ping_interval
        self.url = ""
        self.tokens: set[str] = set()
        self.issued: list[str] = []  # every token ever given
        self.token_requests = 0
        self.endpoints = 0
        self.conns: list[web.WebSocketResponse] = []
        self.pings = 0
        self.answers: dict[str, dict[str, Any]] = {}  # message_id header -> {code, headers}
        self.replies: list[dict[str, Any]] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.cards: dict[str, CardEntity] = {}
        self.uuids: dict[str, str] = {}
        self.departments: dict[str, list[str]] = {}
        self.user_lookups: list[str] = []
        self.errors: list[str] = []
        self.throttled: dict[str, int] = {}
        self.throttle_reset_s = 1
        self.throttle_hits: list[tuple[str, float]] = []
        self.cardkit_forbidden = False
        self.calls: list[tuple[str, float]] = []
        from tests.fakes import FileShelf

        self.files = FileShelf()  # "<message_id>/<file_key>" -> bytes (im/v1 message resources)
        self.resource_types: list[str] = []  # the ?type= of each resource download

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_post("/open-apis/auth/v3/tenant_access_token/internal", self.tenant_token)
        r.add_post("/callback/ws/endpoint", self.endpoint)
        r.add_get("/ws", self.gateway)
        r.add_get("/open-apis/bot/v3/info", self.bot_info)
        r.add_post("/open-apis/im/v1/messages/{mid}/reply", self.reply)
        r.add_patch("/open-apis/im/v1/messages/{mid}", self.patch)
        r.add_post("/open-apis/cardkit/v1/cards", self.card_create)
        r.add_put("/open-apis/cardkit/v1/cards/{cid}/elements/{eid}/content", self.card_content)
        r.add_patch("/open-apis/cardkit/v1/cards/{cid}/settings", self.card_settings)
        r.add_post("/open-apis/cardkit/v1/cards/{cid}/elements", self.card_elements)
        r.add_get("/open-apis/contact/v3/users/{uid}", self.user_get)
        r.add_get("/open-apis/im/v1/messages/{mid}/resources/{key}", self.resource)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        for ws in list(self.conns):
            await ws.close()

    # -- tokens and refusals -----------------------------------------------------------------------------

    async def tenant_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("app_id") != self.app_id or body.get("app_secret") != self.secret:
            return web.json_response({"code": 10014, "msg": "app secret invalid"}, status=400)
        self.token_requests += 1
        token = f"t-{self.marker}{uuid.uuid4().hex}"
        self.tokens.add(token)
        self.issued.append(token)
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200})

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def throttle(self, kind: str, times: int) -> None:
        """The next ``times`` calls of ``kind`` ("reply", "patch", "card_content", ...) answer 429 99991400."""
        self.throttled[kind] = times

    def _refusal(self, request: web.Request, kind: str) -> web.Response | None:
        self.calls.append((kind, time.monotonic()))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return web.json_response({"code": 99991663, "msg": "Invalid access token for authorization."},
                                     status=400)
        if self.throttled.get(kind, 0) > 0:
            self.throttled[kind] -= 1
            self.throttle_hits.append((kind, time.monotonic()))
            return web.json_response({"code": 99991400, "msg": "request trigger frequency limit"}, status=429,
                                     headers={"x-ogw-ratelimit-limit": "50",
                                              "x-ogw-ratelimit-reset": str(self.throttle_reset_s)})
        return None

    @staticmethod
    def _ok(data: dict[str, Any] | None = None) -> web.Response:
        return web.json_response({"code": 0, "msg": "success", "data": data or {}})

    # -- the long connection ----------------------------------------------------------------------------

    @property
    def ws_base(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    async def endpoint(self, request: web.Request) -> web.Response:
        body = await request.json()
        if request.headers.get("locale") != "zh":
            self.errors.append("endpoint request without the locale header")
        if body.get("AppID") != self.app_id or body.get("AppSecret") != self.secret:
            return web.json_response({"code": 1000040344, "msg": "app id or secret wrong"})
        self.endpoints += 1
        return web.json_response({"code": 0, "msg": "ok", "data": {
            "URL": f"{self.ws_base}/ws?device_id=dev{self.endpoints}&service_id=33&access_key=k{self.marker}",
            "ClientConfig": self.client_config()}})

    def client_config(self) -> dict[str, int]:
        return {"ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0, "PingInterval": self.ping_interval}

    async def gateway(self, request: web.Request) -> web.StreamResponse:
        if "device_id" not in request.query or "service_id" not in request.query:
            raise web.HTTPForbidden(text="no device_id / service_id")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.conns.append(ws)
        try:
            async for msg in ws:
                if msg.type != web.WSMsgType.BINARY:
                    self.errors.append("a text frame on the long connection")
                    continue
                frame = PbFrame()
                frame.ParseFromString(msg.data)
                headers = {h.key: h.value for h in frame.headers}
                if frame.method == 0:  # CONTROL
                    if headers.get("type") == "ping":
                        if frame.service != 33:
                            self.errors.append(f"ping for service {frame.service}")
                        self.pings += 1
                        await ws.send_bytes(self._frame(0, {"type": "pong"},
                                                        json.dumps(self.client_config()).encode()))
                    continue
                answer = json.loads(frame.payload or b"{}")
                self.answers[headers.get("message_id", "")] = {"code": answer.get("code"), "headers": headers}
        finally:
            with contextlib.suppress(ValueError):
                self.conns.remove(ws)
        return ws

    @staticmethod
    def _frame(method: int, headers: dict[str, str], payload: bytes) -> bytes:
        frame = PbFrame()
        frame.SeqID = 1
        frame.LogID = 7
        frame.service = 33
        frame.method = method
        for k, v in headers.items():
            h = frame.headers.add()
            h.key, h.value = k, v
        frame.payload = payload
        return frame.SerializeToString()

    def connected(self) -> int:
        return sum(not ws.closed for ws in self.conns)

    async def push(self, event: dict[str, Any], parts: int = 1) -> str:
        """Push an event over the long connection (in ``parts`` frames); returns the frames' message_id."""
        live = [ws for ws in self.conns if not ws.closed]
        if not live:
            raise AssertionError("no long connection to push to")
        mid = uuid.uuid4().hex
        payload = json.dumps(event, ensure_ascii=False).encode()
        size = -(-len(payload) // parts)
        for i in range(parts):
            await live[0].send_bytes(self._frame(1, {"type": "event", "message_id": mid, "trace_id": "tr",
                                                     "sum": str(parts), "seq": str(i)},
                                                 payload[i * size:(i + 1) * size]))
        return mid

    async def drop_connections(self) -> None:
        for ws in list(self.conns):
            await ws.close(code=1006)

    def message_event(self, user: str, text: str, *, chat: str = "", at_bot: bool = True, message_id: str = "",
                      message_type: str = "text", event_id: str = "",
                      content: dict[str, Any] | None = None) -> dict[str, Any]:
        group = bool(chat)
        mentions = []
        if group and at_bot:
            text = f"@_user_1 {text}"
            mentions.append({"key": "@_user_1", "id": {"open_id": BOT_OPEN_ID, "union_id": "on_b", "user_id": ""},
                             "name": "botd", "tenant_key": "tk"})
        if content is None:
            content = {"text": text} if message_type == "text" else {"image_key": "img_v2_x"}
        mid = message_id or f"om_{uuid.uuid4().hex}"
        return {"schema": "2.0", "header": {
            "event_id": event_id or uuid.uuid4().hex, "event_type": "im.message.receive_v1",
            "create_time": str(int(time.time() * 1000)), "token": "vtoken", "app_id": self.app_id,
            "tenant_key": "tk"}, "event": {
            "sender": {"sender_id": {"union_id": f"on_{user}", "user_id": user, "open_id": f"ou_{user}"},
                       "sender_type": "user", "tenant_key": "tk"},
            "message": {"message_id": mid, "root_id": "", "parent_id": "", "create_time": str(int(time.time() * 1000)),
                        "chat_id": chat or f"oc_p2p_{user}", "chat_type": "group" if group else "p2p",
                        "message_type": message_type, "content": json.dumps(content, ensure_ascii=False),
                        "mentions": mentions}}}

    # -- the OpenAPI -------------------------------------------------------------------------------------

    async def resource(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request, "resource")
        if refused is not None:
            return refused
        kind = request.query.get("type", "")
        self.resource_types.append(kind)
        key = f"{request.match_info['mid']}/{request.match_info['key']}"
        if kind not in ("image", "file") or key not in self.files.blobs:
            return web.json_response({"code": 234003, "msg": "File not in msg."}, status=400)
        return await self.files.respond(request, key)

    async def bot_info(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "bot_info")
        if refused is not None:
            return refused
        return web.json_response({"code": 0, "msg": "ok", "bot": {"open_id": BOT_OPEN_ID, "app_name": "botd",
                                                                   "activate_status": 2}})

    async def reply(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "reply")
        if refused is not None:
            return refused
        body = await request.json()
        key = body.get("uuid") or ""
        if key and key in self.uuids:  # the same uuid within an hour: sent once
            return self._ok({"message_id": self.uuids[key]})
        mid = f"om_{uuid.uuid4().hex}"
        content = json.loads(body["content"])
        entry = {"message_id": mid, "reply_to": request.match_info["mid"], "msg_type": body["msg_type"],
                 "content": content, "reply_in_thread": body.get("reply_in_thread"), "uuid": key}
        if body["msg_type"] == "interactive" and content.get("type") == "card":
            if content["data"]["card_id"] not in self.cards:
                self.errors.append("a reply with an unknown card entity")
        self.replies.append(entry)
        self.messages[mid] = entry
        if key:
            self.uuids[key] = mid
        return self._ok({"message_id": mid, "msg_type": body["msg_type"]})

    async def patch(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "patch")
        if refused is not None:
            return refused
        mid = request.match_info["mid"]
        msg = self.messages.get(mid)
        if msg is None or msg["msg_type"] != "interactive":
            self.errors.append("patch of an unknown message or not a card")
            return web.json_response({"code": 230054, "msg": "unsupported"}, status=400)
        card = json.loads((await request.json())["content"])
        if not card.get("config", {}).get("update_multi"):
            self.errors.append("a patched card without update_multi")
        self.patches.append((mid, card))
        msg["content"] = card
        return self._ok()

    async def card_create(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "card_create")
        if refused is not None:
            return refused
        if self.cardkit_forbidden:  # the app lacks 创建与更新卡片
            return web.json_response({"code": 99991672, "msg": "Access denied. One of the following scopes is "
                                      "required: [cardkit:card:write]."}, status=400)
        body = await request.json()
        card = json.loads(body["data"])
        if body.get("type") != "card_json" or card.get("schema") != "2.0":
            self.errors.append("a card entity that is not card JSON 2.0")
        if card.get("config", {}).get("update_multi") is False:
            return web.json_response({"code": 300302, "msg": "update_multi false"}, status=400)
        cid = f"card_{uuid.uuid4().hex[:12]}"
        self.cards[cid] = CardEntity(cid, card, bool(card.get("config", {}).get("streaming_mode")))
        return self._ok({"card_id": cid})

    def _sequence(self, card: CardEntity, seq: Any) -> web.Response | None:
        if not isinstance(seq, int) or seq <= card.sequence:
            self.errors.append(f"sequence {seq} after {card.sequence}")
            return web.json_response({"code": 300317, "msg": "sequence number compare failed"}, status=400)
        card.sequence = seq
        return None

    async def card_content(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "card_content")
        if refused is not None:
            return refused
        card = self.cards.get(request.match_info["cid"])
        if card is None:
            return web.json_response({"code": 200740, "msg": "card not found"}, status=400)
        body = await request.json()
        bad = self._sequence(card, body.get("sequence"))
        if bad is not None:
            return bad
        if not card.streaming:
            self.errors.append("content update with streaming mode off")
            return web.json_response({"code": 300309, "msg": "streaming mode is closed"}, status=400)
        if request.match_info["eid"] != card.card["body"]["elements"][0]["element_id"]:
            self.errors.append("an unknown element")
        card.contents.append(body["content"])
        return self._ok()

    async def card_settings(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "card_settings")
        if refused is not None:
            return refused
        card = self.cards.get(request.match_info["cid"])
        if card is None:
            return web.json_response({"code": 200740, "msg": "card not found"}, status=400)
        body = await request.json()
        bad = self._sequence(card, body.get("sequence"))
        if bad is not None:
            return bad
        settings = json.loads(body["settings"])
        card.settings.append(settings)
        if "streaming_mode" in settings.get("config", {}):
            card.streaming = bool(settings["config"]["streaming_mode"])
        return self._ok()

    async def card_elements(self, request: web.Request) -> web.Response:
        """Elements added to a card entity (``type: append``: at the end of its body)."""
        card = self.cards.get(request.match_info["cid"])
        if card is None:
            return web.json_response({"code": 200740, "msg": "card not found"}, status=400)
        body = await request.json()
        bad = self._sequence(card, body.get("sequence"))
        if bad is not None:
            return bad
        if body.get("type") != "append":
            self.errors.append(f"elements added with type {body.get('type')!r} (only append is faked)")
        card.card["body"]["elements"] += json.loads(body["elements"])
        return self._ok()

    async def user_get(self, request: web.Request) -> web.Response:
        refused = self._refusal(request, "user_get")
        if refused is not None:
            return refused
        uid = request.match_info["uid"]
        self.user_lookups.append(uid)
        if request.query.get("user_id_type") != "open_id":
            self.errors.append("contact lookup without user_id_type=open_id")
        return self._ok({"user": {"open_id": uid, "department_ids": self.departments.get(uid, [])}})
