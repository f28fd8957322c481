"""WeCom (企业微信) connector: a self-built app (自建应用) in callback mode.

``GET /wecom/<bot>`` answers WeCom's URL verification; ``POST /wecom/<bot>`` receives
encrypted messages. Each callback is checked (signature first, then decryption and
the corp id), deduplicated on MsgId in Redis, and answered with an empty 200 at once:
WeCom retries a callback that is not answered within 5 s. The work happens afterwards
and the reply goes out through the app message API (``message/send``), split to
WeCom's 2048-byte limit on character boundaries. XML is parsed with defusedxml.

The callback crypto (WXBizMsgCrypt): ``msg_signature = sha1(sorted(token, timestamp,
nonce, encrypt))``; ``key = b64decode(EncodingAESKey + "=")`` (32 bytes), ``iv =
key[:16]``, AES-256-CBC with PKCS#7 padding to 32-byte blocks; plaintext = 16 random
bytes + uint32 big-endian length + message + receive id (the CorpID). AES and the
padding come from the ``cryptography`` package; this module only frames the bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import unquote

import aiohttp
import structlog
from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from connectors.base import Connector
from connectors.texts import BUSY, FAILED
from core.config import Config, WecomConfig
from core.dispatch import Busy, Dispatcher, Interrupted, Rejected
from core.kv import KeyValueCache
from core.messages import Finish, InboundMessage
from core.redis_store import StoreUnavailable
from core.secrets import remember_secret, resolve_secret
from core.textsplit import split_text, utf8_len

log = structlog.get_logger("botd.wecom")

PLATFORM = "wecom"


# -- callback crypto ---------------------------------------------------------------------------

_BLOCK_BITS = 32 * 8  # WeCom pads to 32-byte blocks, not AES's 16


class WeComCryptoError(ValueError):
    """A callback payload that does not decrypt to a well-formed message for this app."""


class WeComCrypto:
    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        try:
            key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("EncodingAESKey is not base64") from None
        if len(key) != 32:
            raise ValueError("EncodingAESKey must decode to 32 bytes (43 characters)")
        self._token = token
        self._key = key
        self._iv = key[:16]
        self.receive_id = receive_id

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        parts = sorted([self._token, timestamp, nonce, encrypt])
        return hashlib.sha1("".join(parts).encode("utf-8")).hexdigest()

    def check_signature(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> bool:
        expected = self.signature(timestamp, nonce, encrypt)
        return hmac.compare_digest(expected.encode(), msg_signature.strip().lower().encode())

    def decrypt(self, encrypt: str) -> str:
        try:
            data = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError):
            raise WeComCryptoError("Encrypt is not valid base64") from None
        if not data or len(data) % 16:
            raise WeComCryptoError("ciphertext length is not a multiple of the AES block")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(_BLOCK_BITS).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise WeComCryptoError("bad padding (wrong key or tampered ciphertext)") from None
        if len(plain) < 20:
            raise WeComCryptoError("plaintext too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise WeComCryptoError("message length runs past the plaintext")
        message, receive_id = plain[20 : 20 + length], plain[20 + length :]
        if not hmac.compare_digest(receive_id, self.receive_id.encode()):
            raise WeComCryptoError("the receive id is not this app's corp id")
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError:
            raise WeComCryptoError("message is not UTF-8") from None

    def encrypt(self, message: str) -> str:
        body = message.encode("utf-8")
        plain = os.urandom(16) + struct.pack(">I", len(body)) + body + self.receive_id.encode()
        padder = padding.PKCS7(_BLOCK_BITS).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).encryptor()
        return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


# -- the reply API ---------------------------------------------------------------------------

# errcode -> meaning, for the log (WeCom's global error codes, the ones seen in practice).
ERRCODES: dict[int, str] = {
    -1: "system busy, retry later",
    40001: "invalid secret (check the app's Secret)",
    40013: "invalid corp id",
    40014: "invalid access_token",
    40056: "invalid agent id",
    40082: "invalid suite token",
    41001: "access_token missing",
    42001: "access_token expired",
    44004: "empty text content",
    45009: "API call frequency limit reached",
    45033: "too many concurrent API calls",
    48002: "API forbidden for this app",
    60011: "no permission for this user/department (app visibility)",
    60020: "server IP is not in the app's trusted IP list (企业可信IP)",
    81013: "user, department and tag are all invalid or out of the app's visibility",
    301002: "no permission to operate on this user",
}
_TOKEN_ERRORS = {40014, 41001, 42001}
_RETRYABLE = {-1, 45009, 45033}


def errcode_meaning(code: int) -> str:
    return ERRCODES.get(code, "see https://developer.work.weixin.qq.com/devtool/query")


class WeComApiError(RuntimeError):
    def __init__(self, errcode: int, errmsg: str = "") -> None:
        super().__init__(f"errcode {errcode}: {errcode_meaning(errcode)}")
        self.errcode = errcode
        self.errmsg = errmsg


class WeComApi:
    """gettoken (cached in Redis, shared by all workers), message/send, user/get."""

    def __init__(self, cfg: WecomConfig, secret: str, cache: KeyValueCache, session: aiohttp.ClientSession,
                 *, max_attempts: int = 4, backoff_s: float = 0.5) -> None:
        self.cfg = cfg
        self._secret = secret
        self._cache = cache
        self._session = session
        self._lock = asyncio.Lock()
        self._local: tuple[str, float] | None = None  # used while Redis is unreachable
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._cache_key = f"wecom:token:{cfg.corp_id}:{cfg.agent_id}"

    async def _get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        async with self._session.get(self.cfg.api_base + path, params=params) as r:
            if r.status >= 500:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            return await r.json(content_type=None)

    async def _shared_token(self) -> str | None:
        try:
            return await self._cache.get(self._cache_key)
        except StoreUnavailable:
            return None

    async def access_token(self) -> str:
        cached = await self._shared_token()
        if cached:
            remember_secret(cached)  # fetched by another daemon: masked in our log all the same
            return cached
        if self._local and self._local[1] > time.monotonic():
            return self._local[0]
        async with self._lock:  # one fetch at a time in this process
            cached = await self._shared_token()  # another task may have fetched it meanwhile
            if cached:
                return cached
            data = await self._get_json("/cgi-bin/gettoken", {"corpid": self.cfg.corp_id, "corpsecret": self._secret})
            code = int(data.get("errcode", 0))
            if code != 0 or not data.get("access_token"):
                raise WeComApiError(code or -1, str(data.get("errmsg", "")))
            token = str(data["access_token"])
            remember_secret(token)
            # Refresh well before WeCom's expiry (7200 s), so no send races the deadline.
            ttl = max(60, int(data.get("expires_in", 7200)) - 300)
            self._local = (token, time.monotonic() + ttl)
            try:
                await self._cache.set(self._cache_key, token, ttl)
            except StoreUnavailable:
                pass
            log.info("wecom access token fetched", corp_id=self.cfg.corp_id, agent_id=self.cfg.agent_id,
                     expires_in_s=ttl)
            return token

    async def _forget_token(self, token: str) -> None:
        self._local = None
        try:
            if await self._cache.get(self._cache_key) == token:
                await self._cache.delete(self._cache_key)
        except StoreUnavailable:
            pass

    async def _call(self, method: str, path: str, params: dict[str, str] | None = None,
                    **kwargs: Any) -> dict[str, Any]:
        """One API call with a token: refreshed once on a token errcode, retried with backoff."""
        refreshed = False
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt and last is not None:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                token = await self.access_token()
                async with self._session.request(method, self.cfg.api_base + path,
                                                 params={**(params or {}), "access_token": token},
                                                 **kwargs) as r:
                    if r.status >= 500:
                        raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
                    data = await r.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # The URL carries the token: log the type only.
                last = exc
                log.warning("wecom api call failed", path=path, error=type(exc).__name__, attempt=attempt + 1)
                continue
            code = int(data.get("errcode", 0))
            if code == 0:
                return data
            if code in _TOKEN_ERRORS and not refreshed:
                refreshed = True
                await self._forget_token(token)
                log.info("wecom access token rejected; fetching a new one", errcode=code,
                         meaning=errcode_meaning(code))
                last = None
                continue
            last = WeComApiError(code, str(data.get("errmsg", "")))
            log.warning("wecom api error", path=path, errcode=code, meaning=errcode_meaning(code),
                        attempt=attempt + 1)
            if code not in _RETRYABLE:
                raise last
        if isinstance(last, WeComApiError):
            raise last
        raise WeComApiError(-1, f"no answer from WeCom after {self.max_attempts} attempts")

    async def send(self, user: str, content: str, skip: int = 0,
                   on_sent: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Send ``content`` in parts; ``skip`` parts were sent before a restart; ``on_sent(n)`` after each."""
        markdown = self.cfg.reply_format == "markdown"
        limit = 4096 if markdown else 2048
        parts = [p for p in split_text(content, limit, utf8_len) if p.strip()]
        for n, part in enumerate(parts[skip:], start=skip + 1):
            payload: dict[str, Any] = {
                "touser": user,
                "agentid": self.cfg.agent_id,
                # WeCom drops a repeat of the same content within the interval: a retry after
                # a timeout whose first try did arrive does not reach the user twice.
                "enable_duplicate_check": 1,
                "duplicate_check_interval": 1800,
            }
            if markdown:
                payload |= {"msgtype": "markdown", "markdown": {"content": part}}
            else:
                payload |= {"msgtype": "text", "text": {"content": part}}
            await self._call("POST", "/cgi-bin/message/send", json=payload)
            if on_sent is not None:
                await on_sent(n)

    async def departments(self, user: str) -> list[int]:
        key = f"wecom:dept:{self.cfg.corp_id}:{user}"
        try:
            cached = await self._cache.get(key)
        except StoreUnavailable:
            cached = None
        if cached is not None:
            return [int(x) for x in cached.split(",") if x]
        data = await self._call("GET", "/cgi-bin/user/get", params={"userid": user})
        depts = [int(d) for d in data.get("department", [])]
        try:
            await self._cache.set(key, ",".join(map(str, depts)), 3600)
        except StoreUnavailable:
            pass
        return depts


# -- the connector -----------------------------------------------------------------------------

NOT_TEXT = "抱歉，我目前只能阅读文字消息。Sorry, I can only read text messages."
NOT_ALLOWED = "抱歉，您没有使用此助手的权限。Sorry, you are not allowed to use this assistant."


def _raw_query(query_string: str) -> dict[str, str]:
    """Query parameters with '%xx' decoded but '+' kept: WeCom's base64 echostr holds raw '+'."""
    out: dict[str, str] = {}
    for pair in query_string.split("&"):
        if pair:
            k, _, v = pair.partition("=")
            out[unquote(k)] = unquote(v)
    return out


def _parse_xml(data: bytes | str) -> dict[str, str]:
    """A flat WeCom XML message as a dict; entities and DTD tricks are refused (defusedxml)."""
    root = SafeET.fromstring(data, forbid_dtd=True)
    return {child.tag: (child.text or "") for child in root}


class _App:
    def __init__(self, bot: str, cfg: WecomConfig) -> None:
        self.bot = bot
        self.cfg = cfg
        self.crypto = WeComCrypto(resolve_secret(cfg.token), resolve_secret(cfg.encoding_aes_key), cfg.corp_id)
        self.secret = resolve_secret(cfg.secret)
        self.api: WeComApi | None = None


class WeComConnector(Connector):
    name = "wecom"
    section = "wecom"

    def __init__(self, dispatcher: Dispatcher, config: Config) -> None:
        super().__init__(dispatcher, config)
        self.apps = {bot: _App(bot, cfg) for bot, cfg in config.wecom.items()}
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return bool(config.wecom)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/wecom/{bot}", self.verify_url), web.post("/wecom/{bot}", self.callback)]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        for app in self.apps.values():
            app.api = WeComApi(app.cfg, app.secret, self.dispatcher.cache, self._session)
        log.info("wecom callback ready", apps=[f"/wecom/{b}" for b in self.apps])

    async def stop(self, grace_s: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _app(self, request: web.Request) -> _App:
        app = self.apps.get(request.match_info["bot"])
        if app is None:
            raise web.HTTPNotFound(text="no WeCom app is configured at this path")
        return app

    # -- GET: URL verification -------------------------------------------------------------

    async def verify_url(self, request: web.Request) -> web.StreamResponse:
        app = self._app(request)
        q = _raw_query(request.rel_url.raw_query_string)
        missing = [k for k in ("msg_signature", "timestamp", "nonce", "echostr") if not q.get(k)]
        if missing:
            raise web.HTTPBadRequest(text=f"missing query parameter(s): {', '.join(missing)}")
        if not app.crypto.check_signature(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"]):
            log.warning("wecom url verification: bad signature", bot=app.bot)
            raise web.HTTPForbidden(text="bad msg_signature")
        try:
            plain = app.crypto.decrypt(q["echostr"])
        except WeComCryptoError as exc:
            raise web.HTTPBadRequest(text=f"echostr: {exc}") from None
        log.info("wecom url verified", bot=app.bot)
        return web.Response(text=plain, content_type="text/plain")

    # -- POST: messages ----------------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.StreamResponse:
        app = self._app(request)
        q = _raw_query(request.rel_url.raw_query_string)
        missing = [k for k in ("msg_signature", "timestamp", "nonce") if not q.get(k)]
        if missing:
            raise web.HTTPBadRequest(text=f"missing query parameter(s): {', '.join(missing)}")
        body = await request.read()
        try:
            envelope = _parse_xml(body)
        except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"body is not acceptable XML: {type(exc).__name__}") from None
        encrypt = envelope.get("Encrypt", "").strip()
        if not encrypt:
            raise web.HTTPBadRequest(text="no Encrypt element")
        # The signature is checked before anything is decrypted.
        if not app.crypto.check_signature(q["msg_signature"], q["timestamp"], q["nonce"], encrypt):
            log.warning("wecom callback: bad signature", bot=app.bot)
            raise web.HTTPForbidden(text="bad msg_signature")
        try:
            msg = _parse_xml(app.crypto.decrypt(encrypt))
        except WeComCryptoError as exc:
            log.warning("wecom callback rejected", bot=app.bot, reason=str(exc))
            raise web.HTTPBadRequest(text=str(exc)) from None
        except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"decrypted message is not acceptable XML: {type(exc).__name__}") from None
        sender = msg.get("FromUserName", "")
        if not sender:
            raise web.HTTPBadRequest(text="message has no FromUserName")
        event_id = msg.get("MsgId") or f"{sender}:{msg.get('CreateTime', '')}:{msg.get('Event', '')}"
        kind = msg.get("MsgType", "")
        if kind == "event":
            log.info("wecom event ignored", event=msg.get("Event"), user=sender)
        else:
            # The route decides the bot (and so its knowledge bases); nothing in the message can.
            inbound = InboundMessage(
                platform=PLATFORM, bot=app.cfg.routes.get(sender, app.bot), chat=sender, user=sender,
                text=msg.get("Content", "") or "(not text)",
                event_id=f"{app.cfg.corp_id}:{app.cfg.agent_id}:{event_id}",
                route={"account": app.bot, "text": kind == "text"},
            )
            # Recorded before WeCom hears "received": a restart answers it.
            if await self.dispatcher.accept(inbound, self.name):
                self._spawn(self._handle(app, inbound))
        # An empty 200 is "received, no passive reply"; the answer follows via message/send.
        return web.Response(status=200, text="")

    def replay(self, inbound: InboundMessage) -> Coroutine[Any, Any, None] | None:
        target = self.apps.get(inbound.route.get("account", inbound.bot))
        return self._handle(target, inbound) if target is not None else None

    async def _allowed(self, app: _App, user: str) -> bool:
        cfg = app.cfg
        if not cfg.allow_users and not cfg.allow_departments:
            return True
        if user in cfg.allow_users:
            return True
        if cfg.allow_departments and app.api is not None:
            try:
                depts = await app.api.departments(user)
            except WeComApiError as exc:
                log.warning("wecom: cannot look up the user's departments", user=user, error=str(exc))
                return False
            return any(d in cfg.allow_departments for d in depts)
        return False

    async def _handle(self, app: _App, inbound: InboundMessage) -> None:
        structlog.contextvars.bind_contextvars(platform=PLATFORM, bot=app.bot, request_id=inbound.request_id)
        try:
            await self._answer(app, inbound)
        except Interrupted:
            log.info("wecom answer interrupted by shutdown; it is answered after the restart")
            return
        except Exception:  # one bad message must never take the connector down
            log.exception("wecom message failed")
        await self.dispatcher.finished(inbound)

    async def _answer(self, app: _App, inbound: InboundMessage) -> None:
        user = inbound.user
        if not await self._allowed(app, user):
            log.info("wecom user not allowed", user=user)
            await self._reply(app, inbound, NOT_ALLOWED)
            return
        if not inbound.route.get("text"):
            await self._reply(app, inbound, NOT_TEXT)
            return
        try:
            answer = await self.dispatcher.dispatch(inbound)
        except Busy as exc:
            await self._reply(app, inbound, exc.user_message or BUSY.format(s=exc.retry_after))
            return
        except Rejected as exc:
            await self._reply(app, inbound, exc.message)
            return
        final = None
        async for ev in answer.events():
            if ev.done:
                final = ev
        if final is not None and final.finish_reason == Finish.SHUTDOWN:
            raise Interrupted(inbound.request_id)
        if final is not None and final.finish_reason == Finish.BUSY:
            await self._reply(app, inbound, BUSY.format(s=final.retry_after or 5))
            return
        if final is None or final.finish_reason in (Finish.ERROR, Finish.CANCELLED) or not final.text.strip():
            await self._reply(app, inbound, FAILED)
            return
        await self._reply(app, inbound, final.text)

    async def _reply(self, app: _App, inbound: InboundMessage, text: str) -> None:
        assert app.api is not None
        user = inbound.user

        async def sent(n: int) -> None:
            await self.dispatcher.note_progress(inbound, {"parts_sent": n})

        try:
            await app.api.send(user, text, skip=int(inbound.progress.get("parts_sent", 0)), on_sent=sent)
        except WeComApiError as exc:
            # Never lost silently: logged with its meaning and kept as a dead letter.
            log.error("wecom reply could not be delivered", user=user, errcode=exc.errcode,
                      meaning=errcode_meaning(exc.errcode))
            try:
                await self.dispatcher.cache.dead_letter(PLATFORM, {
                    "bot": app.bot, "user": user, "text": text, "errcode": exc.errcode})
            except StoreUnavailable:
                log.error("dead letter lost: redis unreachable", user=user)
