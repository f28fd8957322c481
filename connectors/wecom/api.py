"""WeCom's server API as botd uses it: gettoken (cached in Redis, shared by every daemon),
message/send and user/get, with WeCom's error codes explained for the log.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import structlog

from connectors.download import READ_TIMEOUT_S, read_capped
from connectors.markdown import neutral_links
from connectors.reply import AttachmentUnavailable
from connectors.wecom.config import WecomConfig
from core.errors import BotdError
from core.kv import KeyValueCache
from core.redis_store import StoreUnavailable
from core.secrets import remember_secret

log = structlog.get_logger("botd.wecom")

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


class WeComApiError(BotdError, RuntimeError):
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

    @property
    def part_limit(self) -> int:
        """The longest message, in UTF-8 bytes: 2048 for text, 4096 for markdown."""
        return 4096 if self.cfg.reply_format == "markdown" else 2048

    async def send(self, user: str, part: str) -> None:
        """Send one message of at most :attr:`part_limit` bytes to ``user``."""
        payload: dict[str, Any] = {
            "touser": user,
            "agentid": self.cfg.agent_id,
            # WeCom drops a repeat of the same content within the interval: a retry after
            # a timeout whose first try did arrive does not reach the user twice.
            "enable_duplicate_check": 1,
            "duplicate_check_interval": 1800,
        }
        if self.cfg.reply_format == "markdown":
            # Model output: no link may carry markup out of its URL or label.
            payload |= {"msgtype": "markdown", "markdown": {"content": neutral_links(part)}}
        else:
            payload |= {"msgtype": "text", "text": {"content": part}}
        await self._call("POST", "/cgi-bin/message/send", json=payload)

    async def download_media(self, media_id: str, max_bytes: int) -> bytes:
        """A temporary media file (a picture, voice message or file a user sent; WeCom keeps it
        3 days) from ``media/get``, read capped. WeCom answers an error as JSON with an errcode
        instead of the file; a token it refuses is fetched again once."""
        for attempt in (0, 1):
            try:
                token = await self.access_token()
                async with self._session.get(
                        self.cfg.api_base + "/cgi-bin/media/get", params={"access_token": token, "media_id": media_id},
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)) as r:
                    data = await read_capped(r, max_bytes, "wecom media")
                    is_json = r.content_type in ("application/json", "text/plain")
            except WeComApiError as exc:
                raise AttachmentUnavailable(f"wecom media: no access token ({exc})") from None
            except (aiohttp.ClientError, TimeoutError) as exc:  # the URL carries the token: its type only
                raise AttachmentUnavailable(f"wecom media: no answer ({type(exc).__name__})") from None
            if not is_json:
                return data
            try:
                code = int(json.loads(data).get("errcode", -1))
            except (ValueError, AttributeError):
                return data  # a text file the user sent, not an error
            if code in _TOKEN_ERRORS and attempt == 0:
                self._local = None
                await self._forget_token(token)
                continue
            raise AttachmentUnavailable(f"wecom media/get refused it: errcode {code} ({errcode_meaning(code)})")
        raise AttachmentUnavailable("wecom media: the access token was refused twice")

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


