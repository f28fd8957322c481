"""The web console: admins and department heads see and steer botd in a browser.

Served by the daemon under ``[console] path`` (default ``/console``): server-rendered pages
(Jinja2) with a little plain JavaScript for the streaming chat and the live status; every
asset ships in this package.

Logins: ``[console.users.NAME]`` holds an argon2 hash and a role. A login sets a short-lived
JWT (``[console] session_ttl_s``) in an HttpOnly, SameSite=Strict cookie; every
state-changing request carries the login's CSRF token (``X-CSRF-Token`` or a ``csrf`` form
field); logout puts the token on a deny-list in Redis; login attempts are counted in Redis.
The user's role and bots are read from the running config on every request, so a reload
that changes them applies at once.

Roles, enforced here for every endpoint: ``admin`` sees and does everything; ``department``
sees and uses only its ``bots`` (their conversations, their knowledge bases, their audit
lines); ``viewer`` reads (status, knowledge, conversations, audit) of its ``bots`` or of
every bot, and changes nothing. A bot that exists but is not the user's is 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import secrets
import tempfile
import time
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import jinja2
import structlog
from aiohttp import web
from pydantic import BaseModel

from connectors.base import Edge, Route
from connectors.http_status import HttpOutcome, outcome_of, unavailable
from connectors.server import REQUEST_ID
from connectors.waiting import with_notice
from connectors.web_console import i18n
from connectors.web_console.backend import ConsoleBackend
from connectors.web_console.config import ConsoleConfig, ConsoleUserConfig
from connectors.web_console.csvsafe import BOM
from connectors.web_console.csvsafe import cell as _cell
from connectors.web_console.quality import HANDLERS as QUALITY_HANDLERS
from connectors.web_console.quality import QualityPages
from connectors.web_console.uploads import MAX_FILES, ChatUploads
from core.auth import CONSOLE_AUDIENCE, AuthError, DenyList, LoginLimiter, Tokens, TooManyAttempts, verify_password
from core.config import Settings, secret_references
from core.dispatch import Busy, Rejected
from core.feedback import FeedbackEvent, Vote
from core.kv import KeyValueCache
from core.messages import Attachment, Finish, InboundMessage, ThreadKey
from core.redis_store import StoreUnavailable
from core.secrets import resolve_secret

log = structlog.get_logger("botd.console")

PLATFORM = "web"
COOKIE = "botd_console"
LOGIN_COOKIE = "botd_console_login"
LANG_COOKIE = "botd_lang"
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png",
                 ".txt": "text/plain"}
_CONVERSATION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The document types a knowledge base reads, and how an upload's first bytes must look.
UPLOAD_TYPES = {".md": b"", ".markdown": b"", ".txt": b"", ".text": b"", ".pdf": b"%PDF-", ".docx": b"PK\x03\x04"}
_UPLOAD_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f:*?\"<>|]{1,150}$")
MASK = "********"
# How often the status figures are sampled (the charts show one-minute buckets).
SAMPLE_EVERY_S = 5.0
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Session:
    """The logged-in user of one request."""

    name: str
    user: ConsoleUserConfig
    bots: tuple[str, ...]  # the bots this user may see, from the running config
    jti: str
    exp: int
    csrf: str

    @property
    def role(self) -> str:
        return self.user.role

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"

    @property
    def can_write(self) -> bool:
        """Chat and delete conversations (of its bots)."""
        return self.user.role in ("admin", "department")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _NoSession(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Handler = Callable[["WebConsoleConnector", web.Request, Session], Awaitable[web.StreamResponse]]


def _page(handler: Handler) -> Callable[[WebConsoleConnector, web.Request], Awaitable[web.StreamResponse]]:
    """An HTML page: no valid login goes to the login page; a refusal is an error page."""

    @functools.wraps(handler)
    async def wrapped(self: WebConsoleConnector, request: web.Request) -> web.StreamResponse:
        try:
            session = await self._authenticate(request)
        except _NoSession as exc:
            return self._to_login(request, expired=exc.reason != "not logged in")
        except StoreUnavailable:
            return self._error_page(request, None, 503, "store_down")
        try:
            return await handler(self, request, session)
        except _Refused as exc:
            self._audit_refusal(request, session, exc)
            key = {403: "forbidden", 404: "not_found"}.get(exc.status, "")
            return self._error_page(request, session, exc.status, key, exc.message)
        except (Busy, StoreUnavailable):
            return self._error_page(request, session, 503, "store_down")

    return wrapped


def _api(write: bool = False) -> Callable[[Handler], Callable[[WebConsoleConnector, web.Request],
                                                              Awaitable[web.StreamResponse]]]:
    """A JSON endpoint: 401 without a valid login; ``write``: 403 without the login's CSRF token."""

    def deco(handler: Handler) -> Callable[[WebConsoleConnector, web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(handler)
        async def wrapped(self: WebConsoleConnector, request: web.Request) -> web.StreamResponse:
            try:
                session = await self._authenticate(request)
            except _NoSession as exc:
                return _json_error(401, "not_logged_in", f"log in first ({exc.reason})")
            except StoreUnavailable:
                return _outcome(unavailable("redis is unreachable: logins cannot be checked"))
            if write and not self.tokens.csrf_ok(session.jti, await _csrf_given(request)):
                log.warning("console request without a valid CSRF token refused", user=session.name,
                            path=request.path)
                self.admin.audit_action(session.name, "refused", path=request.path, status=403, reason="csrf")
                return _json_error(403, "csrf", "missing or wrong CSRF token (send X-CSRF-Token)")
            try:
                return await handler(self, request, session)
            except _Refused as exc:
                self._audit_refusal(request, session, exc)
                return _json_error(exc.status, exc.code, exc.message)
            except (Rejected, Busy, StoreUnavailable) as exc:
                o = outcome_of(exc)
                assert o is not None
                return _outcome(o)

        return wrapped

    return deco


async def _csrf_given(request: web.Request) -> str | None:
    given = request.headers.get("X-CSRF-Token")
    if given is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get("csrf")
        given = value if isinstance(value, str) else None
    return given


def _json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers={**_SECURITY_HEADERS, **(headers or {})},
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _outcome(o: HttpOutcome) -> web.Response:
    return _json_error(o.status, o.code, o.message, headers=o.headers)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=_SECURITY_HEADERS,
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _load_assets() -> tuple[dict[str, bytes], str]:
    """The shipped static files, read once (served from memory, never from disk on the event
    loop), and a version of them for cache-busting URLs."""
    assets = {p.name: p.read_bytes() for p in sorted(STATIC.glob("*"))
              if p.is_file() and p.suffix in _STATIC_TYPES}
    h = hashlib.sha256()
    for name, body in assets.items():
        h.update(name.encode() + body)
    return assets, h.hexdigest()[:10]


class WebConsoleConnector(QualityPages, Edge):
    name = "web_console"
    hands = "admin"

    def __init__(self, admin: ConsoleBackend, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(admin, settings, cache)
        self.admin = admin
        console = self.console
        assert console.signing_key is not None, "checked by the config"
        # Read once: the routes are mounted at start ([console] path needs a restart).
        self.base = console.path
        self.tokens = Tokens(resolve_secret(console.signing_key))
        self.denied = DenyList(cache)
        self.uploads = ChatUploads(cache)  # files sent with a chat message
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["duration"] = _duration
        self.assets, self.static_version = _load_assets()
        self._sampler: asyncio.Task[None] | None = None

    def _audit_refusal(self, request: web.Request, session: Session, exc: _Refused) -> None:
        """A refused attempt (403) is a console action too: who tried what."""
        if exc.status == 403:
            self.admin.audit_action(session.name, "refused", path=request.path, status=403, reason=exc.message)

    @property
    def console(self) -> ConsoleConfig:
        return ConsoleConfig.of(self.config)

    @property
    def limiter(self) -> LoginLimiter:
        return LoginLimiter(self.cache, self.console.login_attempts, self.console.login_window_s)

    async def start(self) -> None:
        if not self.config.server.is_loopback() and not self.console.secure_cookie:
            log.warning("the console's login cookie is not marked Secure while the server listens beyond "
                        "loopback: serve it through HTTPS and set [console] secure_cookie = true",
                        host=self.config.server.host)
        self._sampler = asyncio.create_task(self.admin.sample_stats(SAMPLE_EVERY_S),
                                            name="botd-console-stats")

    async def stop_receiving(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None

    def routes(self) -> list[Route]:
        p = self.base
        return [
            ("GET", p, "index"), ("GET", p + "/", "index"),
            ("GET", p + "/login", "login_page"), ("POST", p + "/login", "login"),
            ("POST", p + "/logout", "logout"),
            ("GET", p + "/chat", "chat_page"), ("GET", p + "/status", "status_page"),
            ("GET", p + "/knowledge", "knowledge_page"), ("GET", p + "/conversations", "conversations_page"),
            ("GET", p + "/conversation", "conversation_page"), ("GET", p + "/audit", "audit_page"),
            ("GET", p + "/api/me", "api_me"),
            ("POST", p + "/api/chat", "api_chat"), ("POST", p + "/api/feedback", "api_feedback"),
            ("GET", p + "/api/status", "api_status"),
            ("GET", p + "/api/knowledge", "api_knowledge"), ("POST", p + "/api/knowledge/ingest", "api_ingest"),
            ("GET", p + "/api/conversations", "api_conversations"),
            ("GET", p + "/api/conversation", "api_conversation"),
            ("POST", p + "/api/conversation/delete", "api_delete_conversation"),
            ("GET", p + "/api/audit", "api_audit"), ("GET", p + "/api/audit.csv", "api_audit_csv"),
            ("POST", p + "/api/knowledge/upload", "api_upload"),
            ("POST", p + "/api/knowledge/delete", "api_delete_document"),
            ("GET", p + "/api/knowledge/search", "api_search"),
            ("GET", p + "/config", "config_page"), ("GET", p + "/api/config", "api_config"),
            ("POST", p + "/api/config/reload", "api_reload"),
            ("GET", p + "/static/{name}", "static"),
            *self.quality_routes(),
        ]

    # -- who is asking ---------------------------------------------------------------------------

    def _visible_bots(self, user: ConsoleUserConfig) -> tuple[str, ...]:
        names = self.admin.bot_names()
        if user.role == "admin" or (user.role == "viewer" and not user.bots):
            return tuple(names)
        return tuple(b for b in names if b in user.bots)

    async def _authenticate(self, request: web.Request) -> Session:
        token = request.cookies.get(COOKIE)
        if not token:
            raise _NoSession("not logged in")
        try:
            claims = self.tokens.decode(token, CONSOLE_AUDIENCE)
        except AuthError as exc:
            raise _NoSession(exc.reason) from None
        name = claims["sub"]
        user = self.console.users.get(name)
        # A changed password (or a removed user) ends the logins made with the old one.
        if user is None or claims.get("pw") != _password_tag(user.password_hash):
            raise _NoSession("the login is no longer valid")
        if await self.denied.revoked(claims["jti"]):
            raise _NoSession("logged out")
        return Session(name, user, self._visible_bots(user), claims["jti"], int(claims["exp"]),
                       self.tokens.csrf(claims["jti"]))

    def _bot(self, session: Session, bot: str | None) -> str:
        """``bot`` if this user may see it: 404 for no such bot, 403 for another's."""
        if not bot:
            if not session.bots:
                raise _Refused(403, "forbidden", "you may see no bot")
            return session.bots[0]
        if bot not in self.admin.bot_names():
            raise _Refused(404, "unknown_bot", f"no bot named {bot!r}")
        if bot not in session.bots:
            log.warning("console: a bot outside the user's grants refused", user=session.name, bot=bot)
            raise _Refused(403, "forbidden", f"bot {bot!r} is not yours")
        return bot

    def _thread(self, session: Session, cid: str | None) -> ThreadKey:
        thread = self.admin.thread_of(cid or "")
        if thread is None:
            raise _Refused(400, "invalid_id", "a conversation id is platform:bot:chat:thread")
        self._bot(session, thread.bot)
        return thread

    # Lent to the quality pages (connectors/web_console/quality.py).

    def _refuse(self, status: int, code: str, message: str) -> NoReturn:
        raise _Refused(status, code, message)

    @staticmethod
    def _reply_json(data: Any, status: int = 200) -> web.Response:
        return _json(data, status)

    @staticmethod
    def _headers() -> dict[str, str]:
        return dict(_SECURITY_HEADERS)

    def _need_write(self, session: Session) -> None:
        if not session.can_write:
            raise _Refused(403, "forbidden", f"the role {session.role!r} may only read")

    def _need_admin(self, session: Session) -> None:
        if not session.is_admin:
            raise _Refused(403, "forbidden", "admins only")

    # -- rendering ---------------------------------------------------------------------------------

    def _lang(self, request: web.Request) -> tuple[str, str | None]:
        """The language, and the one to remember in the cookie when ``?lang=`` asked for it."""
        asked = request.query.get("lang")
        if asked in i18n.LANGS:
            return asked, asked
        return i18n.choose(request.cookies.get(LANG_COOKIE), request.headers.get("Accept-Language", "")), None

    def _render(self, request: web.Request, template: str, session: Session | None, status: int = 200,
                **ctx: Any) -> web.Response:
        lang, remember = self._lang(request)
        t = i18n.TEXTS[lang]
        html = self.env.get_template(template).render(
            base=self.base, lang=lang, t=t, session=session, csrf=session.csrf if session else "",
            version=self.static_version, page=template.removesuffix(".html"), path=request.path,
            js_texts={k: t[k] for k in i18n.JS_KEYS}, **ctx,
        )
        resp = web.Response(text=html, content_type="text/html", status=status, headers=_SECURITY_HEADERS)
        if remember:
            resp.set_cookie(LANG_COOKIE, remember, max_age=365 * 86400, path=self.base, samesite="Strict",
                            httponly=True, secure=self._secure(request))
        return resp

    def _error_page(self, request: web.Request, session: Session | None, status: int, key: str,
                    detail: str = "") -> web.Response:
        return self._render(request, "error.html", session, status=status, key=key, detail=detail, status_code=status)

    def _secure(self, request: web.Request) -> bool:
        return self.console.secure_cookie or request.secure

    def _to_login(self, request: web.Request, expired: bool = False) -> web.Response:
        target = request.path_qs if request.method == "GET" else self.base + "/chat"
        query = {"next": target}
        if expired:
            query["expired"] = "1"
        resp = _redirect(request.url.with_path(self.base + "/login").with_query(query).path_qs, 302)
        if expired:
            resp.del_cookie(COOKIE, path=self.base)
        return resp

    def _next(self, value: str | None) -> str:
        """Where to go after logging in: a page of this console only (no open redirect)."""
        if value and value.startswith(self.base + "/") and not value.startswith("//") and "\\" not in value \
                and not value.startswith(self.base + "/login") and not value.startswith(self.base + "/api/"):
            return value
        return self.base + "/chat"

    # -- login and logout --------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return _redirect(self.base + "/chat", 302)

    async def login_page(self, request: web.Request, *, status: int = 200, error: str = "",
                         retry_after: int | None = None, username: str = "") -> web.Response:
        nonce = secrets.token_urlsafe(24)
        resp = self._render(request, "login.html", None, status=status, error=error, login_csrf=nonce,
                            next=self._next(request.query.get("next")), expired=request.query.get("expired") == "1",
                            retry_after=retry_after, username=username)
        resp.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=self.base, httponly=True, samesite="Strict",
                        secure=self._secure(request))
        if retry_after is not None:
            resp.headers["Retry-After"] = str(retry_after)
        return resp

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name, password = str(form.get("user", ""))[:64], str(form.get("password", ""))[:1024]
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not secrets.compare_digest(nonce.encode(), str(form.get("csrf", "")).encode()):
            return await self.login_page(request, status=403, error="login_reload", username=name)
        client = request.remote or "unknown"
        try:
            await self.limiter.attempt(name, client)
        except TooManyAttempts as exc:
            log.warning("console login refused: too many attempts", user=name, client=client)
            return await self.login_page(request, status=429, error="login_limited", retry_after=exc.retry_after,
                                         username=name)
        except StoreUnavailable:
            return await self.login_page(request, status=503, error="store_down", username=name)
        user = self.console.users.get(name)
        # Checked in a thread (argon2 takes tens of ms); an unknown name costs the same.
        ok = await asyncio.to_thread(verify_password, user.password_hash if user else None, password)
        if not ok or user is None:
            try:
                await self.limiter.failed(name, client)
            except StoreUnavailable:
                pass
            log.warning("console login failed", user=name, client=client)
            self.admin.audit_action(name, "login_failed", client=client)
            return await self.login_page(request, status=401, error="login_failed", username=name)
        try:
            await self.limiter.succeeded(name, client)
        except StoreUnavailable:
            pass
        token = self.tokens.issue(name, CONSOLE_AUDIENCE, self.console.session_ttl_s, role=user.role,
                                  pw=_password_tag(user.password_hash))
        self.admin.audit_action(name, "login", client=client)
        resp = _redirect(self._next(str(form.get("next", "")) or None))
        resp.set_cookie(COOKIE, token, max_age=self.console.session_ttl_s, path=self.base, httponly=True,
                        samesite="Strict", secure=self._secure(request))
        resp.del_cookie(LOGIN_COOKIE, path=self.base)
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        try:
            session = await self._authenticate(request)
        except _NoSession:  # already over: nothing to revoke
            resp = _redirect(self.base + "/login")
            resp.del_cookie(COOKIE, path=self.base)
            return resp
        except StoreUnavailable:
            return _outcome(unavailable("redis is unreachable: the logout cannot be recorded"))
        if not self.tokens.csrf_ok(session.jti, await _csrf_given(request)):
            return _json_error(403, "csrf", "missing or wrong CSRF token (send X-CSRF-Token)")
        try:
            await self.denied.revoke(session.jti, session.exp)
        except StoreUnavailable:
            return _outcome(unavailable("redis is unreachable: the logout cannot be recorded"))
        self.admin.audit_action(session.name, "logout")
        resp = _redirect(self.base + "/login")
        resp.del_cookie(COOKIE, path=self.base)
        return resp

    # -- pages ---------------------------------------------------------------------------------------

    @_page
    async def chat_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = request.query.get("bot")
        chosen = self._bot(session, bot) if bot else (session.bots[0] if session.bots else "")
        conversation = request.query.get("conversation", "")
        if not _CONVERSATION.match(conversation):
            conversation = f"c-{secrets.token_hex(4)}"
        return self._render(request, "chat.html", session, bots=session.bots, chosen=chosen,
                            conversation=conversation)

    @_page
    async def status_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._render(request, "status.html", session, info=self._status(session))

    @_page
    async def knowledge_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        bases = await self.admin.knowledge_status(session.bots)
        query = request.query.get("q", "")
        kb = request.query.get("kb", "")
        hits: list[dict[str, Any]] | None = None
        if query:
            hits = await self._search(session, query, kb)
        for b in bases:
            b["writable"] = self._kb_writable(session, b["name"])
            b["progress"] = self.admin.ingest_progress(b["name"])
        return self._render(request, "knowledge.html", session, bases=bases, notice=request.query.get("notice", ""),
                            notice_kb=kb, query=query, hits=hits, search_kb=kb,
                            upload_types=", ".join(UPLOAD_TYPES), upload_max=self.config.server.max_body_bytes)

    @_page
    async def conversations_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = request.query.get("bot") or None
        platform = request.query.get("platform") or None
        bots = [self._bot(session, bot)] if bot else list(session.bots)
        items = await self.admin.conversations(bots, platform)
        platforms = sorted({c["platform"] for c in items} | ({platform} if platform else set()))
        return self._render(request, "conversations.html", session, items=items, bot=bot or "",
                            platform=platform or "", platforms=platforms, notice=request.query.get("notice", ""))

    @_page
    async def conversation_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        thread = self._thread(session, request.query.get("id"))
        messages = await self.admin.conversation(thread)
        if not messages:
            raise _Refused(404, "not_found", "no such conversation (or it has expired)")
        return self._render(request, "conversation.html", session, thread=thread, cid=thread.redis_suffix(),
                            messages=messages)

    @_page
    async def config_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        self._need_admin(session)
        return self._render(request, "config.html", session, config_json=json.dumps(
            self._masked_config(), indent=2, ensure_ascii=False), notice=request.query.get("notice", ""))

    @_page
    async def audit_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        lines = await self._audit_lines(request, session)
        return self._render(request, "audit.html", session, lines=lines, bot=request.query.get("bot", ""),
                            user=request.query.get("user", ""), day=request.query.get("day", ""))

    # -- JSON --------------------------------------------------------------------------------------

    @_api()
    async def api_me(self, request: web.Request, session: Session) -> web.StreamResponse:
        return _json({"user": session.name, "role": session.role, "bots": list(session.bots),
                      "expires": session.exp, "csrf": session.csrf})

    @_api(write=True)
    async def api_chat(self, request: web.Request, session: Session) -> web.StreamResponse:
        self._need_write(session)
        attachments: list[Attachment] = []
        if request.content_type == "multipart/form-data":
            body, attachments = await self._chat_form(request, session)
        else:
            body = await _json_object(request)
        bot = self._bot(session, body.get("bot") if isinstance(body.get("bot"), str) else None)
        text = body.get("text", "" if attachments else None)
        if not isinstance(text, str) or not (text.strip() or attachments):
            raise _Refused(400, "empty_message", "text: the message is empty")
        conversation = body.get("conversation", "default")
        if not isinstance(conversation, str) or not _CONVERSATION.match(conversation):
            raise _Refused(400, "invalid_conversation", "conversation: 1-64 letters, digits, '-' and '_'")
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or not 0 < max_tokens < self.admin.n_ctx):
            raise _Refused(400, "invalid_max_tokens", f"max_tokens: 1 to {self.admin.n_ctx - 1}")
        msg = InboundMessage(platform=PLATFORM, bot=bot, chat=f"{session.name}/{conversation}", user=session.name,
                             text=text, max_tokens=max_tokens, request_id=request[REQUEST_ID], attachments=attachments)
        answer = await (self.admin.dispatch(msg, self.uploads.download_for(session.name)) if attachments
                        else self.admin.dispatch(msg))
        resp = web.StreamResponse(headers={**_SECURITY_HEADERS, "Content-Type": "application/x-ndjson; charset=utf-8",
                                           "X-Accel-Buffering": "no"})
        finished = False
        t0 = time.monotonic()
        try:
            await resp.prepare(request)

            async def notice() -> None:
                # Still waiting for the model: one line with the place in line, before any delta.
                said = self.admin.waiting_notice(msg, answer)
                if said:
                    await resp.write(_line({"notice": said}))

            async for ev in with_notice(answer.events(), self.config.queue.notice_after_s, notice):
                if not ev.done:
                    await resp.write(_line({"delta": ev.delta}))
                    continue
                finished = True
                reason = Finish(ev.finish_reason or Finish.STOP)
                usage = ev.usage
                await resp.write(_line({
                    "done": True, "finish": reason.value, "complete": reason.complete, "error": ev.error,
                    "retry_after": ev.retry_after, "sources": list(ev.sources),
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
                    if usage else None,
                    "details": {"elapsed_ms": round((time.monotonic() - t0) * 1000),
                                **self.admin.answer_details(answer)},
                    # 👍 / 👎 name the answer by this (None: it takes no feedback).
                    "feedback": self.admin.feedback_id(msg, answer) if reason.complete else None,
                }))
            await resp.write_eof()
        except ConnectionResetError:
            log.info("console client went away; generation stopped")
        finally:
            if not finished:
                answer.cancel()
        return resp

    @_api(write=True)
    async def api_feedback(self, request: web.Request, session: Session) -> web.StreamResponse:
        """A 👍 / 👎 (or a 👎's reason) on one of the asker's own answers in the console's chat:
        ``{"answer", "conversation", "vote": "up"|"down"|null, "reason"}``."""
        self._need_write(session)
        body = await _json_object(request)
        answer, conversation = body.get("answer"), body.get("conversation", "default")
        vote, reason = body.get("vote"), body.get("reason", "")
        if not isinstance(answer, str) or not _CONVERSATION.match(answer):
            raise _Refused(400, "invalid_answer", "answer: the id the chat's answer came with")
        if not isinstance(conversation, str) or not _CONVERSATION.match(conversation):
            raise _Refused(400, "invalid_conversation", "conversation: 1-64 letters, digits, '-' and '_'")
        if vote not in (None, "up", "down") or not isinstance(reason, str) or len(reason) > 2000:
            raise _Refused(400, "invalid_feedback", 'vote: "up", "down" or null; reason: at most 2000 characters')
        if vote is None and not reason.strip():
            raise _Refused(400, "invalid_feedback", "give a vote or a reason")
        # The asker's own conversation only: the store refuses an answer given in any other chat.
        reply = await self.admin.feedback(FeedbackEvent(
            PLATFORM, "", f"{session.name}/{conversation}", session.name, answer,
            Vote(vote) if vote else None, reason))
        if not reply.status.accepted:
            raise _Refused(404, "unknown_answer", "no answer of yours with this id takes feedback")
        return _json({"status": reply.status.value, "ask_reason": bool(reply.ask_reason)})

    async def _chat_form(self, request: web.Request, session: Session) -> tuple[dict[str, Any], list[Attachment]]:
        """A chat message sent as a form with files: its fields, and each file kept for the answer
        (:mod:`connectors.web_console.uploads`). The body is bounded by ``[server] max_body_bytes``."""
        form = await request.post()
        body: dict[str, Any] = {k: str(form[k]) for k in ("bot", "text", "conversation") if k in form}
        if str(form.get("max_tokens", "")).strip():
            try:
                body["max_tokens"] = int(str(form["max_tokens"]))
            except ValueError:
                raise _Refused(400, "invalid_max_tokens", "max_tokens: a whole number") from None
        files = [f for f in form.getall("file", []) if isinstance(f, web.FileField)]
        if len(files) > MAX_FILES:
            raise _Refused(400, "too_many_files", f"at most {MAX_FILES} files with one message")
        attachments = []
        for upload in files:
            name = unicodedata.normalize("NFC", upload.filename or "").strip()
            if not _UPLOAD_NAME.match(name) or name.startswith("."):
                raise _Refused(400, "invalid_name", "the file name may not hold a path, start with '.', or hold "
                                                    "control characters")
            data = upload.file.read()
            if not data:
                raise _Refused(400, "empty_file", f"{name}: the file is empty")
            try:
                attachments.append(await self.uploads.keep(session.name, name, upload.content_type, data))
            except StoreUnavailable:
                raise _Refused(503, "store_unavailable", "Redis is unreachable; the file cannot be kept") from None
        return body, attachments

    def _status(self, session: Session) -> dict[str, Any]:
        health = self.admin.health()
        cfg = self.config
        engine = health.get("engine") or {}
        snap = self.admin.last_hour()
        visible_kb = {kb for b in session.bots if b in cfg.bots for kb in cfg.bots[b].knowledge}
        platform_of = {"http_api": "api", "web_console": PLATFORM}
        connectors = []
        for name in self.admin.connector_names():
            platform = platform_of.get(name, name)
            connectors.append({"name": name, "platform": platform,
                               **snap["platforms"].get(platform, {"events": 0, "errors": 0, "last_event": None,
                                                                  "last_error": None, "last_outcome": ""})})
        try:
            model_file = cfg.model.resolved_path().name
        except FileNotFoundError:
            model_file = ""
        return {
            "model": {"name": cfg.model.name, "engine": cfg.model.engine, "file": model_file,
                      "loaded": health.get("model_loaded", False), "n_ctx": cfg.model.n_ctx,
                      "parallel": cfg.model.parallel},
            "queue": {"depth": health.get("queue_depth", 0), "capacity": health.get("queue_capacity", 0),
                      "generating": health.get("generating", False),
                      "active_sequences": engine.get("active_sequences", 0), "slots": engine.get("slots", 0)},
            "engine": engine,
            "redis": {"status": health.get("redis"), "error": health.get("redis_error")},
            "knowledge": {k: v for k, v in (health.get("knowledge") or {}).items() if k in visible_kb},
            "ready": health.get("ready", False),
            "uptime_s": health.get("uptime_s", 0),
            "connectors": connectors,
            "last_hour": {"bucket_s": snap["bucket_s"], "series": snap["series"]},
            "recent_errors": snap["recent_errors"] if session.is_admin else [],
            "now": time.time(),
        }

    @_api()
    async def api_status(self, request: web.Request, session: Session) -> web.StreamResponse:
        return _json(self._status(session))

    @_api()
    async def api_knowledge(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = request.query.get("bot")
        bots = [self._bot(session, bot)] if bot else list(session.bots)
        bases = await self.admin.knowledge_status(bots)
        for b in bases:
            b["progress"] = self.admin.ingest_progress(b["name"])
        return _json({"knowledge": bases})

    @_api(write=True)
    async def api_ingest(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await self._fields(request)
        kb = form.get("kb", "")
        granted = {b.get("name") for b in await self.admin.knowledge_status(session.bots)}
        if kb not in self.config.knowledge:
            raise _Refused(404, "unknown_knowledge", f"no knowledge base {kb!r}")
        if kb not in granted:
            raise _Refused(403, "forbidden", f"knowledge base {kb!r} is not yours")
        self._need_admin(session)
        started = self.admin.reingest(kb)
        self.admin.audit_action(session.name, "reingest", knowledge=kb, started=started)
        if _is_form(request):
            notice = "reingest_started" if started else "reingest_running"
            return _redirect(f"{self.base}/knowledge?notice={notice}&kb={kb}")
        return _json({"kb": kb, "started": started}, status=202 if started else 409)

    @_api()
    async def api_conversations(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = request.query.get("bot")
        bots = [self._bot(session, bot)] if bot else list(session.bots)
        items = await self.admin.conversations(bots, request.query.get("platform") or None)
        return _json({"conversations": items})

    @_api()
    async def api_conversation(self, request: web.Request, session: Session) -> web.StreamResponse:
        thread = self._thread(session, request.query.get("id"))
        messages = await self.admin.conversation(thread)
        if not messages:
            raise _Refused(404, "not_found", "no such conversation (or it has expired)")
        return _json({"id": thread.redis_suffix(), "platform": thread.platform, "bot": thread.bot,
                      "chat": thread.chat, "thread": thread.thread, "messages": messages})

    @_api(write=True)
    async def api_delete_conversation(self, request: web.Request, session: Session) -> web.StreamResponse:
        fields = await self._fields(request)
        thread = self._thread(session, fields.get("id"))
        self._need_write(session)
        deleted = await self.admin.reset(thread)
        self.admin.audit_action(session.name, "delete_conversation", bot=thread.bot, conversation=str(thread),
                                  deleted=deleted)
        if _is_form(request):
            return _redirect(f"{self.base}/conversations?notice=deleted")
        return _json({"id": thread.redis_suffix(), "deleted": deleted})

    # -- knowledge: documents and search -----------------------------------------------------------

    def _kb(self, session: Session, kb: str, write: bool = False) -> str:
        """``kb`` if this user may see it (``write``: change its documents): 404 / 403 otherwise."""
        cfg = self.config
        if not kb or kb not in cfg.knowledge:
            raise _Refused(404, "unknown_knowledge", f"no knowledge base {kb!r}")
        if not any(kb in cfg.bots[b].knowledge for b in session.bots if b in cfg.bots):
            log.warning("console: a knowledge base outside the user's grants refused", user=session.name, kb=kb)
            raise _Refused(403, "forbidden", f"knowledge base {kb!r} is not yours")
        if write and not self._kb_writable(session, kb):
            raise _Refused(403, "forbidden", f"you may not change the documents of {kb!r}")
        return kb

    def _kb_writable(self, session: Session, kb: str) -> bool:
        """Admins change any base; a department user only a base no other department's bot reads."""
        if session.is_admin:
            return True
        if not session.can_write:
            return False
        readers = {name for name, bot in self.config.bots.items() if kb in bot.knowledge}
        return bool(readers) and readers <= set(session.bots)

    async def _search(self, session: Session, query: str, kb: str) -> list[dict[str, Any]]:
        query = query.strip()
        if not query or len(query) > 1000:
            raise _Refused(400, "invalid_query", "q: a question of 1 to 1000 characters")
        cfg = self.config
        kbs = [self._kb(session, kb)] if kb else sorted({k for b in session.bots if b in cfg.bots
                                                          for k in cfg.bots[b].knowledge if k in cfg.knowledge})
        hits = await self.admin.search_knowledge(kbs, query)
        self.admin.audit_action(session.name, "search", knowledge=kbs, chars=len(query), hits=len(hits))
        return hits

    @_api()
    async def api_search(self, request: web.Request, session: Session) -> web.StreamResponse:
        query = request.query.get("q", "")
        hits = await self._search(session, query, request.query.get("kb", ""))
        return _json({"query": query, "hits": hits})

    @_api(write=True)
    async def api_upload(self, request: web.Request, session: Session) -> web.StreamResponse:
        if request.content_type != "multipart/form-data":
            raise _Refused(415, "not_multipart", "send the file as multipart/form-data (field 'file')")
        form = await request.post()
        kb = self._kb(session, str(form.get("kb", "")), write=True)
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            raise _Refused(400, "no_file", "file: no file was sent")
        name = unicodedata.normalize("NFC", str(form.get("name") or upload.filename or "")).strip()
        # A client may percent-encode the name (RFC 7578): the decoded form must be as plain.
        if not _UPLOAD_NAME.match(name) or not _UPLOAD_NAME.match(urllib.parse.unquote(name)) \
                or name.startswith("."):
            raise _Refused(400, "invalid_name", "the file name may not hold a path, start with '.', or hold "
                                                "control characters")
        suffix = Path(name).suffix.lower()
        if suffix not in UPLOAD_TYPES:
            raise _Refused(415, "unsupported_type", f"a knowledge base reads {', '.join(UPLOAD_TYPES)} files")
        data = upload.file.read(self.config.server.max_body_bytes + 1)
        if not data:
            raise _Refused(400, "empty_file", "the file is empty")
        if len(data) > self.config.server.max_body_bytes:
            raise _Refused(413, "too_large", f"a document may have {self.config.server.max_body_bytes} bytes")
        if not _looks_like(suffix, data):
            raise _Refused(415, "wrong_content", f"the file's content is not a {suffix} document")
        folder = self.admin.knowledge_folder(kb)
        if folder is None:
            raise _Refused(409, "no_folder", f"{kb!r} has no folder to upload into (only files are configured)")
        replace = str(form.get("replace", "")) in ("1", "true", "on")
        try:
            written = await asyncio.to_thread(_write_atomically, Path(folder), name, data, replace)
        except OSError as exc:
            log.error("console upload failed", kb=kb, file=name, error=str(exc))
            raise _Refused(500, "write_failed", "the file could not be written; see the daemon's log") from None
        if not written:
            raise _Refused(409, "exists", f"{name!r} exists in {kb!r}; send replace=1 to overwrite it")
        started = self.admin.reingest(kb)
        self.admin.audit_action(session.name, "upload_document", knowledge=kb, document=name, bytes=len(data),
                                  reingest=started)
        if _is_form(request) and request.headers.get("Accept", "").find("json") < 0:
            return _redirect(f"{self.base}/knowledge?notice=uploaded&kb={kb}")
        return _json({"kb": kb, "document": name, "bytes": len(data), "reingest": started}, status=201)

    @_api(write=True)
    async def api_delete_document(self, request: web.Request, session: Session) -> web.StreamResponse:
        fields = await self._fields(request)
        kb = self._kb(session, fields.get("kb", ""), write=True)
        source = fields.get("source", "")
        path = await asyncio.to_thread(self.admin.knowledge_document, kb, source) if source else None
        if path is None:
            raise _Refused(404, "unknown_document", f"no document {source!r} in {kb!r}")
        try:
            await asyncio.to_thread(os.unlink, path)
        except FileNotFoundError:
            raise _Refused(404, "unknown_document", f"no document {source!r} in {kb!r}") from None
        started = self.admin.reingest(kb)
        self.admin.audit_action(session.name, "delete_document", knowledge=kb, document=source, reingest=started)
        if _is_form(request):
            return _redirect(f"{self.base}/knowledge?notice=document_deleted&kb={kb}")
        return _json({"kb": kb, "document": source, "deleted": True, "reingest": started})

    # -- config ----------------------------------------------------------------------------------------

    def _masked_config(self) -> dict[str, Any]:
        """The running config as JSON, every secret reference (found by type), password hash and
        password in a URL replaced by a mask; a secret's value is never resolved here."""
        cfg = self.config
        secret_keys = {key for key, _ref, _form in secret_references(cfg)}
        return cast(dict[str, Any], _mask(cfg, "", secret_keys))

    @_api()
    async def api_config(self, request: web.Request, session: Session) -> web.StreamResponse:
        self._need_admin(session)
        return _json({"config": self._masked_config()})

    @_api(write=True)
    async def api_reload(self, request: web.Request, session: Session) -> web.StreamResponse:
        self._need_admin(session)
        result = await self.admin.reload_config(timeout_s=30.0)
        outcome = {True: "applied", False: "refused", None: "pending"}[result]
        self.admin.audit_action(session.name, "reload_config", outcome=outcome)
        if _is_form(request):
            return _redirect(f"{self.base}/config?notice=reload_{outcome}")
        return _json({"reload": outcome}, status={"applied": 200, "refused": 422, "pending": 202}[outcome])

    # -- audit ---------------------------------------------------------------------------------------

    async def _audit_lines(self, request: web.Request, session: Session) -> list[dict[str, Any]] | None:
        bot = request.query.get("bot") or None
        day = request.query.get("day", "")
        if day and not re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", day):
            raise _Refused(400, "invalid_day", "day: YYYY-MM-DD")
        most = 50_000 if request.path.endswith(".csv") else 1000
        try:
            limit = max(1, min(most, int(request.query.get("limit", "200" if most == 1000 else str(most)))))
        except ValueError:
            raise _Refused(400, "invalid_limit", "limit: a number") from None
        # Admins see every line (console actions included); others only lines about their bots.
        bots: list[str] | None = [self._bot(session, bot)] if bot else (None if session.is_admin else
                                                                         list(session.bots))
        return await self.admin.audit_tail(bots, user=request.query.get("user", "")[:200], day=day, limit=limit)

    @_api()
    async def api_audit(self, request: web.Request, session: Session) -> web.StreamResponse:
        lines = await self._audit_lines(request, session)
        return _json({"enabled": lines is not None, "lines": lines or []})

    @_api()
    async def api_audit_csv(self, request: web.Request, session: Session) -> web.StreamResponse:
        lines = await self._audit_lines(request, session)
        if lines is None:
            raise _Refused(404, "no_audit_log", "no audit log is configured ([audit] file)")
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow((*CSV_COLUMNS, "details"))
        for line in lines:
            rest = {k: v for k, v in line.items() if k not in CSV_COLUMNS}
            w.writerow([_cell(line.get(c)) for c in CSV_COLUMNS] + [_cell(rest) if rest else ""])
        self.admin.audit_action(session.name, "audit_export", lines=len(lines),
                                  **{k: request.query[k] for k in ("bot", "user", "day") if request.query.get(k)})
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return web.Response(body=(BOM + out.getvalue()).encode(), headers={
            **_SECURITY_HEADERS, "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="botd-audit-{stamp}.csv"'})

    async def _fields(self, request: web.Request) -> dict[str, str]:
        if _is_form(request):
            form = await request.post()
            return {k: v for k, v in form.items() if isinstance(v, str)}
        body = await _json_object(request, "a JSON object or a form")
        return {k: v for k, v in body.items() if isinstance(v, str)}

    # -- assets --------------------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = self.assets.get(name)
        if body is None:
            raise web.HTTPNotFound(text="no such file")
        return web.Response(body=body, content_type=_STATIC_TYPES[Path(name).suffix],
                            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})


# The quality pages' handlers, behind the same login checks as every page and endpoint here.
for _name, _check in QUALITY_HANDLERS.items():
    _handler = cast(Handler, getattr(QualityPages, _name))
    setattr(WebConsoleConnector, _name, _page(_handler) if _check == "page" else _api(_check == "write")(_handler))


CSV_COLUMNS = ("ts", "platform", "user", "bot", "action", "finish", "question", "answer", "tokens_in", "tokens_out",
               "latency_ms")


def _looks_like(suffix: str, data: bytes) -> bool:
    magic = UPLOAD_TYPES[suffix]
    if magic:
        return data.startswith(magic)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\x00" not in text


def _write_atomically(folder: Path, name: str, data: bytes, replace: bool) -> bool:
    """``folder/name`` := ``data``, all or nothing: a hidden temporary file in the same folder
    (ingestion skips it), fsync, rename. False when the file exists and ``replace`` is not set."""
    target = folder / name
    if target.parent.resolve() != folder.resolve() or target.is_symlink():
        raise ValueError("the file name leaves the knowledge base's folder")
    if target.exists() and not replace:
        return False
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")


def _mask(value: Any, key: str, secret_keys: set[str]) -> Any:
    """A config value as JSON, walked with the dotted keys :func:`secret_references` uses."""
    if key in secret_keys:
        return MASK if value is not None else None
    if isinstance(value, BaseModel):
        return {name: _mask(getattr(value, name), f"{key}.{name}" if key else name, secret_keys)
                for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _mask(v, f"{key}.{k}", secret_keys) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, f"{key}[{i}]", secret_keys) for i, v in enumerate(value)]
    if key.endswith(("password_hash", "password")) and value:
        return MASK
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return str(value)


def _redirect(location: str, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={**_SECURITY_HEADERS, "Location": location})


def _is_form(request: web.Request) -> bool:
    return request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")


async def _json_object(request: web.Request, what: str = "a JSON object") -> dict[str, Any]:
    """The request's JSON body, an object: else a 400 that says to send ``what``."""
    try:
        body = await request.json()
    except ValueError:
        raise _Refused(400, "invalid_json", f"send {what}") from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_json", "send a JSON object")
    return body


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _password_tag(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
