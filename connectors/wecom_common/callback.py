"""The HTTP side of WeCom's callbacks that the self-built app and the AI bot share: the signed
query, the URL verification (GET with ``echostr``) and opening an encrypted body — its
signature checked before anything is decrypted. Each answers a bad request with the HTTP
error WeCom's console shows; the envelopes differ (XML for the app, JSON for the AI bot), so
each connector reads its own and hands the ``Encrypt`` text here.

A signature proves who sent a callback, not when: a captured callback stays correctly
signed forever. So the signed ``timestamp`` (and the message's own creation time) must lie
within ``timestamp_window_s`` of this machine's clock, checked before anything else is done.
"""

from __future__ import annotations

import time
from urllib.parse import unquote

import structlog
from aiohttp import web

from connectors.wecom_common.crypto import WeComCrypto, WeComCryptoError

log = structlog.get_logger("botd.wecom")


def raw_query(query_string: str) -> dict[str, str]:
    """Query parameters with '%xx' decoded but '+' kept: WeCom's base64 echostr holds raw '+'."""
    out: dict[str, str] = {}
    for pair in query_string.split("&"):
        if pair:
            k, _, v = pair.partition("=")
            out[unquote(k)] = unquote(v)
    return out


def signed_query(request: web.Request, *also: str) -> dict[str, str]:
    """The callback's query, with its signature parameters (and ``also``) present, or a 400."""
    q = raw_query(request.rel_url.raw_query_string)
    missing = [k for k in ("msg_signature", "timestamp", "nonce", *also) if not q.get(k)]
    if missing:
        raise web.HTTPBadRequest(text=f"missing query parameter(s): {', '.join(missing)}")
    return q


def check_fresh(stamp: object, window_s: float, *, what: str, bot: str, field: str = "timestamp") -> None:
    """A 403 unless ``stamp`` (Unix seconds) is within ``window_s`` of now: a replayed callback
    (or one stamped in the future) is refused before it is decrypted or answered."""
    try:
        ts = int(str(stamp).strip())
    except ValueError:
        raise web.HTTPBadRequest(text=f"{field} is not a number") from None
    skew = time.time() - ts
    if abs(skew) > window_s:
        log.warning(f"{what} callback refused: {field} outside the accepted window (a replay?)", bot=bot,
                    skew_s=round(skew), window_s=window_s)
        raise web.HTTPForbidden(text=f"{field} is too old or in the future")


def verify_url(request: web.Request, crypto: WeComCrypto, *, what: str, bot: str,
               window_s: float | None = None) -> web.Response:
    """WeCom's URL check: a signed ``echostr`` whose plain text is the answer (within the
    timestamp window, so that a captured callback cannot be replayed here to be decrypted)."""
    q = signed_query(request, "echostr")
    if window_s is not None:
        check_fresh(q["timestamp"], window_s, what=what, bot=bot)
    if not crypto.check_signature(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"]):
        log.warning(f"{what} url verification: bad signature", bot=bot)
        raise web.HTTPForbidden(text="bad msg_signature")
    try:
        plain = crypto.decrypt(q["echostr"])
    except WeComCryptoError as exc:
        raise web.HTTPBadRequest(text=f"echostr: {exc}") from None
    log.info(f"{what} url verified", bot=bot)
    return web.Response(text=plain, content_type="text/plain")


def open_body(q: dict[str, str], encrypt: str, crypto: WeComCrypto, *, what: str, bot: str) -> str:
    """The plain text of a callback's ``encrypt``: its signature first (403), then decrypted (400)."""
    if not crypto.check_signature(q["msg_signature"], q["timestamp"], q["nonce"], encrypt):
        log.warning(f"{what} callback: bad signature", bot=bot)
        raise web.HTTPForbidden(text="bad msg_signature")
    try:
        return crypto.decrypt(encrypt)
    except WeComCryptoError as exc:
        log.warning(f"{what} callback rejected", bot=bot, reason=str(exc))
        raise web.HTTPBadRequest(text=str(exc)) from None
