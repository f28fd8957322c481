"""Local fake platform API servers (aiohttp on 127.0.0.1): the only things the tests mock,
because the real ones are outside this machine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from aiohttp import web


class FakeWeCom:
    """gettoken, message/send and user/get, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.tokens_issued = 0
        self.expire_next_sends = 0  # answer errcode 42001 to this many sends
        self.fail_next_sends: list[int] = []  # errcodes to answer, in order
        self.departments: dict[str, list[int]] = {}
        self.valid_tokens: set[str] = set()
        self.url = ""
        self.files = FileShelf()  # media_id -> bytes (media/get)

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [body for name, body in self.calls if name == "send_ok"]

    async def gettoken(self, request: web.Request) -> web.Response:
        self.calls.append(("gettoken", dict(request.query)))
        if request.query.get("corpsecret") != "app-secret-value":
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        self.tokens_issued += 1
        token = f"TOKEN{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200})

    async def send(self, request: web.Request) -> web.Response:
        body = await request.json()
        token = request.query.get("access_token", "")
        self.calls.append(("send", {"token": token, **body}))
        if self.expire_next_sends:
            self.expire_next_sends -= 1
            self.valid_tokens.discard(token)
            return web.json_response({"errcode": 42001, "errmsg": "access_token expired"})
        if token not in self.valid_tokens:
            return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
        if self.fail_next_sends:
            return web.json_response({"errcode": self.fail_next_sends.pop(0), "errmsg": "injected"})
        self.calls.append(("send_ok", body))
        return web.json_response({"errcode": 0, "errmsg": "ok", "msgid": f"m{len(self.calls)}"})

    async def user_get(self, request: web.Request) -> web.Response:
        self.calls.append(("user_get", dict(request.query)))
        uid = request.query.get("userid", "")
        return web.json_response({"errcode": 0, "errmsg": "ok", "userid": uid,
                                  "department": self.departments.get(uid, [])})

    async def media_get(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("access_token", "")
        self.calls.append(("media_get", dict(request.query)))
        if self.expire_next_sends:
            self.expire_next_sends -= 1
            self.valid_tokens.discard(token)
            return web.json_response({"errcode": 42001, "errmsg": "access_token expired"})
        if token not in self.valid_tokens:
            return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
        media_id = request.query.get("media_id", "")
        if media_id not in self.files.blobs:  # WeCom: HTTP 200 with an errcode, not the file
            return web.json_response({"errcode": 40007, "errmsg": "invalid media_id"})
        return await self.files.respond(request, media_id, filename=f"{media_id}.bin")

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/cgi-bin/gettoken", self.gettoken),
                        web.post("/cgi-bin/message/send", self.send),
                        web.get("/cgi-bin/user/get", self.user_get),
                        web.get("/cgi-bin/media/get", self.media_get)])
        return app


class FileShelf:
    """The files a fake platform serves (what users sent): streamed in chunks, without a
    Content-Length unless ``declare_length`` (so a client has to count while it reads), with
    how many bytes each download actually sent (a client that stops reading early stops it)."""

    CHUNK = 64 * 1024

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.sent: list[int] = []  # bytes written per download, in order
        self.declare_length = False

    def put(self, key: str, data: bytes) -> str:
        self.blobs[key] = data
        return key

    async def respond(self, request: web.Request, key: str, mime: str = "application/octet-stream",
                      filename: str = "") -> web.StreamResponse:
        import asyncio

        data = self.blobs.get(key)
        if data is None:
            return web.json_response({"errcode": 40007, "code": 234003, "errmsg": "invalid media_id"}, status=404)
        headers = {"Content-Type": mime}
        if filename:
            headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        resp = web.StreamResponse(headers=headers)
        if self.declare_length:
            resp.content_length = len(data)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        written = 0
        self.sent.append(0)
        slot = len(self.sent) - 1
        try:
            for i in range(0, len(data), self.CHUNK):
                await resp.write(data[i : i + self.CHUNK])
                written += len(data[i : i + self.CHUNK])
                self.sent[slot] = written
                await asyncio.sleep(0)  # let a client that has read enough go away
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return resp


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class FakeTelegram:
    """A Bot API server: getMe, getUpdates, setWebhook, deleteWebhook, sendMessage,
    editMessageText, sendChatAction, editMessageReplyMarkup, answerCallbackQuery. Records every
    call; can answer 429 or 400 on demand."""

    BOT: ClassVar[dict[str, Any]] = {"id": 999000, "is_bot": True, "first_name": "Botd", "username": "botd_test_bot",
           "can_join_groups": True, "can_read_all_group_messages": True, "supports_inline_queries": False}

    def __init__(self) -> None:
        import asyncio

        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.updates: list[dict[str, Any]] = []
        self._new_update = asyncio.Event()
        self.fail_next: dict[str, list[dict[str, Any]]] = {}
        self.messages: dict[int, dict[str, Any]] = {}
        self._next_id = 1
        self.webhook: dict[str, Any] | None = None
        # Seconds getMe takes (a slow or distant Bot API at start-up).
        self.getme_delay = 0.0
        self.files = FileShelf()  # file_id -> bytes (getFile and /file/bot<token>/<path>)
        self.file_tokens: list[str] = []  # the token each file download came with

    def push_update(self, update: dict[str, Any]) -> None:
        self.updates.append(update)
        self._new_update.set()

    def of(self, method: str) -> list[dict[str, Any]]:
        return [p for m, p, _ in self.calls if m == method]

    def answers(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m, p) for m, p, _ in self.calls if m in ("sendMessage", "editMessageText")]

    async def handle(self, request: web.Request) -> web.Response:
        import asyncio
        import json
        import time

        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = {k: v for k, v in (await request.post()).items()}
        self.calls.append((method, params, time.monotonic()))
        injected = self.fail_next.get(method)
        if injected:
            body = injected.pop(0)
            return web.json_response(body, status=body.get("error_code", 200))

        def ok(result: Any) -> web.Response:
            return web.json_response({"ok": True, "result": result})

        if method == "getMe":
            await asyncio.sleep(self.getme_delay)
            return ok(self.BOT)
        if method == "getUpdates":
            offset = int(params.get("offset") or 0)
            timeout = float(params.get("timeout") or 0)
            deadline = time.monotonic() + timeout
            while True:
                fresh = [u for u in self.updates if u["update_id"] >= offset]
                if fresh or time.monotonic() >= deadline:
                    return ok(fresh)
                self._new_update.clear()
                try:
                    await asyncio.wait_for(self._new_update.wait(), deadline - time.monotonic())
                except TimeoutError:
                    pass
        if method in ("setWebhook", "deleteWebhook"):
            self.webhook = params if method == "setWebhook" else None
            return ok(True)
        if method == "sendChatAction":
            return ok(True)
        if method == "getFile":
            fid = str(params.get("file_id", ""))
            if fid not in self.files.blobs:
                return web.json_response({"ok": False, "error_code": 400,
                                          "description": "Bad Request: invalid file_id"}, status=400)
            size = len(self.files.blobs[fid])
            if size > 20 * 1024 * 1024:  # the cloud Bot API's download limit
                return web.json_response({"ok": False, "error_code": 400,
                                          "description": "Bad Request: file is too big"}, status=400)
            return ok({"file_id": fid, "file_unique_id": "u" + fid, "file_size": size,
                       "file_path": f"documents/{fid}"})
        if method == "sendMessage":
            mid = self._next_id
            self._next_id += 1
            msg = {"message_id": mid, "date": int(time.time()), "text": params["text"],
                   "chat": {"id": int(params["chat_id"]), "type": "private"}}
            if "message_thread_id" in params:
                msg["message_thread_id"] = int(params["message_thread_id"])
            if "reply_markup" in params:  # as sent; a message carries an inline keyboard only
                msg["sent_markup"] = json.loads(params["reply_markup"])
                if "inline_keyboard" in msg["sent_markup"]:
                    msg["reply_markup"] = msg["sent_markup"]
            self.messages[mid] = msg
            return ok(msg)
        if method == "editMessageReplyMarkup":  # the buttons only; the text stays
            msg = self.messages[int(params["message_id"])]
            msg["reply_markup"] = json.loads(params.get("reply_markup") or "{}")
            return ok(msg)
        if method == "answerCallbackQuery":
            return ok(True)
        if method == "editMessageText":
            mid = int(params["message_id"])
            msg = self.messages[mid]
            if msg["text"] == params["text"]:
                return web.json_response({"ok": False, "error_code": 400, "description":
                                          "Bad Request: message is not modified: specified new message content and "
                                          "reply markup are exactly the same"}, status=400)
            msg["text"] = params["text"]
            return ok(msg)
        return web.json_response({"ok": False, "error_code": 404, "description": f"Not Found: {json.dumps(method)}"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self.handle)
        app.router.add_get("/file/bot{token}/documents/{fid}", self.file)
        return app

    async def file(self, request: web.Request) -> web.StreamResponse:
        self.file_tokens.append(request.match_info["token"])
        return await self.files.respond(request, request.match_info["fid"])


class FakeSlack:
    """Slack's Web API (auth.test, chat.postMessage, chat.update, chat.postEphemeral,
    apps.connections.open) and a Socket Mode WebSocket endpoint. Records every call;
    can answer 429 with Retry-After on demand."""

    def __init__(self) -> None:
        import asyncio

        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.fail_next: dict[str, list[tuple[int, dict[str, Any], dict[str, str]]]] = {}
        self.base = ""
        self._ts = 1700000000.000100
        self.ws: web.WebSocketResponse | None = None
        self.ws_ready = asyncio.Event()
        self.acks: list[str] = []
        self.delay_next: dict[str, float] = {}  # seconds to sleep before answering a method, once
        self.files = FileShelf()  # file id -> bytes, at /files-pri/T1-<id>/download/<name>
        self.posted: dict[str, dict[str, Any]] = {}  # ts -> {thread_ts, text}: each message as it reads now
        self.file_auth: list[str] = []  # the Authorization header each file download came with
        self.bot_token = "xoxb-test-token"

    def of(self, method: str) -> list[dict[str, Any]]:
        return [p for m, p, _ in self.calls if m == method]

    async def api(self, request: web.Request) -> web.Response:
        import json
        import time

        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        self.calls.append((method, params, time.monotonic()))
        delay = self.delay_next.pop(method, 0)
        if delay:
            import asyncio

            await asyncio.sleep(delay)
        injected = self.fail_next.get(method)
        if injected:
            status, body, headers = injected.pop(0)
            return web.json_response(body, status=status, headers=headers)
        if method == "auth.test":
            return web.json_response({"ok": True, "url": "https://t.slack.com/", "team": "T", "user": "botd",
                                      "team_id": "T1", "user_id": "UBOT", "bot_id": "BBOT"})
        if method == "chat.postMessage":
            self._ts += 1
            self.posted[f"{self._ts:.6f}"] = {"thread_ts": params.get("thread_ts"), "text": params.get("text", "")}
            return web.json_response({"ok": True, "channel": params["channel"], "ts": f"{self._ts:.6f}",
                                      "message": {"text": params.get("text", "")}})
        if method == "chat.update":
            if params.get("ts") in self.posted:
                self.posted[params["ts"]]["text"] = params.get("text", "")
                if "blocks" in params:  # Block Kit (the 👍 / 👎 buttons): JSON, or a JSON string in a form
                    blocks = params["blocks"]
                    self.posted[params["ts"]]["blocks"] = json.loads(blocks) if isinstance(blocks, str) else blocks
            return web.json_response({"ok": True, "channel": params["channel"], "ts": params["ts"],
                                      "text": params.get("text", "")})
        if method == "chat.postEphemeral":
            return web.json_response({"ok": True, "message_ts": "1.0"})
        if method == "apps.connections.open":
            return web.json_response({"ok": True, "url": self.base.replace("http://", "ws://") + "/socket"})
        return web.json_response({"ok": False, "error": "unknown_method"})

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        import json

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "connection_info": {"app_id": "A1"}}))
        self.ws_ready.set()
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "envelope_id" in data:
                    self.acks.append(data["envelope_id"])
        return ws

    async def send_envelope(self, envelope: dict[str, Any]) -> None:
        import json

        assert self.ws is not None
        await self.ws.send_str(json.dumps(envelope))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/{method}", self.api)
        app.router.add_get("/socket", self.socket)
        app.router.add_get("/files-pri/T1-{fid}/download/{name}", self.file)
        return app

    def file_url(self, fid: str, name: str) -> str:
        return f"{self.base}/files-pri/T1-{fid}/download/{name}"

    async def file(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        self.file_auth.append(auth)
        if auth != f"Bearer {self.bot_token}":
            # What Slack does: a sign-in page, not a 401.
            return web.Response(text="<html><body>Sign in to Slack</body></html>", content_type="text/html")
        return await self.files.respond(request, request.match_info["fid"])
