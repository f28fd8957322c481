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

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs

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

from connectors.base import Connector
from connectors.texts import BUSY, FAILED
from core.config import Config, SlackConfig
from core.dispatch import Busy, Dispatcher, Interrupted
from core.markdown import Markup
from core.messages import InboundMessage, ThreadKey
from core.redis_store import StoreUnavailable
from core.secrets import resolve_secret
from core.streaming import LiveMessage
from core.textsplit import split_text

log = structlog.get_logger("botd.slack")

PLATFORM = "slack"
# Slack truncates text past 40,000 characters; shorter messages read better in a thread.
PART_CHARS = 3500
THINKING = "_…_"
HELP = ("Mention me in a channel (I answer in the thread and follow up there), or message me directly.\n"
        "`{cmd} reset` forgets our direct-message conversation; in a thread, mention me with `/reset`.")
_FOLLOW_TTL_S = 7 * 24 * 3600


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


# -- one streamed answer --------------------------------------------------------------------------


class _Streamer(LiveMessage):
    """Posts the answer once and updates it in place; long answers continue in new messages."""

    failed_text = FAILED
    busy_text = BUSY

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str | None, interval: float,
                 already_sent: list[str] | None = None,
                 on_post: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
        super().__init__(interval)
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        # (ts, the source text it shows); messages posted before a restart are updated, not reposted.
        self.sent: list[tuple[str, str]] = [(str(ts), "") for ts in already_sent or ()]
        self.on_post = on_post

    async def _wait_turn(self) -> None:
        wait = self.not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _rate_limited(self, exc: SlackApiError) -> bool:
        if exc.response is None or exc.response.status_code != 429:
            return False
        secs = float(exc.response.headers.get("Retry-After", exc.response.headers.get("retry-after", 1)) or 1)
        self.not_before = time.monotonic() + secs
        log.info("slack rate limit: waiting", retry_after_s=secs, channel=self.channel)
        return True

    async def _post(self, source: str) -> str:
        for _ in range(5):
            await self._wait_turn()
            kwargs: dict[str, Any] = {"channel": self.channel, "text": markdown_to_mrkdwn(source)}
            if self.thread_ts:
                kwargs["thread_ts"] = self.thread_ts
            try:
                resp = await self.client.chat_postMessage(**kwargs)
                return str(resp["ts"])
            except SlackApiError as exc:
                if not self._rate_limited(exc):  # a 429 was not processed by Slack: safe to repeat
                    raise
            except aiohttp.ClientConnectorError:
                # Not connected at all, so nothing was posted: safe to repeat. A timeout after
                # sending is not repeated (the message may have landed).
                await asyncio.sleep(1)
        raise RuntimeError("chat.postMessage kept being rate limited")

    async def _update(self, ts: str, source: str) -> None:
        for _ in range(5):
            await self._wait_turn()
            try:
                await self.client.chat_update(channel=self.channel, ts=ts, text=markdown_to_mrkdwn(source))
                return
            except SlackApiError as exc:
                if not self._rate_limited(exc):
                    raise
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(1)  # an update is idempotent: repeating it is harmless
        raise RuntimeError("chat.update kept failing")

    async def show(self, text: str) -> None:
        parts = [p for p in split_text(text, PART_CHARS) if p.strip()] or [THINKING]
        for i, part in enumerate(parts):
            if i < len(self.sent):
                ts, shown = self.sent[i]
                if shown != part:
                    await self._update(ts, part)
                    self.sent[i] = (ts, part)
            else:
                self.sent.append((await self._post(part), part))
                if self.on_post is not None:
                    await self.on_post([ts for ts, _ in self.sent])


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


class SlackConnector(Connector):
    name = "slack"
    section = "slack"

    def __init__(self, dispatcher: Dispatcher, config: Config) -> None:
        super().__init__(dispatcher, config)
        self.apps = {name: _SlackApp(name, cfg) for name, cfg in config.slack.items()}
        for sa in self.apps.values():
            self._register(sa)

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return bool(config.slack)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/slack/events", self.events), web.post("/slack/events/{bot}", self.events)]

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

    async def stop(self, grace_s: float = 30.0) -> None:
        await self.stop_receiving()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)

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

        sa.app.event("app_mention")(on_event)
        sa.app.event("message")(on_event)
        sa.app.command(sa.cfg.slash_command)(on_command)

    def _follow_key(self, sa: _SlackApp, channel: str, thread_ts: str) -> str:
        return f"slack:follow:{sa.name}:{channel}:{thread_ts}"

    async def _on_event(self, sa: _SlackApp, body: dict[str, Any], event: dict[str, Any]) -> None:
        # Loops: never answer ourselves or another bot, nor edits, joins and the like.
        if event.get("bot_id") or event.get("subtype") or not event.get("user") or event.get("user") == sa.user_id:
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
                answer = bool(await self.dispatcher.cache.get(self._follow_key(sa, channel, thread_ts)))
            except StoreUnavailable:
                answer = False
        if not answer:
            return
        cfg = sa.cfg
        if (cfg.allow_channels and channel not in cfg.allow_channels) or (
                cfg.allow_users and user not in cfg.allow_users):
            log.info("slack message from outside the allow-lists ignored", channel=channel, user=user)
            return
        team = body.get("team_id") or sa.team_id
        event_id = body.get("event_id")
        if event_id and not await self.dispatcher.first_time(PLATFORM, f"{team}:event:{event_id}"):
            return
        if sa.user_id:
            text = text.replace(f"<@{sa.user_id}>", "").strip()
        # DMs: top-level messages are one conversation; channels: each thread is one.
        root = thread_ts or ("" if is_dm else ts)
        # The route decides the bot (and so its knowledge bases); nothing in the message can.
        inbound = InboundMessage(platform=PLATFORM, bot=cfg.routes.get(channel, sa.name), chat=channel, thread=root,
                                 user=user, text=text or "/help", event_id=f"{team}:msg:{channel}:{ts}",
                                 route={"account": sa.name, "channel": channel, "root": root, "dm": is_dm})
        # One record per message (channel + ts): a mention also delivered as a channel message is dropped here.
        if await self.dispatcher.accept(inbound, self.name):
            self._spawn(self._answer(sa, inbound))

    def replay(self, inbound: InboundMessage) -> Coroutine[Any, Any, None] | None:
        target = self.apps.get(inbound.route.get("account", inbound.bot))
        return self._answer(target, inbound) if target is not None else None

    async def _answer(self, sa: _SlackApp, inbound: InboundMessage) -> None:
        r = inbound.route
        channel, root = str(r["channel"]), str(r.get("root") or "")
        structlog.contextvars.bind_contextvars(platform=PLATFORM, bot=sa.name, channel=channel,
                                               request_id=inbound.request_id)

        async def posted(ts_list: list[str]) -> None:
            await self.dispatcher.note_progress(inbound, {"sent": ts_list})

        streamer = _Streamer(sa.client, channel, root or None, sa.cfg.update_interval_s,
                             already_sent=inbound.progress.get("sent", []), on_post=posted)
        try:
            if await streamer.reply(self.dispatcher, inbound, placeholder=THINKING) and (
                    root and not r.get("dm") and sa.cfg.follow_threads):
                with contextlib.suppress(StoreUnavailable):
                    await self.dispatcher.cache.set(self._follow_key(sa, channel, root), "1", _FOLLOW_TTL_S)
        except Interrupted:
            log.info("slack answer interrupted by shutdown; it is answered after the restart")
            return
        except SlackApiError as exc:
            log.error("slack reply failed", error=str(exc.response.get("error") if exc.response else exc))
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Not repeated: Slack may have posted it already, and an answer must not appear twice.
            log.error("slack did not answer in time; the reply is not re-posted", error=type(exc).__name__)
        except Exception:  # one bad event must never take the connector down
            log.exception("slack event failed")
        await self.dispatcher.finished(inbound)

    async def _on_command(self, sa: _SlackApp, ack: Any, command: dict[str, Any]) -> None:
        arg = command.get("text", "").strip().lower().lstrip("/")
        channel = command.get("channel_id", "")
        if arg == "reset":
            if channel.startswith("D"):
                try:
                    bot = sa.cfg.routes.get(channel, sa.name)
                    existed = await self.dispatcher.reset(ThreadKey(PLATFORM, bot, channel, ""))
                except Busy:
                    await ack(response_type="ephemeral", text="I cannot reach my memory right now; try again soon.")
                    return
                text = "Done: I have forgotten our conversation." if existed else "Nothing to forget yet."
            else:
                text = "In a channel, each thread is its own conversation: mention me with `/reset` in the thread."
        else:
            text = HELP.format(cmd=sa.cfg.slash_command)
        await ack(response_type="ephemeral", text=text)
