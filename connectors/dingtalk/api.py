"""DingTalk's OpenAPI as botd uses it: the app's access token (shared by the daemons of a
cluster through the connector's key-value cache, refreshed before it expires and once more
when DingTalk calls it invalid), robot sends, sessionWebhook replies, AI card streaming and
the contact API's department ids.

Errors come two ways (see docs/protocols/dingtalk.md): the new API (api.dingtalk.com) answers
HTTP 4xx/5xx with ``{code, message}``; the old API (oapi.dingtalk.com) and sessionWebhooks answer
HTTP 200 with a non-zero ``errcode``. Both become :class:`DingtalkApiError`, which says whether
it means "slow down" (:attr:`DingtalkApiError.retry_after`) or "the token is bad".
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import structlog

from connectors.access_token import SharedToken
from connectors.dingtalk.config import DingtalkConfig
from connectors.download import fetch
from connectors.reply import AttachmentUnavailable
from core.errors import BotdError
from core.kv import KeyValueCache
from core.redis_store import StoreUnavailable
from core.secrets import remember_secret

log = structlog.get_logger("botd.dingtalk")

# A token is refreshed this long before DingTalk says it expires (it lives 7,200 s).
TOKEN_MARGIN_S = 300
# New-API codes and old-API errcodes that mean "too many calls, wait about a second".
_QPS_CODES = {"Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "Forbidden.AccessDenied.QpsLimitForApi"}
_QPS_ERRCODES = {90018, 90002}
# A robot's sessionWebhook or send over its limit (20 messages a minute): errcode 130101.
_SEND_TOO_FAST = 130101
_BAD_TOKEN_CODES = {"InvalidAuthentication"}
_BAD_TOKEN_ERRCODES = {40014, 42001}


class DingtalkApiError(BotdError):
    """A DingTalk call refused: HTTP ``status``, and the new API's ``code`` or the old one's ``errcode``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"DingTalk HTTP {status} {code}: {message}"[:400])
        self.status = status
        self.code = code
        self.message = message

    @property
    def retry_after(self) -> float | None:
        if self.code in _QPS_CODES or (self.code.isdigit() and int(self.code) in _QPS_ERRCODES):
            return 1.0  # DingTalk's throttling lasts about a second
        if self.code == str(_SEND_TOO_FAST):
            return 3.0
        if self.status == 429:
            return 1.0
        return None

    @property
    def card_refused(self) -> bool:
        """A card call refused for good (no permission, unknown template), not "slow down"."""
        return self.status in (400, 403, 404) and self.retry_after is None and not self.bad_token

    @property
    def bad_token(self) -> bool:
        return (self.status == 401 or self.code in _BAD_TOKEN_CODES
                or (self.code.isdigit() and int(self.code) in _BAD_TOKEN_ERRCODES))


class DingtalkApi:
    """The calls of one robot (one ``[dingtalk.NAME]``)."""

    def __init__(self, cfg: DingtalkConfig, secret: str, http: aiohttp.ClientSession, cache: KeyValueCache) -> None:
        self.cfg = cfg
        self._secret = secret
        self.http = http
        self.cache = cache
        self._shared = SharedToken(cache, f"dingtalk:token:{cfg.client_id}", self._fetch)
        # DingTalk refused to create a card (permissions, template): markdown until a restart.
        self.cards_refused = False

    # -- the access token -----------------------------------------------------------------------------

    @property
    def token_fetches(self) -> int:
        return self._shared.fetches

    async def token(self) -> str:
        return await self._shared.get()

    async def _drop(self, token: str) -> None:
        await self._shared.drop(token)

    async def _fetch(self) -> tuple[str, float]:
        async with self.http.post(f"{self.cfg.api_base}/v1.0/oauth2/accessToken",
                                  json={"appKey": self.cfg.client_id, "appSecret": self._secret}) as r:
            data = await _json(r)
        token = str(data.get("accessToken") or "")
        if r.status >= 400 or not token:
            raise DingtalkApiError(r.status, str(data.get("code", "")), str(data.get("message", "no accessToken")))
        remember_secret(token)  # before the log line below
        life = max(60.0, float(data.get("expireIn") or 7200) - TOKEN_MARGIN_S)
        log.info("dingtalk access token fetched", robot=self.cfg.client_id, valid_s=int(life))
        return token, life

    # -- calls ----------------------------------------------------------------------------------------------

    async def call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A new-API call (api.dingtalk.com), with the token refreshed once if DingTalk calls it bad."""
        for attempt in (0, 1):
            token = await self.token()
            async with self.http.request(method, f"{self.cfg.api_base}{path}", json=body,
                                         headers={"x-acs-dingtalk-access-token": token}) as r:
                data = await _json(r)
            if r.status < 400:
                return data
            err = DingtalkApiError(r.status, str(data.get("code", "")), str(data.get("message", "")))
            if err.bad_token and attempt == 0:
                log.info("dingtalk access token refused; fetching a new one", robot=self.cfg.client_id)
                await self._drop(token)
                continue
            raise err
        raise AssertionError("unreachable")

    async def oapi(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """An old-API call (oapi.dingtalk.com): HTTP 200 with ``errcode``."""
        for attempt in (0, 1):
            token = await self.token()
            async with self.http.post(f"{self.cfg.oapi_base}{path}", params={"access_token": token},
                                      json=body) as r:
                data = await _json(r)
            code = int(data.get("errcode", 0) or 0) if r.status < 400 else r.status
            if not code:
                return data
            err = DingtalkApiError(r.status, str(data.get("errcode", code)), str(data.get("errmsg", "")))
            if err.bad_token and attempt == 0:
                await self._drop(token)
                continue
            raise err
        raise AssertionError("unreachable")

    async def webhook(self, url: str, payload: dict[str, Any]) -> None:
        """Post to a message's sessionWebhook (the URL is the credential: never logged)."""
        async with self.http.post(url, json=payload) as r:
            data = await _json(r)
        code = int(data.get("errcode", 0) or 0) if r.status < 400 else r.status
        if code:
            raise DingtalkApiError(r.status, str(data.get("errcode", code)), str(data.get("errmsg", "")))

    # -- robot sends ------------------------------------------------------------------------------------

    async def send_markdown(self, *, group: bool, conversation: str, user: str, title: str, text: str) -> None:
        """The robot's OpenAPI send, for when the message's sessionWebhook has expired."""
        body: dict[str, Any] = {"robotCode": self.cfg.robot, "msgKey": "sampleMarkdown",
                                "msgParam": json.dumps({"title": title, "text": text}, ensure_ascii=False)}
        if group:
            await self.call("POST", "/v1.0/robot/groupMessages/send", {**body, "openConversationId": conversation})
            return
        data = await self.call("POST", "/v1.0/robot/oToMessages/batchSend", {**body, "userIds": [user]})
        if user in (data.get("flowControlledStaffIdList") or []):
            # HTTP 200, yet not delivered: DingTalk held it back for flow control.
            raise DingtalkApiError(200, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "flow controlled")
        if user in (data.get("invalidStaffIdList") or []):
            raise DingtalkApiError(200, "invalidStaffId", "the user cannot be reached by this robot")

    # -- AI cards -----------------------------------------------------------------------------------------

    async def card_create(self, out_track_id: str, params: dict[str, str], *, group: bool, conversation: str,
                          user: str) -> None:
        body: dict[str, Any] = {"cardTemplateId": self.cfg.card_template_id, "outTrackId": out_track_id,
                                "cardData": {"cardParamMap": params}, "callbackType": "STREAM", "userIdType": 1}
        if group:
            body |= {"openSpaceId": f"dtv1.card//IM_GROUP.{conversation}",
                     "imGroupOpenSpaceModel": {"supportForward": True},
                     "imGroupOpenDeliverModel": {"robotCode": self.cfg.robot}}
        else:
            body |= {"openSpaceId": f"dtv1.card//IM_ROBOT.{user}",
                     "imRobotOpenSpaceModel": {"supportForward": True},
                     "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT"}}
        await self.call("POST", "/v1.0/card/instances/createAndDeliver", body)

    async def card_stream(self, out_track_id: str, content: str, *, finalize: bool = False) -> None:
        """The card's content variable shows ``content`` (the whole answer so far)."""
        await self.call("PUT", "/v1.0/card/streaming", {
            "outTrackId": out_track_id, "guid": uuid.uuid4().hex, "key": self.cfg.card_content_key,
            "content": content, "isFull": True, "isFinalize": finalize, "isError": False})

    async def card_update(self, out_track_id: str, params: dict[str, str]) -> None:
        await self.call("PUT", "/v1.0/card/instances", {
            "outTrackId": out_track_id, "cardData": {"cardParamMap": params},
            "cardUpdateOptions": {"updateCardDataByKey": True}})

    # -- what users send ------------------------------------------------------------------------------------

    async def download_file(self, download_code: str, max_bytes: int) -> bytes:
        """A picture, file or voice message a user sent: its ``downloadCode`` exchanged for a
        temporary URL (robot messageFiles/download), then read capped (the URL is signed: never
        logged)."""
        try:
            data = await self.call("POST", "/v1.0/robot/messageFiles/download",
                                   {"downloadCode": download_code, "robotCode": self.cfg.robot})
        except DingtalkApiError as exc:
            raise AttachmentUnavailable(f"dingtalk messageFiles/download refused it: HTTP {exc.status} "
                                        f"{exc.code}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AttachmentUnavailable(f"dingtalk messageFiles/download: no answer ({type(exc).__name__})") from None
        url = str(data.get("downloadUrl") or "")
        if not url.startswith(("https://", "http://")):
            raise AttachmentUnavailable("dingtalk gave no download URL")
        return await fetch(self.http, url, max_bytes, "dingtalk file")

    # -- contacts -------------------------------------------------------------------------------------------

    async def departments(self, user: str) -> list[str]:
        """The user's department ids (contact API), cached for ``department_ttl_s``."""
        key = f"dingtalk:dept:{self.cfg.client_id}:{user}"
        try:
            cached = await self.cache.get(key)
        except StoreUnavailable:
            cached = None
        if cached is not None:
            return [d for d in cached.split(",") if d]
        data = await self.oapi("/topapi/v2/user/get", {"userid": user, "language": "zh_CN"})
        depts = [str(d) for d in (data.get("result") or {}).get("dept_id_list") or []]
        try:
            await self.cache.set(key, ",".join(depts), self.cfg.department_ttl_s)
        except StoreUnavailable:
            pass
        return depts


async def _json(r: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = await r.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        data = None
    return data if isinstance(data, dict) else {}
