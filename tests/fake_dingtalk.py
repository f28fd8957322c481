"""DingTalk's side of an enterprise internal app's robot, on 127.0.0.1, written from the published
protocol (docs/protocols/dingtalk.md, each fact with its source):

* the OpenAPI: ``POST /v1.0/oauth2/accessToken`` (new) and ``GET /gettoken`` (old) tokens,
  tokens checked on every call (``x-acs-dingtalk-access-token`` / ``?access_token=``; a bad one
  answers HTTP 400 ``InvalidAuthentication`` / errcode 40014), robot sends
  (``oToMessages/batchSend``, ``groupMessages/send``), AI cards (``createAndDeliver``,
  ``PUT /v1.0/card/streaming``, ``PUT /v1.0/card/instances``), the contact API
  (``/topapi/v2/user/get``), and sessionWebhooks (``/robot/sendBySession``);
* Stream mode: ``POST /v1.0/gateway/connections/open`` -> ``{endpoint, ticket}`` (a ticket opens
  one connection), the WebSocket gateway pushing robot messages
  (``CALLBACK /v1.0/im/bot/messages/get``), ``SYSTEM ping`` (expects the ``opaque`` echoed) and
  ``SYSTEM disconnect`` frames, and recording every ACK.

It enforces what DingTalk enforces as errors a test can see (:attr:`FakeDingtalk.errors`):
unknown or reused tickets, card updates of unknown cards or after finalising, a card's
content shrinking... Throttling is injected by the test (:meth:`FakeDingtalk.throttle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ROBOT_TOPIC = "/v1.0/im/bot/messages/get"
QPS_LIMIT = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"


@dataclass
class Card:
    out_track_id: str
    template: str
    open_space_id: str
    params: dict[str, str]
    contents: list[str] = field(default_factory=list)
    finalised: bool = False
    created_at: float = field(default_factory=time.monotonic)

    @property
    def content(self) -> str:
        return self.contents[-1] if self.contents else ""


class FakeDingtalk:
    def __init__(self, client_id: str = "dingtestapp", secret: str = "dingtalk-app-secret", *,
                 token_life_s: int = 7200, ping_every_s: float = 0.0, marker: str = "") -> None:
        self.client_id = client_id
        self.marker = marker  # put into every token, ticket and sessionWebhook (a log test looks for it)
        self.secret = secret
        self.token_life_s = token_life_s
        self.ping_every_s = ping_every_s
        self.url = ""
        self.tokens: dict[str, float] = {}  # token -> expiry (time.time())
        self.issued: list[str] = []  # every token ever given
        self.token_requests = 0
        self.tickets: dict[str, bool] = {}  # ticket -> used
        self.opens: list[dict[str, Any]] = []
        self.conns: list[web.WebSocketResponse] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self.pongs: list[Any] = []
        self.cards: dict[str, Card] = {}
        self.card_calls: list[tuple[str, float]] = []
        self.webhook_posts: list[dict[str, Any]] = []
        self.sends: list[dict[str, Any]] = []
        self.user_lookups: list[str] = []
        self.departments: dict[str, list[int]] = {}
        self.errors: list[str] = []
        self.throttled: dict[str, int] = {}  # path -> how many calls still answer 403 QPS
        self.throttle_hits: list[tuple[str, float]] = []
        self.cards_forbidden = False
        self._pinger: asyncio.Task[None] | None = None
        from tests.fakes import FileShelf

        self.files = FileShelf()  # downloadCode -> bytes (messageFiles/download, then /oss/<code>)
        self.file_codes: list[dict[str, Any]] = []  # every messageFiles/download body

    # -- the app ----------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1.0/oauth2/accessToken", self.access_token)
        app.router.add_get("/gettoken", self.gettoken)
        app.router.add_post("/v1.0/gateway/connections/open", self.open_connection)
        app.router.add_get("/connect", self.gateway)
        app.router.add_post("/robot/sendBySession", self.session_webhook)
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self.batch_send)
        app.router.add_post("/v1.0/robot/groupMessages/send", self.group_send)
        app.router.add_post("/v1.0/card/instances/createAndDeliver", self.card_create)
        app.router.add_put("/v1.0/card/streaming", self.card_streaming)
        app.router.add_put("/v1.0/card/instances", self.card_update)
        app.router.add_post("/topapi/v2/user/get", self.user_get)
        app.router.add_post("/v1.0/robot/messageFiles/download", self.message_file)
        app.router.add_get("/oss/{code}", self.oss)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        for ws in list(self.conns):
            await ws.close()

    @property
    def ws_base(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    # -- tokens -----------------------------------------------------------------------------------------

    def _new_token(self) -> str:
        self.token_requests += 1
        token = f"tok-{self.marker}{uuid.uuid4().hex}"
        self.tokens[token] = time.time() + self.token_life_s
        self.issued.append(token)
        return token

    def expire_tokens(self) -> None:
        """Every token given so far stops working (as if DingTalk rotated them early)."""
        self.tokens.clear()

    def _valid(self, token: str) -> bool:
        return token in self.tokens and time.time() < self.tokens[token]

    async def access_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("appKey") != self.client_id or body.get("appSecret") != self.secret:
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "无效的clientId或者clientSecret",
                                       "requestid": "r"}, status=400)
        return web.json_response({"accessToken": self._new_token(), "expireIn": self.token_life_s})

    async def gettoken(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("appkey") != self.client_id or q.get("appsecret") != self.secret:
            return web.json_response({"errcode": 40089, "errmsg": "不合法的corpid或corpsecret"})
        return web.json_response({"errcode": 0, "errmsg": "ok", "access_token": self._new_token(),
                                  "expires_in": self.token_life_s})

    def _new_api_refusal(self, request: web.Request, path: str) -> web.Response | None:
        if not self._valid(request.headers.get("x-acs-dingtalk-access-token", "")):
            return web.json_response({"code": "InvalidAuthentication", "message": "不合法的access_token",
                                      "requestid": "r"}, status=400)
        if self.throttled.get(path, 0) > 0:
            self.throttled[path] -= 1
            self.throttle_hits.append((path, time.monotonic()))
            return web.json_response({"code": QPS_LIMIT, "message": "请求被流控", "requestid": "r"}, status=403)
        return None

    def throttle(self, path: str, times: int) -> None:
        """The next ``times`` calls of ``path`` answer DingTalk's per-app QPS limit (HTTP 403)."""
        self.throttled[path] = times

    # -- Stream mode ------------------------------------------------------------------------------------

    async def open_connection(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clientId") != self.client_id or body.get("clientSecret") != self.secret:
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "clientId or secret wrong"},
                                     status=400)
        self.opens.append(body)
        ticket = f"{self.marker}{uuid.uuid4().hex}"
        self.tickets[ticket] = False
        return web.json_response({"endpoint": f"{self.ws_base}/connect", "ticket": ticket})

    async def gateway(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self.tickets or self.tickets[ticket]:
            self.errors.append(f"connect with an unknown or used ticket {ticket!r}")
            raise web.HTTPForbidden(text="ticket invalid")
        self.tickets[ticket] = True
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.conns.append(ws)
        if self.ping_every_s and self._pinger is None:
            self._pinger = asyncio.create_task(self._ping_loop())
        try:
            async for msg in ws:
                if msg.type != web.WSMsgType.TEXT:
                    continue
                ack = json.loads(msg.data)
                mid = str((ack.get("headers") or {}).get("messageId", ""))
                if ack.get("code") != 200:
                    self.errors.append(f"ack with code {ack.get('code')}")
                data = json.loads(ack.get("data") or "null")
                if mid.startswith("ping-"):
                    self.pongs.append((data or {}).get("opaque"))
                else:
                    self.acks[mid] = ack
        finally:
            with contextlib.suppress(ValueError):
                self.conns.remove(ws)
        return ws

    def connected(self) -> int:
        return sum(not ws.closed for ws in self.conns)

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        live = [ws for ws in self.conns if not ws.closed]
        if not live:
            raise AssertionError("no stream connection to push to")
        await live[0].send_str(json.dumps(frame, ensure_ascii=False))

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_every_s)
            with contextlib.suppress(Exception):
                await self.ping()

    async def ping(self) -> str:
        opaque = uuid.uuid4().hex
        await self._send_frame({"specVersion": "1.0", "type": "SYSTEM", "headers": {
            "contentType": "application/json", "messageId": f"ping-{opaque}", "time": str(int(time.time() * 1000)),
            "topic": "ping"}, "data": json.dumps({"opaque": opaque})})
        return opaque

    async def disconnect(self, close_after_s: float = 0.5) -> None:
        """Tell the live connections the gateway goes away (DingTalk closes them 10 s later)."""
        told = [w for w in self.conns if not w.closed]
        for ws in told:
            await ws.send_str(json.dumps({"specVersion": "1.0", "type": "SYSTEM", "headers": {
                "contentType": "application/json", "messageId": uuid.uuid4().hex, "topic": "disconnect"},
                "data": json.dumps({"reason": "gateway restarting"})}))
        await asyncio.sleep(close_after_s)
        for ws in told:
            await ws.close()

    async def drop_connections(self) -> None:
        """The network drops: every connection closes without a word."""
        for ws in list(self.conns):
            await ws.close(code=1006)

    def robot_message(self, user: str, text: str, *, msg_id: str = "", group: str = "", at: bool = True,
                      msgtype: str = "text", webhook_life_s: float = 5400,
                      content: dict[str, Any] | None = None) -> dict[str, Any]:
        now = int(time.time() * 1000)
        data: dict[str, Any] = {
            "conversationId": group or f"cid-{user}", "conversationType": "2" if group else "1",
            "msgId": msg_id or f"msg{uuid.uuid4().hex}", "msgtype": msgtype, "createAt": now,
            "senderId": f"$:LWCP_v1:${user}", "senderNick": user, "senderStaffId": user, "senderCorpId": "corp1",
            "chatbotUserId": "$:LWCP_v1:$bot", "chatbotCorpId": "corp1", "robotCode": self.client_id,
            "isAdmin": False,
            "sessionWebhook": f"{self.url}/robot/sendBySession?session={self.marker}{uuid.uuid4().hex}",
            "sessionWebhookExpiredTime": now + int(webhook_life_s * 1000)}
        if msgtype == "text":
            # In a group DingTalk removes the @robot from the text, which then begins with a space.
            data["text"] = {"content": f" {text}" if group else text}
        elif msgtype == "picture":
            data["content"] = {"downloadCode": "dc-1", "pictureDownloadCode": "pdc-1"}
        if content is not None:
            data["content"] = content
        if group:
            data["conversationTitle"] = "测试群"
            data["isInAtList"] = at
            data["atUsers"] = [{"dingtalkId": "$:LWCP_v1:$bot"}] if at else []
        return data

    async def push(self, data: dict[str, Any]) -> str:
        """Push a robot message over the stream; returns the frame's messageId (its ACK is in :attr:`acks`)."""
        mid = uuid.uuid4().hex
        await self._send_frame({"specVersion": "1.0", "type": "CALLBACK", "headers": {
            "appId": self.client_id, "contentType": "application/json", "messageId": mid,
            "time": str(int(time.time() * 1000)), "topic": ROBOT_TOPIC}, "data": json.dumps(data, ensure_ascii=False)})
        return mid

    async def press(self, out_track_id: str, user: str, action_id: str, mid: str = "") -> str:
        """A user presses a card's button (a 回传请求 button with ``action_id``): a card callback over
        the stream; returns the frame's messageId (the same ``mid`` again: DingTalk pushing it again)."""
        mid = mid or uuid.uuid4().hex
        data = {"outTrackId": out_track_id, "userId": user, "corpId": "ding-corp", "type": "actionCallback",
                "content": json.dumps({"cardPrivateData": {"actionIds": [action_id], "params": {}}})}
        await self._send_frame({"specVersion": "1.0", "type": "CALLBACK", "headers": {
            "appId": self.client_id, "contentType": "application/json", "messageId": mid,
            "time": str(int(time.time() * 1000)), "topic": "/v1.0/card/instances/callback"},
            "data": json.dumps(data, ensure_ascii=False)})
        return mid

    # -- what users send ------------------------------------------------------------------------------------

    async def message_file(self, request: web.Request) -> web.Response:
        refused = self._new_api_refusal(request, request.path)
        if refused is not None:
            return refused
        body = await request.json()
        self.file_codes.append(body)
        code = str(body.get("downloadCode", ""))
        if body.get("robotCode") != self.client_id or code not in self.files.blobs:
            return web.json_response({"code": "invalidParameter", "message": "downloadCode 无效", "requestid": "r"},
                                     status=400)
        return web.json_response({"downloadUrl": f"{self.url}/oss/{code}?Expires=9&Signature=s{self.marker}"})

    async def oss(self, request: web.Request) -> web.StreamResponse:
        return await self.files.respond(request, request.match_info["code"])

    # -- replies ------------------------------------------------------------------------------------------

    async def session_webhook(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.webhook_posts.append(body)
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def batch_send(self, request: web.Request) -> web.Response:
        refused = self._new_api_refusal(request, request.path)
        if refused is not None:
            return refused
        body = await request.json()
        self.sends.append({"kind": "1to1", **body, "param": json.loads(body["msgParam"])})
        return web.json_response({"processQueryKey": uuid.uuid4().hex, "invalidStaffIdList": [],
                                  "flowControlledStaffIdList": []})

    async def group_send(self, request: web.Request) -> web.Response:
        refused = self._new_api_refusal(request, request.path)
        if refused is not None:
            return refused
        body = await request.json()
        self.sends.append({"kind": "group", **body, "param": json.loads(body["msgParam"])})
        return web.json_response({"processQueryKey": uuid.uuid4().hex})

    async def card_create(self, request: web.Request) -> web.Response:
        refused = self._new_api_refusal(request, request.path)
        if refused is not None:
            return refused
        if self.cards_forbidden:  # the app lacks the card permissions
            return web.json_response({"code": "Forbidden.AccessDenied.AccessTokenPermissionDenied",
                                      "message": "没有调用该接口的权限", "requestid": "r"}, status=403)
        body = await request.json()
        oid = body["outTrackId"]
        if oid in self.cards:
            self.errors.append(f"card {oid} created twice")
        params = dict(body["cardData"]["cardParamMap"])
        if not all(isinstance(v, str) for v in params.values()):
            self.errors.append("cardParamMap values must be strings")
        self.cards[oid] = Card(oid, body["cardTemplateId"], body["openSpaceId"], params)
        self.card_calls.append(("create", time.monotonic()))
        return web.json_response({"success": True, "result": {"outTrackId": oid}})

    async def card_streaming(self, request: web.Request) -> web.Response:
        refused = self._new_api_refusal(request, request.path)
        if refused is not None:
            return refused
        body = await request.json()
        card = self.cards.get(body.get("outTrackId", ""))
        if card is None:
            self.errors.append("streaming update of an unknown card")
            return web.json_response({"code": "param.error", "message": "card not found"}, status=400)
        if card.finalised:
            self.errors.append("streaming update after finalising")
        if not body.get("isFull"):
            self.errors.append("botd streams whole texts (isFull)")
        card.contents.append(body["content"])
        card.finalised = card.finalised or bool(body.get("isFinalize"))
        self.card_calls.append(("stream", time.monotonic()))
        return web.json_response({"success": True, "result": True})

    async def card_update(self, request: web.Request) -> web.Response:
        refused = self._new_api_refusal(request, request.path)
        if refused is not None:
            return refused
        body = await request.json()
        card = self.cards.get(body.get("outTrackId", ""))
        if card is None:
            self.errors.append("update of an unknown card")
            return web.json_response({"code": "param.error", "message": "card not found"}, status=400)
        card.params.update(body["cardData"]["cardParamMap"])
        self.card_calls.append(("update", time.monotonic()))
        return web.json_response({"success": True, "result": True})

    # -- contacts -------------------------------------------------------------------------------------

    async def user_get(self, request: web.Request) -> web.Response:
        if not self._valid(request.query.get("access_token", "")):
            return web.json_response({"errcode": 40014, "errmsg": "不合法的access_token"})
        body = await request.json()
        user = body.get("userid", "")
        self.user_lookups.append(user)
        if user not in self.departments:
            return web.json_response({"errcode": 60121, "errmsg": "找不到该用户"})
        return web.json_response({"errcode": 0, "errmsg": "ok", "result": {
            "userid": user, "name": user, "dept_id_list": self.departments[user]}})
