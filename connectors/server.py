"""botd's one HTTP server (aiohttp): shared middlewares, ``/healthz``, ``/metrics``,
and the routes every enabled connector mounts on it.

Errors always leave as JSON ``{"error": {"message", "type", "code"}}``; an unexpected
exception in a handler is logged and answered 500, it never stops the server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web

from connectors.base import Connector
from core import metrics
from core.config import Config
from core.dispatch import Dispatcher

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
    if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
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
    except Exception:
        log.exception("unhandled error", method=request.method, path=request.path)
        resp = json_error(500, "internal error; see the daemon's log for request " + rid, "internal_error")
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    if request.path not in ("/healthz", "/metrics"):
        log.debug("http", method=request.method, path=request.path, status=resp.status,
                  ms=round((time.monotonic() - t0) * 1000, 1))
    return resp


def build_app(config: Config, dispatcher: Dispatcher, connectors: Sequence[Connector]) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[request_context])

    async def healthz(_request: web.Request) -> web.Response:
        info = dispatcher.health()
        if not info["model_loaded"]:
            status = "loading"
        elif info["redis"] != "ok":
            status = "degraded"
        else:
            status = "ok"
        return web.json_response({"status": status, **info}, status=200 if info["model_loaded"] else 503)

    async def metrics_view(_request: web.Request) -> web.Response:
        body, ctype = metrics.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics_view)])
    for c in connectors:
        app.add_routes(c.routes())
    return app
