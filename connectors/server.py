"""botd's one HTTP server (aiohttp): shared middlewares, ``/healthz``, ``/metrics``,
and the routes every enabled connector mounts on it.

Errors always leave as JSON ``{"error": {"message", "type", "code"}}``; an unexpected
exception in a handler is logged and answered 500, it never stops the server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

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


def build_app(max_body_bytes: int, health: Callable[[], dict[str, Any]]) -> web.Application:
    """The server's own routes; the daemon adds each connector's."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[request_context])

    async def healthz(_request: web.Request) -> web.Response:
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
        return web.json_response({"status": status, **info}, status=200 if serving else 503)

    async def metrics_view(_request: web.Request) -> web.Response:
        body, ctype = metrics.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics_view)])
    return app
