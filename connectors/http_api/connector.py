"""The HTTP API connector: an OpenAI-compatible chat API and the simple ``/chat`` shape.

Routes:

- ``POST /v1/chat/completions``  OpenAI chat completions, plain or ``stream: true``
  (server-sent events). ``conversation_id`` in the body (or ``X-Conversation-Id``)
  keeps the history server-side: only the last user message is new. Without it
  the call is stateless and the client's messages are the history.
- ``POST /chat``  ``{"query", "history"}`` -> ``{"response", "history"}``, the shape
  local-deployment guides use.
- ``GET /v1/models``, ``GET|DELETE /v1/conversations/{id}``.

Auth: ``Authorization: Bearer <key>`` against ``[api] keys`` (constant-time compare),
or a JWT issued by ``botd token issue`` (signed with ``[console] signing_key``, checked
against the deny-list of ``botd token revoke``), which may use only the bots it names.
Conversations are namespaced by the key (or the token's user) that created them, so one
key can never read another key's history.

A caller without a credential ("anonymous") may use the bots named in ``[api]
anonymous_bots``; besides them, when no keys are configured, a local caller (loopback, not
forwarded by a proxy) may use the bots that read no knowledge base. Anonymous requests
must name this server in ``Host`` (DNS rebinding), and every POST must be
``application/json`` (a web page cannot send that cross-site without a preflight).

Outcomes: an answer that did not complete (:class:`~core.messages.Finish` ``busy``,
``shutdown``, ``cancelled``, ``error``) is never reported as ``finish_reason: "stop"``.
Before the first token it is an HTTP error (503 + ``Retry-After``, or 500), in both
modes; once a stream has started, an SSE error event with the same code.

Hostile input is refused at the edge with a 4xx: JSON nested too deeply, strings that
are not Unicode text (lone surrogates), malformed conversation ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors.base import Connector, Route, Service
from connectors.http_api import parts
from connectors.http_api.config import ApiConfig
from connectors.http_status import finish_outcome, outcome_of, unavailable
from connectors.server import REQUEST_ID, json_error
from connectors.signing import SigningKeySection
from core import toolcalls
from core.auth import API_AUDIENCE, AuthError, DenyList, Tokens, looks_like_jwt
from core.config import Settings
from core.dispatch import Answer, Busy, Rejected
from core.kv import KeyValueCache
from core.messages import Attachment, ChatTurn, Finish, InboundMessage, ReplyEvent, ThreadKey
from core.redis_store import StoreUnavailable
from core.schema_limits import SchemaLimitError
from core.secrets import resolve_secret

log = structlog.get_logger("botd.api")

PLATFORM = "api"
# The OpenAI finish_reason of a complete answer; a timeout is documented as "length" (job_timeout_s).
_FINISH = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.TIMEOUT: "length"}
# Deeper JSON than any real request needs; refused before anything walks it recursively.
MAX_JSON_DEPTH = 64
MAX_ID_CHARS = 200
# The bots a JWT bearer token may use (absent for API keys: every bot the API serves).
TOKEN_BOTS = web.RequestKey("token_bots", tuple)
# Headers a reverse proxy adds: a request carrying one is not taken for a local caller.
_FORWARDED = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP", "Via")
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_TOKEN_USER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# -- edge checks -------------------------------------------------------------------------


def _is_text(value: str) -> bool:
    """False for strings that are not Unicode text: lone surrogates (JSON escapes like
    ``"\\ud800"``, or undecodable header bytes) cannot be encoded, stored or rendered."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a conversation id, or None. The same rule for the body field,
    the X-Conversation-Id header and the URL path: ids end up in Redis keys and logs."""
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_CHARS:
        return f"must be at most {MAX_ID_CHARS} characters"
    if not _is_text(value):
        return "must be valid UTF-8 text"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return "must not hold control characters"
    return None


def _check_id(value: str) -> str:
    problem = _id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


ConversationId = Annotated[str, AfterValidator(_check_id)]


def _check_tree(data: Any) -> None:
    """Walk the parsed body without recursion: bound its depth, refuse non-text strings."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not _is_text(node):
                raise _BadRequest(400, "invalid_request",
                                  "the body holds a string that is not valid Unicode text (a lone surrogate)")
        elif isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _BadRequest(400, "invalid_json", f"the body is nested too deeply (over {MAX_JSON_DEPTH} levels)")
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((item, depth + 1) for item in items)


# -- request bodies ----------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", str_max_length=1_000_000)


# text, image_url, file and input_audio parts (connectors/http_api/parts.py)
ContentPart = parts.ContentPart


_TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ApiFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=_TOOL_NAME)]
    description: Annotated[str, Field(max_length=4096)] = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ApiTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: ApiFunction


class ApiCalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, Field(pattern=_TOOL_NAME)]
    arguments: str = "{}"


class ApiToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, Field(max_length=256)] = ""
    type: Literal["function"] = "function"
    function: ApiCalledFunction


class ApiToolChoiceFunction(BaseModel):
    name: Annotated[str, Field(pattern=_TOOL_NAME)]


class ApiToolChoice(BaseModel):
    type: Literal["function"]
    function: ApiToolChoiceFunction


class ApiMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant turn that made tool calls.
    content: str | list[ContentPart] | None = None
    tool_calls: list[ApiToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, parts.TextPart))

    def as_dict(self) -> dict[str, Any]:
        """The message as the engine renders it (core/toolcalls.py)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionBody(_Body):
    model: str | None = None
    messages: list[ApiMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = Field(default=None, max_length=256)
    conversation_id: ConversationId | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    tools: Annotated[list[ApiTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ApiToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v


class SimpleChatBody(_Body):
    query: str = Field(min_length=1)
    history: list[tuple[str, str]] | list[ApiMessage] | None = None
    bot: str | None = None
    conversation_id: ConversationId | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    user: str | None = Field(default=None, max_length=256)


def _explain(err: ValidationError) -> str:
    out = []
    for e in err.errors()[:5]:
        loc = ""
        for p in e["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else (f".{p}" if loc else str(p))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "is required"
        out.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(out)


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None

    def sse(self) -> bytes:
        """The same error as a server-sent event, for a stream whose status is already sent."""
        kind = "overloaded_error" if self.status == 503 else "server_error"
        err = {"error": {"message": self.message, "type": kind, "code": self.code}}
        return b"data: " + _dumps(err).encode() + b"\n\n"


def _authed(
    handler: Callable[[HttpApiConnector, web.Request, str], Awaitable[web.StreamResponse]],
) -> Callable[[HttpApiConnector, web.Request], Awaitable[web.StreamResponse]]:
    """The key is checked before anything else; the outcomes that are not an answer become
    their HTTP status here, once for every endpoint."""

    async def wrapped(self: HttpApiConnector, request: web.Request) -> web.StreamResponse:
        # JSON only: a web page can POST text/plain or a form to any address without asking
        # first (no CORS preflight); application/json it cannot.
        if request.method == "POST" and request.content_type != "application/json":
            return json_error(415, f"send JSON with Content-Type: application/json, not {request.content_type}",
                              "unsupported_media_type")
        try:
            ident = await self._identity(request)
        except _BadRequest as exc:
            return json_error(exc.status, exc.message, exc.code, headers=exc.headers())
        except StoreUnavailable:
            o = unavailable("redis is unreachable: the token cannot be checked against the revocations")
            return json_error(o.status, o.message, o.code, headers=o.headers)
        if ident is None:
            return json_error(
                401, "missing or invalid API key (send Authorization: Bearer <key>)", "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            return await handler(self, request, ident)
        except _BadRequest as exc:
            return json_error(exc.status, exc.message, exc.code, headers=exc.headers())
        except (Rejected, Busy) as exc:
            refused = outcome_of(exc)
            assert refused is not None
            return json_error(refused.status, refused.message, refused.code, headers=refused.headers)

    return wrapped


class HttpApiConnector(Connector):
    name = "http_api"
    # API JWTs are signed with [console] signing_key: a new key (even behind the same
    # reference) rebuilds this connector at the reload, so the old tokens stop working.
    secret_sections = ("console",)

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.api = ApiConfig.of(self.config)
        # (key, identity): the identity is a short hash, used to namespace conversations.
        self._keys = [
            (k, hashlib.sha256(k.encode()).hexdigest()[:12]) for k in (resolve_secret(r) for r in self.api.keys)
        ]
        signing_key = SigningKeySection.of(self.config).signing_key
        self._tokens = Tokens(resolve_secret(signing_key)) if signing_key else None
        self._denied = DenyList(cache)
        server = self.config.server
        self._hosts = _LOCAL_HOSTS | {_host_name(h) for h in (server.host, *self.api.allowed_hosts)}

    async def start(self) -> None:
        if self.api.anonymous_bots:
            log.warning("the HTTP API answers callers without a credential, from anywhere, for these bots "
                        "(their knowledge bases included): [api] anonymous_bots", bots=self.api.anonymous_bots)

    def routes(self) -> list[Route]:
        return [
            ("POST", "/v1/chat/completions", "chat_completions"),
            ("POST", "/chat", "simple_chat"),
            ("GET", "/v1/models", "models"),
            ("GET", "/v1/conversations/{cid}", "get_conversation"),
            ("DELETE", "/v1/conversations/{cid}", "delete_conversation"),
        ]

    # -- auth ----------------------------------------------------------------------------

    async def _identity(self, request: web.Request) -> str | None:
        """The caller's key identity ("local" for a caller without a credential), None if refused.

        A wrong key or token is refused, not taken for no credential. With no keys configured, a
        bearer that is not a JWT counts as none (OpenAI clients always send some key)."""
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        bearer = scheme.lower() == "bearer" and bool(given)
        if self._tokens is not None and bearer and looks_like_jwt(given):
            token_ident = await self._token_identity(request, given)
            if token_ident is not None or not self._keys:
                return token_ident
        if self._keys and bearer:
            found = None
            for key, ident in self._keys:  # compare against every key: no early exit to time
                # An undecodable header (lone surrogates) cannot equal a key: compare its bytes.
                if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode()):
                    found = ident
            return found
        return self._anonymous(request)

    async def credentialed(self, request: web.Request) -> bool:
        """Whether the request carries a valid API key or token (for /healthz and /metrics)."""
        try:
            return await self._identity(request) not in (None, "local")
        except (_BadRequest, StoreUnavailable):
            return False

    def _anonymous(self, request: web.Request) -> str | None:
        """A caller without a credential: "local" scoped to the bots it may use, or None (401)."""
        host = request.headers.get("Host")
        if host is not None and not self._host_ok(host):
            # DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name.
            raise _BadRequest(421, "misdirected_request",
                              f"Host {host[:100]!r} is not a name this server answers to without a credential: "
                              "send an API key, or add the name to [api] allowed_hosts")
        bots = [b for b in self.api.anonymous_bots if b in self.service.bot_names()]
        if not self._keys and self._local(request):
            # The quick start: chat from this machine with no key, but never with a bot that
            # reads knowledge (a proxy on this machine forwards from loopback too).
            bots += [b for b in self.service.bot_names()
                     if b not in bots and (bc := self.config.bots.get(b)) is not None and not bc.knowledge]
        if not bots:
            return None
        request[TOKEN_BOTS] = tuple(bots)
        return "local"

    def _host_ok(self, host: str) -> bool:
        name = _host_name(host)
        if name in self._hosts:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @staticmethod
    def _local(request: web.Request) -> bool:
        """From this machine and not forwarded by a reverse proxy (whose headers it carries)."""
        if any(h in request.headers for h in _FORWARDED):
            return False
        try:
            return ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            return False

    async def _token_identity(self, request: web.Request, token: str) -> str | None:
        """A JWT bearer token: its user is the identity ("jwt.<user>"); its bots bound the request."""
        assert self._tokens is not None
        try:
            claims = self._tokens.decode(token, API_AUDIENCE)
        except AuthError as exc:
            log.info("API token refused", reason=exc.reason)
            return None
        bots = claims.get("bots")
        if not isinstance(bots, list) or not all(isinstance(b, str) for b in bots) \
                or not _TOKEN_USER.match(claims["sub"]):
            return None
        if await self._denied.revoked(claims["jti"]):  # `botd token revoke`
            log.info("API token refused", reason="revoked", user=claims["sub"])
            return None
        request[TOKEN_BOTS] = tuple(bots)
        return f"jwt.{claims['sub']}"

    # -- helpers -------------------------------------------------------------------------

    async def _read_json(self, request: web.Request, model: type[BaseModel]) -> Any:
        # The Content-Type (application/json only) was checked in _authed, before the caller.
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _BadRequest(413, "body_too_large", f"the body exceeds {self.config.server.max_body_bytes} bytes") \
                from None
        if not raw.strip():
            raise _BadRequest(400, "empty_body", "the request body is empty; send a JSON object")
        try:
            data = json.loads(raw)
        except RecursionError:  # json's C scanner recurses once per level
            raise _BadRequest(400, "invalid_json", "the body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _BadRequest(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        _check_tree(data)
        if not isinstance(data, dict):
            raise _BadRequest(400, "invalid_body", "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise _BadRequest(400, "invalid_request", _explain(err)) from None

    def _bots(self, request: web.Request | None = None) -> list[str]:
        """The bots this API may address: [api] bots, or every bot when that list is empty; for a
        JWT bearer token, only those of them the token names."""
        allowed = self.api.bots
        token_bots = request.get(TOKEN_BOTS) if request is not None else None
        return [b for b in self.service.bot_names()
                if (not allowed or b in allowed) and (token_bots is None or b in token_bots)]

    def _default_bot(self, request: web.Request) -> str:
        """[api] default_bot, or for a token that may not use it, the first bot the token names."""
        bots = self._bots(request)
        if request.get(TOKEN_BOTS) is None or self.api.default_bot in bots:
            return self.api.default_bot
        if not bots:
            raise _BadRequest(403, "no_bot", "this credential may use no bot this API serves")
        return next(b for b in request[TOKEN_BOTS] if b in bots)

    def _bot_for_model(self, model: str | None, request: web.Request) -> str:
        if model is None or model == self.service.model_name:
            return self._default_bot(request)
        if model in self._bots(request):
            return model
        names = [self.service.model_name, *self._bots(request)]
        raise _BadRequest(404, "model_not_found", f"unknown model {model!r}; available: {', '.join(names)}")

    def _check_budget(self, max_tokens: int | None) -> None:
        if max_tokens is not None and max_tokens >= self.service.n_ctx:
            raise _BadRequest(
                400, "invalid_request",
                f"max_tokens: {max_tokens} does not fit the model's context of {self.service.n_ctx} tokens",
            )

    def _user(self, request: web.Request, ident: str, user: str | None) -> str:
        return f"{ident}:{user}" if user else f"{ident}:{request.remote or 'unknown'}"

    @staticmethod
    def _principal(request: web.Request, ident: str) -> str:
        """Whose limits a request counts against: the key or token; for an anonymous caller its
        address. Never the body's ``user`` (a fresh one per request would be a fresh quota)."""
        return f"{ident}@{request.remote or 'unknown'}" if ident == "local" else ident

    def _header_cid(self, request: web.Request) -> str | None:
        value = request.headers.get("X-Conversation-Id")
        if not value:  # absent or empty: a stateless call, as before
            return None
        problem = _id_problem(value)
        if problem:
            raise _BadRequest(400, "invalid_request", f"X-Conversation-Id: {problem}")
        return value

    def _failure(self, ev: ReplyEvent) -> _BadRequest | None:
        """The HTTP error for a final event whose answer did not complete; None if it did."""
        o = finish_outcome(ev, self.config.queue.retry_after_s)
        return None if o is None else _BadRequest(o.status, o.code, o.message, o.retry_after)

    # -- POST /v1/chat/completions -----------------------------------------------------------

    @staticmethod
    def _parts(last: ApiMessage, cid: str | None) -> tuple[list[Attachment], parts.Download]:
        """The pictures, files and sounds of the last user message (earlier messages' parts are the
        client's own history: not read again)."""
        content = last.content if last.role == "user" and isinstance(last.content, list) else []
        try:
            found, download = parts.attachments_of(content)
        except parts.PartRefused as exc:
            raise _BadRequest(400, "invalid_content", str(exc)) from None
        if cid is None and any(a.kind == "file" for a in found):
            # A file becomes its conversation's knowledge for the next turns: it needs one.
            raise _BadRequest(400, "invalid_content", "a file becomes its conversation's knowledge: send it with "
                                                      "a conversation_id")
        return found, download

    @_authed
    async def chat_completions(self, request: web.Request, ident: str) -> web.StreamResponse:
        body: ChatCompletionBody = await self._read_json(request, ChatCompletionBody)
        bot = self._bot_for_model(body.model, request)
        max_tokens = body.max_completion_tokens or body.max_tokens
        self._check_budget(max_tokens)
        last = body.messages[-1]
        tools, choice = await self._tools(body)
        with_tools = tools is not None or any(m.role == "tool" or m.tool_calls for m in body.messages)
        if last.role != "user" and not (with_tools and last.role == "tool"):
            raise _BadRequest(400, "invalid_request", "messages: the last message must have role 'user'"
                              " (or 'tool', answering the assistant's tool calls)")
        system_parts = [m.text() for m in body.messages if m.role in ("system", "developer")]
        system = "\n\n".join(system_parts) if system_parts else None
        cid = self._header_cid(request)
        cid = body.conversation_id or cid
        if cid is not None and with_tools:
            raise _BadRequest(400, "invalid_request", "tools and tool messages need the client's own history: "
                              "send the whole conversation without conversation_id")
        history: list[ChatTurn] | None = None
        if cid is None:
            history = [ChatTurn(m.role, m.text()) for m in body.messages[:-1] if m.role in ("user", "assistant")]
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        attachments, download = self._parts(last, cid)
        msg = InboundMessage(
            platform=PLATFORM, bot=bot, chat=f"{ident}/{cid}" if cid else f"{ident}/-",
            user=self._user(request, ident, body.user), principal=self._principal(request, ident),
            text=last.text(), history=history,
            system=system, max_tokens=max_tokens, temperature=body.temperature,
            request_id=request[REQUEST_ID], stop=tuple(stops),
            tools=tools, tool_choice=choice,
            messages=[m.as_dict() for m in body.messages if m.role not in ("system", "developer")]
            if with_tools else None, attachments=attachments,
        )
        answer = await (self.service.dispatch(msg, download) if attachments else self.service.dispatch(msg))
        # The model that answers (a bot may use a [models.NAME] of its own), not the name asked for.
        model_name = self.service.answered_by(answer) or body.model or self.service.model_name
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if body.stream:
            return await self._stream_completion(request, answer, model_name, cid, include_usage, bool(tools))
        final = await self._collect(answer)
        message: dict[str, Any] = {"role": "assistant", "content": final.text}
        finish = _FINISH[Finish(final.finish_reason or Finish.STOP)]
        if tools:
            content, calls = toolcalls.parse(final.text)
            if calls:
                message = {"role": "assistant", "content": content or None,
                           "tool_calls": [c.openai() for c in calls]}
                finish = "tool_calls"
        payload = {
            "id": f"chatcmpl-{answer.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": _usage(final),
        }
        if cid:
            payload["conversation_id"] = cid
        if final.sources:
            payload["sources"] = list(final.sources)
        return web.json_response(payload, dumps=_dumps)

    async def _tools(self, body: ChatCompletionBody) -> tuple[list[dict[str, Any]] | None, str]:
        """The client's tools in OpenAI's format and its choice; a schema over a limit
        (core/schema_limits.py), one the grammar cannot follow, or a choice naming no tool, is
        the client's error (400). The grammar is built off the loop, and kept for the answer."""
        choice = body.tool_choice
        name = choice.function.name if isinstance(choice, ApiToolChoice) else (choice or "auto")
        if not body.tools or name == "none":
            if isinstance(choice, ApiToolChoice) or choice == "required":
                raise _BadRequest(400, "invalid_request", "tool_choice: no tools given")
            return None, "none"
        tools = [t.model_dump() for t in body.tools]
        names = toolcalls.tool_names(tools)
        if len(set(names)) != len(names):
            raise _BadRequest(400, "invalid_request", "tools: two tools have the same name")
        if isinstance(choice, ApiToolChoice) and name not in names:
            raise _BadRequest(400, "invalid_request", f"tool_choice: no tool named {name!r} in tools")
        try:
            await toolcalls.build_grammar(tools)
        except SchemaLimitError as exc:
            raise _BadRequest(400, "schema_limit_exceeded", str(exc)) from None
        except Exception as exc:  # the converter's own errors: unsupported schema keywords
            raise _BadRequest(400, "invalid_request", f"tools: a parameters schema cannot be followed: {exc}") from None
        return tools, name

    async def _collect(self, answer: Answer) -> ReplyEvent:
        """Wait for the whole answer; if the client goes away, aiohttp cancels us and we stop the job."""
        final: ReplyEvent | None = None
        try:
            async for ev in answer.events():
                if ev.done:
                    final = ev
        finally:
            if final is None:
                answer.cancel()
        assert final is not None
        failure = self._failure(final)
        if failure is not None:
            raise failure
        return final

    async def _stream_completion(
        self, request: web.Request, answer: Answer, model: str, cid: str | None, include_usage: bool,
        tools: bool = False,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "X-Request-Id": request[REQUEST_ID],
        })
        base = {"id": f"chatcmpl-{answer.id}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}
        if cid:
            base["conversation_id"] = cid

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return b"data: " + _dumps(obj).encode() + b"\n\n"

        # The per-token event is the same JSON each time but for the text: build it once.
        head, _, tail = chunk({"content": "\x00"}).decode().partition('"\\u0000"')

        def content_chunk(text: str) -> bytes:
            return (head + json.dumps(text, ensure_ascii=False) + tail).encode()

        events = aiter(answer.events())
        finished = False
        try:
            # The status line goes out with the first event, not before: an answer that ends
            # before any token (busy, shutdown, error) still gets its real HTTP status.
            ev = await anext(events)
            if ev.done:
                failure = self._failure(ev)
                if failure is not None:
                    finished = True
                    raise failure
            await resp.prepare(request)
            await resp.write(chunk({"role": "assistant", "content": ""}))
            # With tools, the start of the answer is held back until it shows whether it is a
            # tool call (sent whole, as OpenAI's ``tool_calls`` delta, at the end) or prose.
            held: str | None = "" if tools else None
            while not ev.done:
                if held is None:
                    await resp.write(content_chunk(ev.delta))
                else:
                    held += ev.delta
                    start = held.lstrip()
                    if not (toolcalls.OPEN.startswith(start) or start.startswith(toolcalls.OPEN)):
                        await resp.write(content_chunk(held))
                        held = None
                ev = await anext(events)
            finished = True
            failure = self._failure(ev)
            calls: list[toolcalls.ToolCall] = []
            if held and failure is None:
                content, calls = toolcalls.parse(held)
                if calls:
                    if content:
                        await resp.write(content_chunk(content))
                    await resp.write(chunk({"tool_calls": [c.openai(i) for i, c in enumerate(calls)]}))
                else:
                    await resp.write(content_chunk(held))
            if failure is not None:
                await resp.write(failure.sse())
            else:
                finish = "tool_calls" if calls else _FINISH[Finish(ev.finish_reason or Finish.STOP)]
                await resp.write(chunk({}, finish, usage=_usage(ev)))
                if include_usage:
                    await resp.write(b"data: " + _dumps({**base, "choices": [], "usage": _usage(ev)}).encode()
                                     + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            # The client closed the socket before aiohttp noticed and cancelled us: the same
            # event as a cancellation, not a server error. Nothing more can be written.
            log.info("client went away; generation stopped", request_id=request[REQUEST_ID])
        except asyncio.CancelledError:
            log.info("client went away; generation stopped", request_id=request[REQUEST_ID])
            raise
        finally:
            if not finished:
                answer.cancel()
        return resp

    # -- POST /chat ----------------------------------------------------------------------------

    @_authed
    async def simple_chat(self, request: web.Request, ident: str) -> web.StreamResponse:
        body: SimpleChatBody = await self._read_json(request, SimpleChatBody)
        bot = body.bot or self._default_bot(request)
        if bot not in self._bots(request):
            names = ", ".join(self._bots(request))
            raise _BadRequest(404, "unknown_bot", f"unknown bot {bot!r}; bots: {names}")
        self._check_budget(body.max_tokens)
        if body.conversation_id and body.history:
            raise _BadRequest(400, "invalid_request", "give either history or conversation_id, not both")
        pairs = body.history is not None and (not body.history or isinstance(body.history[0], tuple))
        history: list[ChatTurn] | None = None
        if not body.conversation_id:
            history = []
            for item in body.history or []:
                if isinstance(item, tuple):
                    history += [ChatTurn("user", item[0]), ChatTurn("assistant", item[1])]
                elif item.role in ("user", "assistant"):
                    history.append(ChatTurn(item.role, item.text()))
        cid = body.conversation_id
        msg = InboundMessage(
            platform=PLATFORM, bot=bot, chat=f"{ident}/{cid}" if cid else f"{ident}/-",
            user=self._user(request, ident, body.user), principal=self._principal(request, ident),
            text=body.query, history=history,
            max_tokens=body.max_tokens, temperature=body.temperature, request_id=request[REQUEST_ID],
        )
        t0 = time.monotonic()
        final = await self._collect(await self.service.dispatch(msg))
        out: dict[str, Any] = {
            "response": final.text,
            "finish_reason": _FINISH[Finish(final.finish_reason or Finish.STOP)],
            "usage": _usage(final),
            "time": round(time.monotonic() - t0, 3),
        }
        if final.sources:
            out["sources"] = list(final.sources)
        if history is not None:
            if pairs or body.history is None:
                out["history"] = [*[list(p) for p in (body.history or [])], [body.query, final.text]]
            else:
                out["history"] = [*(t.as_dict() for t in history),
                                  {"role": "user", "content": body.query},
                                  {"role": "assistant", "content": final.text}]
        else:
            out["conversation_id"] = cid
        return web.json_response(out, dumps=_dumps)

    # -- models and conversations ----------------------------------------------------------------

    @_authed
    async def models(self, request: web.Request, _ident: str) -> web.StreamResponse:
        names = [self.service.model_name, *self._bots(request)]
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "botd", "created": 0} for n in names]})

    def _conversation(self, request: web.Request, ident: str) -> ThreadKey:
        cid = request.match_info["cid"]
        problem = _id_problem(cid)
        if problem:
            raise _BadRequest(400, "invalid_request", f"conversation id: {problem}")
        bot = request.query["bot"] if "bot" in request.query else self._default_bot(request)
        if bot not in self._bots(request):
            # repr() escapes what could not be sent back as UTF-8 (undecodable bytes in the URL).
            raise _BadRequest(404, "unknown_bot", f"unknown bot {bot!r}")
        return ThreadKey(PLATFORM, bot, f"{ident}/{cid}", "")

    @_authed
    async def delete_conversation(self, request: web.Request, ident: str) -> web.StreamResponse:
        existed = await self.service.reset(self._conversation(request, ident))
        return web.json_response({"id": request.match_info["cid"], "deleted": existed})

    @_authed
    async def get_conversation(self, request: web.Request, ident: str) -> web.StreamResponse:
        turns = await self.service.history(self._conversation(request, ident))
        return web.json_response({"id": request.match_info["cid"], "messages": [t.as_dict() for t in turns]},
                                 dumps=_dumps)


def _host_name(host: str) -> str:
    """The name in a Host header (or a configured host): no port, no brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _usage(ev: ReplyEvent) -> dict[str, int]:
    u = ev.usage
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
