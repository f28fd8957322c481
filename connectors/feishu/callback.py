"""Feishu / Lark event callbacks (将事件发送至开发者服务器): checked, then decrypted
(docs/protocols/feishu.md).

Order, so that nothing of a forged request is decrypted or parsed: the size; the
``X-Lark-Request-Timestamp`` within the window; ``X-Lark-Signature`` = hex(SHA-256(timestamp +
nonce + encrypt key + the raw body)), compared in constant time; only then the body is
decrypted (``{"encrypt": base64(IV + AES-256-CBC(key = SHA-256(encrypt key), PKCS#7))}``) and
its verification token checked. The one request Feishu does not sign is the URL check
(``url_verification``): an unsigned request is decrypted and answered only if it is that, with
the right token.
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
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = structlog.get_logger("botd.feishu")

MAX_BODY = 512 * 1024


class CallbackRefused(Exception):
    """Why a callback is refused (its text is safe to log)."""


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    return hashlib.sha256(timestamp.encode() + nonce.encode() + encrypt_key.encode() + body).hexdigest()


def decrypt(encrypt: str, encrypt_key: str) -> bytes:
    try:
        raw = base64.b64decode(encrypt, validate=True)
    except (ValueError, TypeError):
        raise CallbackRefused("the encrypt field is not base64") from None
    if len(raw) < 32 or len(raw) % 16:
        raise CallbackRefused("the encrypt field has a wrong length")
    key = hashlib.sha256(encrypt_key.encode()).digest()
    dec = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
    padded = dec.update(raw[16:]) + dec.finalize()
    unpad = padding.PKCS7(128).unpadder()
    try:
        return unpad.update(padded) + unpad.finalize()
    except ValueError:
        raise CallbackRefused("the encrypt field does not decrypt with this Encrypt Key") from None


def encrypt(plain: bytes, encrypt_key: str, iv: bytes) -> str:
    """The inverse of :func:`decrypt` (for tests and tools)."""
    key = hashlib.sha256(encrypt_key.encode()).digest()
    pad = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + enc.update(pad.update(plain) + pad.finalize()) + enc.finalize()).decode()


def open_callback(headers: Any, body: bytes, encrypt_key: str, token: str, window_s: int,
                  now: float | None = None) -> dict[str, Any]:
    """The event (or URL check) of one callback; raises :class:`CallbackRefused`."""
    ts = str(headers.get("X-Lark-Request-Timestamp", ""))
    nonce = str(headers.get("X-Lark-Request-Nonce", ""))
    sig = str(headers.get("X-Lark-Signature", ""))
    signed = bool(sig)
    if signed:
        if not ts.isdigit():
            raise CallbackRefused("malformed timestamp")
        if abs((time.time() if now is None else now) - int(ts)) > window_s:
            raise CallbackRefused("timestamp outside the window (a replay?)")
        if not hmac.compare_digest(signature(ts, nonce, encrypt_key, body).encode(), sig.encode()):
            raise CallbackRefused("wrong signature")
    try:
        envelope = json.loads(body)
    except ValueError:
        raise CallbackRefused("the body is not JSON") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("encrypt"), str):
        raise CallbackRefused("the body is not encrypted (set the same Encrypt Key in botd and on Feishu)")
    try:
        event = json.loads(decrypt(envelope["encrypt"], encrypt_key))
    except ValueError:
        raise CallbackRefused("the decrypted body is not JSON") from None
    if not isinstance(event, dict):
        raise CallbackRefused("the decrypted body is not a JSON object")
    is_check = event.get("type") == "url_verification"
    got = event.get("token") if is_check else (event.get("header") or {}).get("token")
    if not hmac.compare_digest(str(got or "").encode(), token.encode()):
        raise CallbackRefused("wrong verification token")
    if not signed and not is_check:
        raise CallbackRefused("unsigned event")
    return event


async def read_body(request: web.Request) -> bytes:
    if (request.content_length or 0) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length or 0)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(raw))
    return raw
