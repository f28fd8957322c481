"""The HTTP side of WeCom's callbacks that the self-built app and the AI bot share: the signed
query, the URL verification (GET with ``echostr``) and opening an encrypted body — its
signature checked before anything is decrypted. Each answers a bad request with the HTTP
error WeCom's console shows; the envelopes differ (XML for the app, JSON for the AI bot), so
each connector reads its own and hands the ``Encrypt`` text here.
"""

from __future__ import annotations

from urllib.parse import unquote

import structlog
from aiohttp import web

from connectors.wecom.crypto import WeComCrypto, WeComCryptoError

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


def verify_url(request: web.Request, crypto: WeComCrypto, *, what: str, bot: str) -> web.Response:
    """WeCom's URL check: a signed ``echostr`` whose plain text is the answer."""
    q = signed_query(request, "echostr")
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
