"""WeCom (企业微信) connector: a self-built app (自建应用) in callback mode.

``GET /wecom/<bot>`` answers WeCom's URL verification; ``POST /wecom/<bot>`` receives
encrypted messages. Each callback is checked (signature first, then decryption and
the corp id) and answered with an empty 200 at once: WeCom retries a callback that is
not answered within 5 s; a retry is dropped when the message is recorded (MsgId). The
answer goes out afterwards through the app message API (``message/send``), split to
WeCom's 2048-byte limit on character boundaries. XML is parsed with defusedxml.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog
from aiohttp import web
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from connectors.base import Connector, Route, Service
from connectors.download import check_announced, mime_of
from connectors.reply import AttachmentUnavailable, ReplyTarget
from connectors.textsplit import utf8_len
from connectors.wecom.api import WeComApi, WeComApiError, errcode_meaning
from connectors.wecom.config import WecomConfig
from connectors.wecom_common.callback import check_fresh, open_body, signed_query, verify_url
from connectors.wecom_common.crypto import WeComCrypto
from core.config import Settings
from core.kv import KeyValueCache
from core.messages import Account, Attachment, AttachmentKind, InboundMessage
from core.redis_store import StoreUnavailable
from core.secrets import resolve_secret

log = structlog.get_logger("botd.wecom")

PLATFORM = "wecom"


class WeComReply(ReplyTarget):
    """An answer as app messages to one user: sent once each, with the final text (WeCom
    cannot edit them); parts sent before a restart are not sent again."""

    edits = False
    measure = staticmethod(utf8_len)

    def __init__(self, account: Account, api: WeComApi, cache: KeyValueCache, user: str,
                 sent: list[Any] | None = None) -> None:
        super().__init__(account, 0.0, sent or ())
        self.api = api
        self.cache = cache
        self.user = user
        self.limit = api.part_limit

    async def post(self, part: str, first: bool) -> int:
        await self.api.send(self.user, part)
        return len(self.sent) + 1

    async def user_groups(self, user: str) -> list[str]:
        return [str(d) for d in await self.api.departments(user)]

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        media_id = str(attachment.ref.get("media_id") or "")
        if not media_id:
            raise AttachmentUnavailable("wecom: the attachment has no MediaId")
        check_announced(attachment.size, max_bytes)
        return await self.api.download_media(media_id, max_bytes)

    async def failed(self, exc: Exception, text: str) -> None:
        if not isinstance(exc, WeComApiError):
            log.error("wecom answer failed", exc_info=exc)
            return
        # Never lost silently: logged with its meaning and kept as a dead letter.
        log.error("wecom reply could not be delivered", user=self.user, errcode=exc.errcode,
                  meaning=errcode_meaning(exc.errcode))
        try:
            await self.cache.dead_letter(PLATFORM, {
                "bot": self.account.name, "user": self.user, "text": text, "errcode": exc.errcode})
        except StoreUnavailable:
            log.error("dead letter lost: redis unreachable", user=self.user)


# MsgType -> (kind, MIME type): a picture is a JPEG or PNG, a voice message AMR (WeCom's format
# for app messages), a file whatever its name says.
_MEDIA: dict[str, tuple[AttachmentKind, str]] = {
    "image": ("image", "image/jpeg"), "voice": ("voice", "audio/amr"), "file": ("file", "")}


def attachments_of(msg: dict[str, str]) -> list[Attachment]:
    """A picture, voice message or file (its MediaId, fetched from media/get when read); videos,
    locations and links are nothing botd reads."""
    media_id = msg.get("MediaId", "")
    if msg.get("MsgType", "") not in _MEDIA or not media_id:
        return []
    kind, mime = _MEDIA[msg["MsgType"]]
    name = msg.get("FileName") or msg.get("Title") or ""
    if kind == "voice" and msg.get("Format"):
        mime = f"audio/{msg['Format'].lower()}"
    size = msg.get("FileSize", "")
    return [Attachment(kind, name=name, mime=mime or mime_of(name), size=int(size) if size.isdigit() else None,
                       ref={"media_id": media_id})]


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
        self.account = Account(connector="wecom", name=bot, routes=cfg.routes,
                               allow_users=frozenset(cfg.allow_users),
                               allow_groups=frozenset(map(str, cfg.allow_departments)), tell_refused=True)


class WeComConnector(Connector):
    name = "wecom"

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.apps = {bot: _App(bot, cfg) for bot, cfg in WecomConfig.sections(self.config).items()}
        self._session: aiohttp.ClientSession | None = None


    def routes(self) -> list[Route]:
        return [("GET", "/wecom/{bot}", "verify_url"), ("POST", "/wecom/{bot}", "callback")]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        for app in self.apps.values():
            app.api = WeComApi(app.cfg, app.secret, self.cache, self._session)
        log.info("wecom callback ready", apps=[f"/wecom/{b}" for b in self.apps])

    async def close(self) -> None:
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
        return verify_url(request, app.crypto, what="wecom", bot=app.bot, window_s=app.cfg.timestamp_window_s)

    # -- POST: messages ----------------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.StreamResponse:
        app = self._app(request)
        q = signed_query(request)
        window = app.cfg.timestamp_window_s
        check_fresh(q["timestamp"], window, what="wecom", bot=app.bot)  # a replay: refused before any work
        body = await request.read()
        try:
            envelope = _parse_xml(body)
        except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"body is not acceptable XML: {type(exc).__name__}") from None
        encrypt = envelope.get("Encrypt", "").strip()
        if not encrypt:
            raise web.HTTPBadRequest(text="no Encrypt element")
        plain = open_body(q, encrypt, app.crypto, what="wecom", bot=app.bot)
        try:
            msg = _parse_xml(plain)
        except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"decrypted message is not acceptable XML: {type(exc).__name__}") from None
        sender = msg.get("FromUserName", "")
        if not sender:
            raise web.HTTPBadRequest(text="message has no FromUserName")
        # The message's own time, signed inside the ciphertext: a message re-sent under a fresh
        # URL timestamp is still as old as it is.
        check_fresh(msg.get("CreateTime", ""), window, what="wecom", bot=app.bot, field="CreateTime")
        event_id = msg.get("MsgId") or f"{sender}:{msg.get('CreateTime', '')}:{msg.get('Event', '')}"
        kind = msg.get("MsgType", "")
        if kind == "event":
            log.info("wecom event ignored", eventtype=msg.get("Event"), user=sender)  # "event": structlog's own
        else:
            attachments = attachments_of(msg)
            inbound = InboundMessage(
                platform=PLATFORM, bot=app.bot, account=app.bot, chat=sender, user=sender,
                text=msg.get("Content", "") or ("" if attachments else "(not text)"),
                readable=kind == "text" or bool(attachments), attachments=attachments,
                event_id=f"{app.cfg.corp_id}:{app.cfg.agent_id}:{event_id}",
            )
            # Recorded before WeCom hears "received": a restart answers it.
            await self.service.receive(inbound, self._target(app, inbound))
        # An empty 200 is "received, no passive reply"; the answer follows via message/send.
        return web.Response(status=200, text="")

    def _target(self, app: _App, inbound: InboundMessage) -> WeComReply:
        assert app.api is not None, "connector not started"
        progress = inbound.progress
        # Records of older versions counted the parts sent ("parts_sent").
        sent = progress.get("sent") or list(range(1, int(progress.get("parts_sent", 0)) + 1))
        return WeComReply(app.account, app.api, self.cache, inbound.user, sent)

    def target(self, msg: InboundMessage) -> WeComReply | None:
        app = self.apps.get(msg.account or msg.route.get("account", msg.bot))
        return self._target(app, msg) if app is not None else None
