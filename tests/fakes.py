"""Local fake platform API servers (aiohttp on 127.0.0.1): the only things the tests mock,
because the real ones are outside this machine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

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

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/cgi-bin/gettoken", self.gettoken),
                        web.post("/cgi-bin/message/send", self.send),
                        web.get("/cgi-bin/user/get", self.user_get)])
        return app


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
