"""Slack connector: mentions in channels, DMs and thread follow-ups, over the Events API or Socket Mode.

slack-bolt's ``AsyncApp`` routes events and slash commands and acknowledges them before
any work is done (``process_before_response=False``); slack-sdk's ``AsyncWebClient``
posts and updates the answer. In HTTP mode botd's own aiohttp server receives
``POST /slack/events`` (or ``/slack/events/<bot>``): the signature (slack-sdk's
``SignatureVerifier``: v0 HMAC-SHA256, 5-minute window) is checked before anything else,
a malformed body gets 400, and the request is handed to Bolt through its aiohttp
adapter. Socket Mode uses Bolt's aiohttp Socket Mode handler.

Each event is processed once (``event_id``), and so is each message (channel + ts): a
mention in a channel where the app also receives channel messages arrives twice. The
bot's own and other bots' messages are ignored. The answer is posted once and updated
with ``chat.update`` no more often than the configured interval; 429s are obeyed; a
``chat.postMessage`` is never retried after a timeout, so an answer is never posted twice.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import structlog
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from connectors.base import Connector, Route, Service
from connectors.download import READ_TIMEOUT_S, check_announced, kind_of, mime_of, read_capped
from connectors.markdown import Markup
from connectors.reply import AttachmentUnavailable, ReplyTarget
from connectors.slack.config import SlackConfig
from connectors.textsplit import split_text
from core.config import Settings
from core.dispatch import Busy, Rejected
from core.feedback import FeedbackEvent, FeedbackLabels, Vote
from core.kv import KeyValueCache
from core.messages import Account, Attachment, InboundMessage
from core.redis_store import StoreUnavailable
from core.secrets import resolve_secret

log = structlog.get_logger("botd.slack")

PLATFORM = "slack"
# Slack truncates text past 40,000 characters; shorter messages read better in a thread.
PART_CHARS = 3500
THINKING = "_…_"
_FOLLOW_TTL_S = 7 * 24 * 3600
# The 👍 / 👎 buttons under an answer (Block Kit actions, value = the answer's id), and the
# reason field offered after a 👎 (an input block that sends its text; block id names the answer).
FEEDBACK_ACTION = re.compile(r"^botd_feedback_(up|down)$")
REASON_ACTION = "botd_feedback_reason"
REASON_BLOCK = "botd_fb_reason:"
SECTION_CHARS = 3000  # Block Kit's limit for one section's text


# -- Markdown -> Slack mrkdwn ----------------------------------------------------------------------
# Slack's mrkdwn is not Markdown: single-star bold, underscore italics, <url|label> links,
# no headings; only & < > are escaped.


class _Mrkdwn(Markup):
    bold = ("*", "*")
    italic = ("_", "_")
    strike = ("~", "~")

    def escape(self, text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def code_block(self, lang: str, code: str) -> str:
        return "```" + self.escape(code) + "```"

    def code_span(self, code: str) -> str:
        return "`" + self.escape(code) + "`"

    def link(self, label: str, url: str) -> str:
        return f"<{url}|{label.replace('|', '¦')}>"

    def heading(self, text: str) -> str:
        return "*" + text.replace("*", "") + "*"


markdown_to_mrkdwn = _Mrkdwn().render


# -- where an answer goes --------------------------------------------------------------------------


class _Again(Exception):
    """Nothing reached Slack (or repeating is harmless): try once more after a second."""


class SlackReply(ReplyTarget):
    """Posted once in the thread and updated in place; long answers continue in new messages.
    A ``chat.postMessage`` that may have landed (a timeout after sending) is never repeated."""

    limit = PART_CHARS
    placeholder = THINKING

    def __init__(self, account: Account, client: AsyncWebClient, cache: KeyValueCache, route: dict[str, Any],
                 interval: float, follow: bool, sent: list[Any] | None = None) -> None:
        super().__init__(account, interval, sent or ())
        self.client = client
        self.cache = cache
        self.channel = str(route["channel"])
        self.root = str(route.get("root") or "")
        self.follow = follow and bool(self.root) and not route.get("dm")

    async def post(self, part: str, first: bool) -> str:
        kwargs: dict[str, Any] = {"channel": self.channel, "text": markdown_to_mrkdwn(part)}
        if self.root:
            kwargs["thread_ts"] = self.root
        try:
            resp = await self.client.chat_postMessage(**kwargs)
        except aiohttp.ClientConnectorError as exc:
            raise _Again from exc  # not connected at all, so nothing was posted
        return str(resp["ts"])

    async def edit(self, ref: Any, part: str) -> None:
        try:
            await self.client.chat_update(channel=self.channel, ts=str(ref), text=markdown_to_mrkdwn(part))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Again from exc  # an update is idempotent: repeating it is harmless

    def retry_after(self, exc: Exception) -> float | None:
        if isinstance(exc, _Again):
            return 1.0
        if isinstance(exc, SlackApiError) and exc.response is not None and exc.response.status_code == 429:
            # A 429 was not processed by Slack: safe to repeat, even a post.
            headers = exc.response.headers
            return float(headers.get("Retry-After", headers.get("retry-after", 1)) or 1)
        return None

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        return await download_file(self.client.token or "", self.client.base_url, attachment, max_bytes)

    async def offer_feedback(self, answer_id: str, labels: FeedbackLabels) -> None:
        """👍 / 👎 buttons on the answer's last message: the same ``text``, shown as the same
        mrkdwn in section blocks, with an actions block below."""
        if not self.sent:
            return
        ref, part = self.sent[-1]
        if not part:
            return  # posted before a restart: its text is not known here, so it is not touched
        text = markdown_to_mrkdwn(part)
        blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": chunk}}
                                        for chunk in split_text(text, SECTION_CHARS, len)][:49]
        blocks.append({"type": "actions", "block_id": "botd_feedback", "elements": [
            {"type": "button", "action_id": f"botd_feedback_{vote}", "value": answer_id,
             "text": {"type": "plain_text", "text": label, "emoji": True}}
            for vote, label in (("up", labels.up), ("down", labels.down))]})

        async def _update() -> None:
            try:
                await self.client.chat_update(channel=self.channel, ts=str(ref), text=text, blocks=blocks)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _Again from exc

        await self.call(_update)

    async def answered(self) -> None:
        if self.follow:
            with contextlib.suppress(StoreUnavailable):
                await self.cache.set(follow_key(self.account.name, self.channel, self.root), "1", _FOLLOW_TTL_S)

    async def failed(self, exc: Exception, text: str) -> None:
        if isinstance(exc, SlackApiError):
            log.error("slack reply failed", error=str(exc.response.get("error") if exc.response else exc))
        elif isinstance(exc, TimeoutError | aiohttp.ClientError):
            # Not repeated: Slack may have posted it already, and an answer must not appear twice.
            log.error("slack did not answer in time; the reply is not re-posted", error=type(exc).__name__)
        else:
            log.error("slack answer failed", exc_info=exc)


# -- files shared with a message ---------------------------------------------------------------------------


def attachments_of(event: dict[str, Any]) -> list[Attachment]:
    """The files of a ``file_share`` message (or a mention with files): each hosted file with its
    private download URL; external (Google Drive…) and deleted files have none and are left out."""
    found: list[Attachment] = []
    for f in event.get("files") or []:
        if not isinstance(f, dict):
            continue
        url = f.get("url_private_download") or f.get("url_private")
        if not isinstance(url, str) or not url or f.get("mode") in ("external", "tombstone"):
            continue
        name = str(f.get("name") or f.get("title") or "")
        mime = str(f.get("mimetype") or mime_of(name))
        size = f.get("size")
        found.append(Attachment(kind_of(mime, name), name=name, mime=mime,
                                size=size if isinstance(size, int) else None,
                                ref={"id": str(f.get("id") or ""), "url": url}))
    return found


def file_url_allowed(url: str, api_base: str) -> bool:
    """The bot token goes only to Slack's own file hosts over HTTPS (or to the configured API
    server's origin: a proxy, the tests' fake), never to a URL an event merely names."""
    u, api = urlsplit(url), urlsplit(api_base)
    if u.scheme == "https" and u.hostname and (u.hostname == "slack.com" or u.hostname.endswith(".slack.com")):
        return u.port in (None, 443)
    return (u.scheme, u.hostname, u.port) == (api.scheme, api.hostname, api.port)


async def download_file(token: str, api_base: str, attachment: Attachment, max_bytes: int) -> bytes:
    url = str(attachment.ref.get("url") or "")
    if not url:
        raise AttachmentUnavailable("slack: the file has no download URL")
    if not file_url_allowed(url, api_base):
        raise AttachmentUnavailable("slack: the file URL is not on Slack's file host; the token is not sent there")
    check_announced(attachment.size, max_bytes)
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url, headers={"Authorization": f"Bearer {token}"},
                                   timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                 sock_read=READ_TIMEOUT_S)) as resp:
                if resp.content_type == "text/html" and not attachment.mime.startswith("text/html"):
                    # Slack answers a sign-in page, not 401, when the token may not read files.
                    raise AttachmentUnavailable("slack answered a sign-in page: the app needs the files:read scope")
                return await read_capped(resp, max_bytes, "slack file")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AttachmentUnavailable(f"slack file: no answer ({type(exc).__name__})") from None


def follow_key(account: str, channel: str, thread_ts: str) -> str:
    return f"slack:follow:{account}:{channel}:{thread_ts}"


# -- the connector ---------------------------------------------------------------------------------


class _SlackApp:
    def __init__(self, name: str, cfg: SlackConfig) -> None:
        self.name = name
        self.cfg = cfg
        # No automatic retries: a retried chat.postMessage after a timeout could post twice.
        self.client = AsyncWebClient(token=resolve_secret(cfg.bot_token), base_url=cfg.api_base, retry_handlers=[],
                                     timeout=int(max(1, cfg.api_timeout_s)))
        http = cfg.mode == "http"
        secret = resolve_secret(cfg.signing_secret) if cfg.signing_secret else None
        self.verifier = SignatureVerifier(secret) if secret else None
        # process_before_response: the listener records the message in the durable inbox (and
        # spawns the answer) before Slack gets its acknowledgement; it never waits for the answer.
        self.app = AsyncApp(client=self.client, signing_secret=secret, process_before_response=True,
                            request_verification_enabled=http, ssl_check_enabled=http)
        self.socket: AsyncSocketModeHandler | None = None
        self.user_id = ""
        self.bot_id = ""
        self.team_id = ""
        self.account = Account(connector="slack", name=name, routes=cfg.routes,
                               allow_chats=frozenset(cfg.allow_channels), allow_users=frozenset(cfg.allow_users))


class SlackConnector(Connector):
    name = "slack"

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.apps = {name: _SlackApp(name, cfg) for name, cfg in SlackConfig.sections(self.config).items()}
        for sa in self.apps.values():
            self._register(sa)


    def routes(self) -> list[Route]:
        return [("POST", "/slack/events", "events"), ("POST", "/slack/events/{bot}", "events")]

    async def start(self) -> None:
        for sa in self.apps.values():
            try:
                auth = await sa.client.auth_test()
                sa.user_id, sa.bot_id, sa.team_id = auth.get("user_id", ""), auth.get("bot_id", ""), auth.get(
                    "team_id", "")
            except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.error("slack auth.test failed; this app stays offline", bot=sa.name, error=type(exc).__name__)
                continue
            if sa.cfg.mode == "socket":
                sa.socket = AsyncSocketModeHandler(sa.app, resolve_secret(sa.cfg.app_token or ""),
                                                   web_client=sa.client)
                try:
                    await sa.socket.connect_async()
                except Exception as exc:  # the daemon keeps running for its other connectors
                    log.error("slack socket mode connection failed", bot=sa.name, error=type(exc).__name__)
                    continue
            log.info("slack app ready", bot=sa.name, mode=sa.cfg.mode, bot_user=sa.user_id)

    async def stop_receiving(self) -> None:
        for sa in self.apps.values():
            if sa.socket is not None:
                with contextlib.suppress(Exception):
                    await sa.socket.close_async()
                sa.socket = None

    # -- HTTP: POST /slack/events -----------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("bot")
        http_apps = [a for a in self.apps.values() if a.cfg.mode == "http"]
        if name is not None:
            sa = self.apps.get(name)
        elif len(http_apps) == 1:
            sa = http_apps[0]
        else:
            raise web.HTTPNotFound(text="several Slack apps: use /slack/events/<bot>")
        if sa is None or sa.verifier is None:
            raise web.HTTPNotFound(text="no Slack app in HTTP mode at this path")
        raw = await request.read()
        ts = request.headers.get("X-Slack-Request-Timestamp", "")
        sig = request.headers.get("X-Slack-Signature", "")
        # Before any work: the signature over the raw bytes, and the 5-minute window.
        if not ts or not sig or not sa.verifier.is_valid(raw, ts, sig):
            raise web.HTTPUnauthorized(text="invalid or missing Slack signature")
        try:
            body = raw.decode("utf-8")
            if request.content_type == "application/x-www-form-urlencoded":
                parsed: Any = parse_qs(body, strict_parsing=True)
            else:
                parsed = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise web.HTTPBadRequest(text="malformed body") from None
        if not isinstance(parsed, dict):
            raise web.HTTPBadRequest(text="malformed body: not an object")
        if request.headers.get("X-Slack-Retry-Num"):
            log.info("slack retry delivery", retry=request.headers.get("X-Slack-Retry-Num"),
                     reason=request.headers.get("X-Slack-Retry-Reason"))
        bolt_resp = await sa.app.async_dispatch(
            AsyncBoltRequest(body=body, query=request.query_string, headers=dict(request.headers)))
        return await to_aiohttp_response(bolt_resp)

    # -- listeners ------------------------------------------------------------------------------------

    def _register(self, sa: _SlackApp) -> None:
        async def on_event(body: dict[str, Any], event: dict[str, Any]) -> None:
            await self._on_event(sa, body, event)

        async def on_command(ack: Any, command: dict[str, Any]) -> None:
            await self._on_command(sa, ack, command)

        async def on_vote(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
            await ack()
            await self._on_feedback(sa, body, action)

        sa.app.action(FEEDBACK_ACTION)(on_vote)
        sa.app.action(REASON_ACTION)(on_vote)
        sa.app.event("app_mention")(on_event)
        sa.app.event("message")(on_event)
        sa.app.command(sa.cfg.slash_command)(on_command)

    async def _on_event(self, sa: _SlackApp, body: dict[str, Any], event: dict[str, Any]) -> None:
        # Loops: never answer ourselves or another bot, nor edits, joins and the like.
        subtype = event.get("subtype")
        if event.get("bot_id") or (subtype and subtype != "file_share") or not event.get("user") \
                or event.get("user") == sa.user_id:
            return
        channel, ts, user = event.get("channel", ""), event.get("ts", ""), event["user"]
        if not channel or not ts:
            return
        text = event.get("text", "")
        thread_ts = event.get("thread_ts")
        is_dm = event.get("channel_type") == "im" or channel.startswith("D")
        mentioned = bool(sa.user_id) and f"<@{sa.user_id}>" in text
        answer = event.get("type") == "app_mention" or is_dm or mentioned
        if not answer and thread_ts and sa.cfg.follow_threads:
            try:
                answer = bool(await self.cache.get(follow_key(sa.name, channel, thread_ts)))
            except StoreUnavailable:
                answer = False
        if not answer:
            return
        team = body.get("team_id") or sa.team_id
        if sa.user_id:
            text = text.replace(f"<@{sa.user_id}>", "").strip()
        # DMs: top-level messages are one conversation; channels: each thread is one.
        root = thread_ts or ("" if is_dm else ts)
        # One record per message (channel + ts), whatever the event: a retried event, or a mention
        # also delivered as a channel message, is dropped when it is recorded.
        attachments = attachments_of(event)
        inbound = InboundMessage(platform=PLATFORM, bot=sa.name, account=sa.name, chat=channel, thread=root,
                                 user=user, text=text or ("" if attachments else "/help"),
                                 attachments=attachments, event_id=f"{team}:msg:{channel}:{ts}",
                                 route={"channel": channel, "root": root, "dm": is_dm})
        await self.service.receive(inbound, self._target(sa, inbound))

    async def _on_feedback(self, sa: _SlackApp, body: dict[str, Any], action: dict[str, Any]) -> None:
        """A 👍 / 👎 pressed, or a 👎's reason sent (the request's signature is checked before Bolt
        sees it; in Socket Mode Slack's own connection carries it): stored by the service (same
        channel, not a replayed interaction), told to the user only (ephemeral), with a reason
        field after a 👎."""
        user = str((body.get("user") or {}).get("id") or "")
        channel = str((body.get("channel") or {}).get("id") or "")
        thread = str((body.get("message") or {}).get("thread_ts") or "")
        action_id = str(action.get("action_id") or "")
        if action_id == REASON_ACTION:
            block = str(action.get("block_id") or "")
            answer_id, vote, reason = block.removeprefix(REASON_BLOCK), None, str(action.get("value") or "")
            if not block.startswith(REASON_BLOCK):
                return
        else:
            match = FEEDBACK_ACTION.match(action_id)
            if match is None:
                return
            answer_id, vote, reason = str(action.get("value") or ""), Vote(match.group(1)), ""
        if not user or not channel or not answer_id:
            return
        # Each click has its own trigger_id: the same payload again is a replay.
        event_id = str(body.get("trigger_id") or action.get("action_ts") or "")
        try:
            reply = await self.service.feedback(FeedbackEvent(
                PLATFORM, sa.name, channel, user, answer_id, vote, reason, event_id=f"{sa.name}:{event_id}"))
        except Exception:  # feedback must never take the app down
            log.exception("slack feedback not taken")
            return
        if not reply.text:
            return
        blocks: list[dict[str, Any]] | None = None
        if reply.ask_reason:
            blocks = [{"type": "input", "dispatch_action": True, "block_id": f"{REASON_BLOCK}{answer_id}",
                       "label": {"type": "plain_text", "text": reply.ask_reason[:2000]},
                       "element": {"type": "plain_text_input", "action_id": REASON_ACTION, "max_length": 500}}]
        kwargs: dict[str, Any] = {"channel": channel, "user": user, "text": reply.ask_reason or reply.text}
        if blocks:
            kwargs["blocks"] = blocks
        if thread:
            kwargs["thread_ts"] = thread
        try:
            await sa.client.chat_postEphemeral(**kwargs)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.info("slack: could not tell the user their feedback was taken", error=type(exc).__name__)

    def _target(self, sa: _SlackApp, inbound: InboundMessage) -> SlackReply:
        return SlackReply(sa.account, sa.client, self.cache, inbound.route, sa.cfg.update_interval_s,
                          sa.cfg.follow_threads, sent=inbound.progress.get("sent", []))

    def target(self, msg: InboundMessage) -> SlackReply | None:
        sa = self.apps.get(msg.account or msg.route.get("account", msg.bot))
        return self._target(sa, msg) if sa is not None else None

    async def _on_command(self, sa: _SlackApp, ack: Any, command: dict[str, Any]) -> None:
        """``/assistant reset`` in a direct message forgets it; anything else gets the help."""
        arg = command.get("text", "").strip().lower().lstrip("/")
        channel, user = command.get("channel_id", ""), command.get("user_id", "")
        text = "/reset" if arg == "reset" and channel.startswith("D") else "/help"
        msg = InboundMessage(platform=PLATFORM, bot="", account=sa.name, chat=channel, user=user, text=text)
        # The same bot as the channel's messages get: [[routes]] first, then the app's routes.
        msg.bot = await self.service.route(msg, sa.account)
        try:
            answer = await self.service.dispatch(msg)
            reply = ""
            async for ev in answer.events():
                reply = ev.text if ev.done else reply
        except Busy as exc:
            reply = exc.user_message or exc.reason
        except Rejected as exc:
            reply = exc.message
        await ack(response_type="ephemeral", text=reply)
