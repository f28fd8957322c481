"""botd's one HTTP server (aiohttp): shared middlewares, ``/healthz``, ``/metrics``,
and the routes every enabled connector mounts on it.

Bounds aiohttp does not set itself (:class:`GuardedRunner`): a request's head and body must
arrive within ``[server] request_read_timeout_s`` of its first byte, or the connection is
closed (slow or half-sent requests would otherwise hold sockets forever); at most
``[server] max_connections`` connections are open, more are answered 503 and closed.

``/healthz`` and ``/metrics`` show their details (knowledge bases, engines, Redis errors)
only to a caller the ``details`` check admits; others see the status alone.

Errors always leave as JSON ``{"error": {"message", "type", "code"}}``; an unexpected
exception in a handler is logged and answered 500, it never stops the server.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from core import metrics

log = structlog.get_logger("botd.http")

REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    elif status in (429, 503):
        kind = "rate_limit_error" if status == 429 else "overloaded_error"
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: json.dumps(o, ensure_ascii=False))


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    # ASCII only: the id is echoed in a header and logged; str.isalnum() also passes "²" or "é".
    if not (0 < len(rid) <= 64 and rid.isascii() and rid.replace("-", "").isalnum()):
        rid = uuid.uuid4().hex[:16]
    request[REQUEST_ID] = rid
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=rid)
    t0 = time.monotonic()
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        resp = json_error(exc.status, reason or "error", exc.reason.lower().replace(" ", "_"))
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and _client_gone(request):
            # The client hung up while a streaming handler wrote to it: nobody is left to answer
            # and nothing failed here. (A reset on an outbound connection still counts as an error.)
            log.info("client went away", method=request.method, path=request.path)
            return web.Response(status=499, reason="Client Closed Request")
        log.exception("unhandled error", method=request.method, path=request.path)
        resp = json_error(500, "internal error; see the daemon's log for request " + rid, "internal_error")
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    if request.path not in ("/healthz", "/metrics"):
        log.debug("http", method=request.method, path=request.path, status=resp.status,
                  ms=round((time.monotonic() - t0) * 1000, 1))
    return resp


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _everyone(_request: web.Request) -> bool:
    return True


def build_app(max_body_bytes: int, health: Callable[[], dict[str, Any]],
              details: Callable[[web.Request], Awaitable[bool]] = _everyone) -> web.Application:
    """The server's own routes; the daemon adds each connector's. ``details`` says whether a
    request may see /healthz in full and /metrics at all."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[request_context])

    async def healthz(request: web.Request) -> web.Response:
        info = health()
        serving = info["model_loaded"] and info.get("ready", True)
        if not info["model_loaded"]:
            status = "loading"
        elif not info.get("ready", True):
            status = "starting"
        elif info["redis"] != "ok":
            status = "degraded"
        elif any(s in ("loading", "building") for s in info.get("knowledge", {}).values()):
            # Answers work; knowledge bots wait for their bases meanwhile.
            status = "loading_knowledge"
        else:
            status = "ok"
        code = 200 if serving else 503
        if not await details(request):
            # The status alone: no knowledge base names, no Redis error text, no engine figures.
            return web.json_response({"status": status}, status=code)
        return web.json_response({"status": status, **info}, status=code)

    async def metrics_view(request: web.Request) -> web.Response:
        if not await details(request):
            return json_error(401, "/metrics needs an API key or token (Authorization: Bearer ...), "
                              "or [server] health_details = \"public\"", "invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
        body, ctype = metrics.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics_view)])
    return app


# -- connection bounds ----------------------------------------------------------------------------

_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_FULL_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, watched: when its current request began to
    arrive, and which request its handler is answering. Only asyncio's Protocol calls are
    passed through, so nothing of aiohttp's internals is relied on."""

    def __init__(self, guard: ConnectionGuard, inner: RequestHandler) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.started: float | None = None  # the first byte of a request not yet read whole
        self.request: web.BaseRequest | None = None  # the request its handler is answering

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.guard.open) >= self.guard.max_connections:
            log.warning("connection refused: too many open connections", limit=self.guard.max_connections)
            self.transport.write(_FULL_503)
            self.transport.close()
            return
        self.guard.open[self.inner] = self
        self.started = time.monotonic()  # a connection that never sends a byte counts too
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.started is None and self.request is None:
            self.started = time.monotonic()
        self.inner.data_received(data)

    def eof_received(self) -> None:
        if self.inner in self.guard.open:
            self.inner.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.guard.open.pop(self.inner, None) is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def overdue(self, now: float) -> bool:
        """Whether the request being read has taken longer than the deadline to arrive."""
        if self.started is None or now - self.started <= self.guard.read_timeout_s:
            return False
        if self.request is not None and self.request.content.is_eof():
            self.started = None  # read whole: being answered, which may take as long as it takes
            return False
        return True


class ConnectionGuard:
    """The read deadline and the connection cap, for one server."""

    def __init__(self, read_timeout_s: float, max_connections: int) -> None:
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.open: dict[RequestHandler, _Guarded] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def factory(self, inner: Callable[[], RequestHandler]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self.open.get(cast(RequestHandler, request.protocol))
        if conn is not None:
            conn.request = request
        try:
            return await handler(request)
        finally:
            if conn is not None and conn.request is request:
                conn.request, conn.started = None, None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="botd-http-deadlines")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep(self) -> None:
        interval = min(1.0, self.read_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            late = [c for c in list(self.open.values()) if c.overdue(now)]
            for conn in late:
                assert conn.transport is not None
                if conn.request is None:  # the head is incomplete: nobody is answering yet
                    conn.transport.write(_TIMEOUT_408)
                conn.transport.close()
            if late:
                log.info("closed connections whose request did not arrive in time", count=len(late),
                         timeout_s=self.read_timeout_s)


class GuardedRunner(web.AppRunner):
    """aiohttp's AppRunner whose listening sockets hand each connection to a :class:`ConnectionGuard`."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        app.middlewares.insert(0, guard.middleware)
        super().__init__(app, **kwargs)
        self.guard = guard

    @property
    def server(self) -> Any:  # what a site passes to loop.create_server: a protocol factory
        inner = super().server
        return None if inner is None else self.guard.factory(inner)

    async def setup(self) -> None:
        await super().setup()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < self.guard.max_connections + 256:
            # Past the limit accept() fails for everyone, webhooks included; the cap must come first.
            log.warning("the open-file limit is below [server] max_connections plus the daemon's own files: "
                        "raise LimitNOFILE in the unit or lower max_connections",
                        limit=soft, max_connections=self.guard.max_connections)
        self.guard.start()

    async def cleanup(self) -> None:
        await self.guard.stop()
        await super().cleanup()
