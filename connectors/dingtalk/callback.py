"""DingTalk's HTTP callback mode: the ``timestamp`` and ``sign`` headers checked before the body
is read (docs/protocols/dingtalk.md).

``sign`` = base64(HMAC-SHA256(key = the app secret, message = timestamp + "\\n" + the app
secret)); a timestamp (ms) further than the window from the clock is refused as a replay.
The comparison takes constant time. Nothing of a refused request is parsed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("botd.dingtalk")

MAX_BODY = 256 * 1024


def sign(timestamp: str, secret: str) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def check_signature(timestamp: str, signature: str, secret: str, window_s: int, now_ms: float | None = None) -> str:
    """What is wrong with the headers ("" when nothing is)."""
    if not timestamp.isdigit() or not signature:
        return "missing or malformed timestamp/sign headers"
    now = time.time() * 1000 if now_ms is None else now_ms
    if abs(now - int(timestamp)) > window_s * 1000:
        return "timestamp outside the window (a replay?)"
    if not hmac.compare_digest(sign(timestamp, secret).encode(), signature.encode()):
        return "wrong signature"
    return ""


async def read_callback(request: web.Request, secret: str, window_s: int, robot: str) -> dict[str, Any]:
    """The robot message of a signed callback; a bad signature is refused before the body is read."""
    problem = check_signature(request.headers.get("timestamp", ""), request.headers.get("sign", ""), secret,
                              window_s)
    if problem:
        log.warning("dingtalk callback refused", robot=robot, reason=problem, peer=request.remote)
        raise web.HTTPForbidden(text=problem)
    if (request.content_length or 0) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length or 0)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(raw))
    try:
        data = json.loads(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body is not a JSON object")
    return data
