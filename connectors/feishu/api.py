"""Feishu / Lark's OpenAPI as botd uses it: the tenant access token (shared by the daemons of a
cluster through the connector's key-value cache, refreshed 10 minutes before it expires and
once more when Feishu calls it invalid), replies, card patches, CardKit card entities and the
contact API's department ids.

Every answer is ``{code, msg, data}``; a non-zero ``code`` becomes :class:`FeishuApiError`,
which says whether it means "slow down" and for how long (:attr:`FeishuApiError.retry_after`:
the gateway's 99991400 with its ``x-ogw-ratelimit-reset`` header, the message API's 230020,
CardKit's per-card limit), or "the token is bad" (99991661, 99991663). See
docs/protocols/feishu.md for each code's source.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import structlog

from connectors.access_token import SharedToken
from connectors.download import READ_TIMEOUT_S, read_capped
from connectors.feishu.config import FeishuConfig
from connectors.reply import AttachmentUnavailable
from core.errors import BotdError
from core.kv import KeyValueCache
from core.redis_store import StoreUnavailable
from core.secrets import remember_secret

log = structlog.get_logger("botd.feishu")

TOKEN_MARGIN_S = 600  # lark-oapi's own margin
GATEWAY_LIMIT = 99991400  # "request trigger frequency limit" (HTTP 429, x-ogw-ratelimit-reset)
_SLOW_DOWN = {230020: 1.0, 11232: 1.0}  # the message API's frequency limit; custom bots under load
BAD_TOKEN = {99991661, 99991663}


class FeishuApiError(BotdError):
    def __init__(self, status: int, code: int, msg: str, reset_s: float | None = None) -> None:
        super().__init__(f"Feishu HTTP {status} code {code}: {msg}"[:400])
        self.status = status
        self.code = code
        self.msg = msg
        self.reset_s = reset_s

    @property
    def retry_after(self) -> float | None:
        if self.code == GATEWAY_LIMIT or self.status == 429:
            return max(0.1, self.reset_s) if self.reset_s is not None else 1.0
        return _SLOW_DOWN.get(self.code)

    @property
    def bad_token(self) -> bool:
        return self.code in BAD_TOKEN


class FeishuApi:
    """The calls of one app (one ``[feishu.NAME]``)."""

    def __init__(self, cfg: FeishuConfig, secret: str, http: aiohttp.ClientSession, cache: KeyValueCache) -> None:
        self.cfg = cfg
        self._secret = secret
        self.http = http
        self.cache = cache
        self._shared = SharedToken(cache, f"feishu:token:{cfg.base}:{cfg.app_id}", self._fetch)
        # Feishu refused to create a card entity (no CardKit permission): patched cards until a restart.
        self.cardkit_refused = False

    @property
    def token_fetches(self) -> int:
        return self._shared.fetches

    async def token(self) -> str:
        return await self._shared.get()

    async def _drop(self, token: str) -> None:
        await self._shared.drop(token)

    async def _fetch(self) -> tuple[str, float]:
        async with self.http.post(f"{self.cfg.base}/open-apis/auth/v3/tenant_access_token/internal",
                                  json={"app_id": self.cfg.app_id, "app_secret": self._secret}) as r:
            data = await _json(r)
        token = str(data.get("tenant_access_token") or "")
        if data.get("code") or not token:
            raise FeishuApiError(r.status, int(data.get("code") or -1), str(data.get("msg", "no token")))
        remember_secret(token)  # before the log line below
        life = max(60.0, float(data.get("expire") or 7200) - TOKEN_MARGIN_S)
        log.info("feishu tenant token fetched", app=self.cfg.app_id, valid_s=int(life))
        return token, life

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   params: dict[str, str] | None = None) -> dict[str, Any]:
        """One call; the ``data`` of its answer. The token is fetched again once if Feishu refuses it."""
        for attempt in (0, 1):
            token = await self.token()
            async with self.http.request(method, f"{self.cfg.base}/open-apis{path}", json=body, params=params,
                                         headers={"Authorization": f"Bearer {token}"}) as r:
                data = await _json(r)
                reset = r.headers.get("x-ogw-ratelimit-reset")
            code = int(data.get("code") or 0) if data else (r.status if r.status >= 400 else 0)
            if not code:
                return dict(data.get("data") or {})
            err = FeishuApiError(r.status, code, str(data.get("msg", "")), _float(reset))
            if err.bad_token and attempt == 0:
                log.info("feishu tenant token refused; fetching a new one", app=self.cfg.app_id)
                await self._drop(token)
                continue
            raise err
        raise AssertionError("unreachable")

    # -- messages --------------------------------------------------------------------------------------

    async def reply(self, message_id: str, msg_type: str, content: dict[str, Any], uuid: str) -> str:
        """Reply to ``message_id``; the new message's id. The same ``uuid`` within an hour is sent once."""
        data = await self.call("POST", f"/im/v1/messages/{message_id}/reply", {
            "msg_type": msg_type, "content": json.dumps(content, ensure_ascii=False),
            "reply_in_thread": self.cfg.reply_in_thread, "uuid": uuid[:50]})
        return str(data.get("message_id", ""))

    async def patch(self, message_id: str, card: dict[str, Any]) -> None:
        await self.call("PATCH", f"/im/v1/messages/{message_id}", {"content": json.dumps(card, ensure_ascii=False)})

    # -- CardKit ------------------------------------------------------------------------------------------

    async def card_create(self, card: dict[str, Any]) -> str:
        data = await self.call("POST", "/cardkit/v1/cards", {"type": "card_json",
                                                             "data": json.dumps(card, ensure_ascii=False)})
        return str(data.get("card_id", ""))

    async def card_text(self, card_id: str, element_id: str, content: str, sequence: int, uuid: str) -> None:
        """The element shows ``content`` (the whole text: a grown text renders as typing)."""
        await self.call("PUT", f"/cardkit/v1/cards/{card_id}/elements/{element_id}/content",
                        {"content": content, "sequence": sequence, "uuid": uuid[:64]})

    async def card_settings(self, card_id: str, settings: dict[str, Any], sequence: int, uuid: str) -> None:
        await self.call("PATCH", f"/cardkit/v1/cards/{card_id}/settings",
                        {"settings": json.dumps(settings), "sequence": sequence, "uuid": uuid[:64]})

    async def card_append(self, card_id: str, elements: list[dict[str, Any]], sequence: int, uuid: str) -> None:
        """Elements added at the end of the card's body (the 👍 / 👎 buttons under an answer)."""
        await self.call("POST", f"/cardkit/v1/cards/{card_id}/elements",
                        {"type": "append", "elements": json.dumps(elements, ensure_ascii=False),
                         "sequence": sequence, "uuid": uuid[:64]})

    # -- what users send -----------------------------------------------------------------------------------

    async def download_resource(self, message_id: str, file_key: str, kind: str, max_bytes: int) -> bytes:
        """A picture, file or voice message of a user's message (im/v1 message resources,
        ``type=image`` or ``file``), read capped; the token is fetched again once if refused."""
        path = f"{self.cfg.base}/open-apis/im/v1/messages/{message_id}/resources/{file_key}"
        for attempt in (0, 1):
            try:
                token = await self.token()
            except (FeishuApiError, aiohttp.ClientError, TimeoutError) as exc:
                raise AttachmentUnavailable(f"feishu: no tenant token ({type(exc).__name__})") from None
            try:
                async with self.http.get(path, params={"type": kind}, headers={"Authorization": f"Bearer {token}"},
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                       sock_read=READ_TIMEOUT_S)) as r:
                    if r.content_type != "application/json":
                        return await read_capped(r, max_bytes, "feishu resource")
                    status = r.status
                    # An error is a short JSON body; a JSON file is read capped like any file.
                    body = await r.content.read(65536) if status >= 400 else await read_capped(
                        r, max_bytes, "feishu resource")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AttachmentUnavailable(f"feishu resource: no answer ({type(exc).__name__})") from None
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if not (isinstance(data, dict) and isinstance(data.get("code"), int) and data["code"] and "msg" in data):
                return body  # a JSON file the user sent, not an error
            err = FeishuApiError(status, int(data["code"]), str(data.get("msg", "")))
            if err.bad_token and attempt == 0:
                await self._drop(token)
                continue
            raise AttachmentUnavailable(f"feishu refused the resource: code {err.code} {err.msg}"[:200])
        raise AssertionError("unreachable")

    # -- contacts and the bot ------------------------------------------------------------------------------

    async def bot_open_id(self) -> str:
        data = await self._raw_get("/bot/v3/info")
        return str((data.get("bot") or {}).get("open_id", ""))

    async def _raw_get(self, path: str) -> dict[str, Any]:
        """A GET whose answer has no ``data`` envelope (``/bot/v3/info``)."""
        token = await self.token()
        async with self.http.get(f"{self.cfg.base}/open-apis{path}", headers={"Authorization": f"Bearer {token}"}) as r:
            data = await _json(r)
        if data.get("code"):
            raise FeishuApiError(r.status, int(data["code"]), str(data.get("msg", "")))
        return data

    async def departments(self, open_id: str) -> list[str]:
        """The user's open_department_ids (contact API), cached for ``department_ttl_s``."""
        key = f"feishu:dept:{self.cfg.app_id}:{open_id}"
        try:
            cached = await self.cache.get(key)
        except StoreUnavailable:
            cached = None
        if cached is not None:
            return [d for d in cached.split(",") if d]
        data = await self.call("GET", f"/contact/v3/users/{open_id}",
                               params={"user_id_type": "open_id", "department_id_type": "open_department_id"})
        depts = [str(d) for d in (data.get("user") or {}).get("department_ids") or []]
        try:
            await self.cache.set(key, ",".join(depts), self.cfg.department_ttl_s)
        except StoreUnavailable:
            pass
        return depts


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


async def _json(r: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = await r.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        data = None
    return data if isinstance(data, dict) else {}
