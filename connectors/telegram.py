"""Telegram connector: private chats, groups and forum topics, over a webhook or long polling.

python-telegram-bot's ``Bot`` makes the Bot API calls and ``Update.de_json`` parses
updates; botd's own aiohttp server receives webhooks (``POST /telegram/<bot>``, the
secret header checked in constant time before anything else). Each ``update_id`` is
processed once (Redis). The answer streams into one message edited in place, no more
often than the configured interval, with "typing…" shown while the job waits and runs;
429s are obeyed, Markdown is rendered as Telegram HTML (plain text if Telegram rejects
the entities) and answers over 4096 characters continue in further messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import hmac
import html
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

# python-telegram-bot 22 moves RetryAfter.retry_after to timedelta; opt in now (both are handled).
os.environ.setdefault("PTB_TIMEDELTA", "1")

import structlog
from aiohttp import web
from telegram import Bot, Message, MessageEntity, ReplyParameters, Update
from telegram.constants import ChatAction, ParseMode
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)

from connectors.base import Connector
from connectors.texts import BUSY, FAILED
from core.config import Config, TelegramConfig
from core.dispatch import Dispatcher, Interrupted
from core.markdown import Markup
from core.messages import InboundMessage
from core.secrets import resolve_secret
from core.streaming import LiveMessage
from core.textsplit import split_text

log = structlog.get_logger("botd.telegram")

PLATFORM = "telegram"
ALLOWED_UPDATES = ["message"]
# Telegram's limit is 4096 characters after entity parsing; leave room for what
# rendering Markdown may move around.
PART_CHARS = 4000
TYPING_EVERY_S = 4.0
COMMANDS = ("start", "help", "reset", "kb")
TEXT_ONLY = "I read text only. Please send your question as a text message."


# -- Markdown -> Telegram HTML -------------------------------------------------------------------
# Telegram accepts only a small HTML subset (b, i, s, u, code, pre, a, blockquote).


class _TelegramHtml(Markup):
    bold = ("<b>", "</b>")
    italic = ("<i>", "</i>")
    strike = ("<s>", "</s>")

    def escape(self, text: str) -> str:
        return html.escape(text, quote=False)

    def code_block(self, lang: str, code: str) -> str:
        cls = f' class="language-{html.escape(lang)}"' if lang else ""
        return f"<pre><code{cls}>{html.escape(code, quote=False)}</code></pre>"

    def code_span(self, code: str) -> str:
        return f"<code>{html.escape(code, quote=False)}</code>"

    def link(self, label: str, url: str) -> str:
        return f'<a href="{html.escape(url)}">{label}</a>'

    def heading(self, text: str) -> str:
        return f"<b>{text}</b>"


markdown_to_html = _TelegramHtml().render


# -- who is addressed -----------------------------------------------------------------------------


def _utf16_slice(text: str, offset: int, length: int) -> str:
    """Entity offsets count UTF-16 code units, not Python characters."""
    raw = text.encode("utf-16-le")
    return raw[offset * 2 : (offset + length) * 2].decode("utf-16-le", errors="replace")


def mentions_bot(msg: Message, username: str, bot_id: int) -> bool:
    text = msg.text or msg.caption or ""
    for ent in msg.entities or msg.caption_entities or ():
        if ent.type == MessageEntity.MENTION:
            if _utf16_slice(text, ent.offset, ent.length).lstrip("@").lower() == username.lower():
                return True
        elif ent.type == MessageEntity.TEXT_MENTION and ent.user is not None and ent.user.id == bot_id:
            return True
    return False


def command_of(text: str, username: str) -> str | None:
    """``/reset`` or ``/reset@thisbot`` -> "reset"; a command for another bot -> None."""
    m = re.match(r"^/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?:\s|$)", text.strip())
    if not m:
        return None
    name, at = m.group(1).lower(), m.group(2)
    if at and at.lower() != username.lower():
        return None
    return name if name in COMMANDS else None


def _in_group(update: Update) -> bool:
    msg = update.message
    return msg is not None and msg.chat.type != "private"


# -- one streamed answer -----------------------------------------------------------------------------


class _Streamer(LiveMessage):
    """Shows an answer as it grows: one message edited in place, further messages past 4096."""

    failed_text = FAILED
    busy_text = BUSY

    def __init__(self, bot: Bot, chat_id: int, thread_id: int | None, reply_to: int | None, interval: float,
                 already_sent: list[int] | None = None,
                 on_post: Callable[[list[int]], Awaitable[None]] | None = None) -> None:
        super().__init__(interval)
        self.bot = bot
        self.chat_id = chat_id
        self.thread_id = thread_id
        self.reply_to = reply_to
        self.html = True
        # (message_id, the source text it shows); messages posted before a restart are edited, not reposted.
        self.sent: list[tuple[int, str]] = [(int(mid), "") for mid in already_sent or ()]
        self.on_post = on_post

    async def _call(self, fn: Any, source: str, **kwargs: Any) -> Any:
        """One Bot API call, obeying 429s; falls back to plain text if entities are rejected."""
        for _ in range(5):
            wait = self.not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                if self.html:
                    return await fn(text=markdown_to_html(source), parse_mode=ParseMode.HTML, **kwargs)
                return await fn(text=source, **kwargs)
            except RetryAfter as exc:
                ra = exc.retry_after
                secs = ra.total_seconds() if isinstance(ra, dtm.timedelta) else float(ra)
                self.not_before = time.monotonic() + secs
                log.info("telegram rate limit: waiting", retry_after_s=secs, chat_id=self.chat_id)
            except BadRequest as exc:
                reason = str(exc).lower()
                if "not modified" in reason:
                    return None
                if "parse entities" in reason and self.html:
                    log.info("telegram rejected the formatting; sending plain text", chat_id=self.chat_id)
                    self.html = False
                else:
                    raise
        raise RetryAfter(int(max(1, self.not_before - time.monotonic())))

    async def show(self, text: str) -> None:
        parts = [p for p in split_text(text, PART_CHARS) if p.strip()]
        for i, part in enumerate(parts):
            if i < len(self.sent):
                mid, shown = self.sent[i]
                if shown != part:
                    await self._call(self.bot.edit_message_text, part, chat_id=self.chat_id, message_id=mid)
                    self.sent[i] = (mid, part)
                continue
            extra: dict[str, Any] = {}
            if self.thread_id is not None:
                extra["message_thread_id"] = self.thread_id
            if self.reply_to is not None and not self.sent:
                extra["reply_parameters"] = ReplyParameters(self.reply_to, allow_sending_without_reply=True)
            msg = await self._call(self.bot.send_message, part, chat_id=self.chat_id, **extra)
            self.sent.append((msg.message_id, part))
            if self.on_post is not None:
                await self.on_post([mid for mid, _ in self.sent])


# -- the connector ---------------------------------------------------------------------------------------


class _TgBot:
    def __init__(self, name: str, cfg: TelegramConfig) -> None:
        self.name = name
        self.cfg = cfg
        token = resolve_secret(cfg.token)
        self.bot = Bot(token, base_url=cfg.api_base)
        self.secret = resolve_secret(cfg.webhook_secret) if cfg.webhook_secret else ""
        # The bot's user id is the token's numeric part (public, unlike the rest): known before
        # getMe, so event ids (dedupe keys) are the same in every run from the first update on.
        head = token.partition(":")[0]
        self.id = int(head) if head.isdigit() else 0
        self.key = str(self.id) if self.id else name
        # Learned from getMe; until then group messages (mentions, /cmd@bot) cannot be read.
        self.username = ""
        self.poller: asyncio.Task[None] | None = None
        self.starter: asyncio.Task[None] | None = None


class TelegramConnector(Connector):
    name = "telegram"
    section = "telegram"

    def __init__(self, dispatcher: Dispatcher, config: Config) -> None:
        super().__init__(dispatcher, config)
        self.bots = {name: _TgBot(name, cfg) for name, cfg in config.telegram.items()}
        self._stopping = False

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return bool(config.telegram)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/telegram/{bot}", self.webhook)]

    async def start(self) -> None:
        for tg in self.bots.values():
            if not await self._get_me(tg, first=True):
                tg.starter = asyncio.create_task(self._retry_get_me(tg), name=f"telegram-getme-{tg.name}")

    async def _get_me(self, tg: _TgBot, first: bool = False) -> bool | None:
        """getMe (our username, for mentions and /cmd@bot), then polling; None: the token is refused."""
        try:
            await tg.bot.initialize()
        except InvalidToken:
            log.error("telegram rejected the bot token; this bot stays offline", bot=tg.name)
            return None
        except (NetworkError, TelegramError) as exc:
            if first:
                log.error("telegram getMe failed; retrying in the background (private chats are answered "
                          "meanwhile in webhook mode)", bot=tg.name, error=type(exc).__name__)
            return False
        tg.username, tg.id = tg.bot.username, tg.bot.id
        log.info("telegram bot ready", bot=tg.name, username=tg.username, mode=tg.cfg.mode)
        if tg.cfg.mode == "polling" and not self._stopping:
            tg.poller = asyncio.create_task(self._poll(tg), name=f"telegram-poll-{tg.name}")
        return True

    async def _retry_get_me(self, tg: _TgBot) -> None:
        delay = 2.0
        while not self._stopping:
            await asyncio.sleep(delay)
            if await self._get_me(tg) is not False:
                return
            delay = min(delay * 2, 60.0)

    async def stop_receiving(self) -> None:
        self._stopping = True
        for tg in self.bots.values():
            for task in (tg.starter, tg.poller):
                if task:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            tg.starter = tg.poller = None

    async def stop(self, grace_s: float = 30.0) -> None:
        await self.stop_receiving()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for tg in self.bots.values():
            with contextlib.suppress(Exception):
                await tg.bot.shutdown()

    # -- receiving ----------------------------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.StreamResponse:
        tg = self.bots.get(request.match_info["bot"])
        if tg is None or tg.cfg.mode != "webhook":
            raise web.HTTPNotFound(text="no Telegram webhook is configured at this path")
        given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
        if not hmac.compare_digest(given.encode(), tg.secret.encode()):
            raise web.HTTPUnauthorized(text="wrong or missing X-Telegram-Bot-Api-Secret-Token")
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("update_id"), int):
            raise web.HTTPBadRequest(text="not a Telegram update (no integer update_id)")
        try:
            update = Update.de_json(data, tg.bot)
        except (TypeError, ValueError, KeyError) as exc:
            raise web.HTTPBadRequest(text=f"malformed update: {type(exc).__name__}") from None
        if not tg.username and _in_group(update):
            # Whether a group message is for us (a mention, /cmd@bot) needs our username, which
            # getMe has not told yet: Telegram keeps the update and delivers it again.
            raise web.HTTPServiceUnavailable(text="the bot is starting (getMe has not answered yet)",
                                             headers={"Retry-After": "5"})
        await self._accept(tg, update)
        return web.Response(status=200, text="")

    async def _accept(self, tg: _TgBot, update: Update) -> None:
        """Record an addressed message durably (before Telegram hears "received"), then answer it."""
        try:
            inbound = self._inbound(tg, update)
        except Exception:  # one odd update must never take the connector down
            log.exception("telegram update not understood", update_id=update.update_id)
            return
        if inbound is not None and await self.dispatcher.accept(inbound, self.name):
            self._spawn(self._answer(tg, inbound))

    def replay(self, inbound: InboundMessage) -> Coroutine[Any, Any, None] | None:
        target = self.bots.get(inbound.route.get("account", inbound.bot))
        return self._answer(target, inbound) if target is not None else None

    async def _poll(self, tg: _TgBot) -> None:
        offset: int | None = None
        backoff = 1.0
        while not self._stopping:
            try:
                updates = await tg.bot.get_updates(offset=offset, timeout=tg.cfg.poll_timeout_s,
                                                   allowed_updates=ALLOWED_UPDATES)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except RetryAfter as exc:
                ra = exc.retry_after
                await asyncio.sleep(ra.total_seconds() if isinstance(ra, dtm.timedelta) else float(ra))
                continue
            except Conflict:
                log.error("telegram: a webhook is set or another poller runs; run "
                          f"`botd telegram delete-webhook {tg.name}`", bot=tg.name)
                await asyncio.sleep(30)
                continue
            except InvalidToken:
                log.error("telegram rejected the bot token; polling stops", bot=tg.name)
                return
            except (NetworkError, TelegramError) as exc:
                log.warning("telegram polling failed; retrying", bot=tg.name, error=type(exc).__name__,
                            retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60)
                continue
            for update in updates:
                offset = update.update_id + 1
                await self._accept(tg, update)

    # -- answering ----------------------------------------------------------------------------------

    def _inbound(self, tg: _TgBot, update: Update) -> InboundMessage | None:
        """The message to answer, with where the answer goes; None when it is not for us."""
        msg = update.message
        if msg is None or msg.from_user is None or msg.from_user.is_bot:
            return None
        chat, user = msg.chat, msg.from_user
        cfg = tg.cfg
        if (cfg.allow_chats and chat.id not in cfg.allow_chats) or (cfg.allow_users and user.id not in cfg.allow_users):
            log.info("telegram message from outside the allow-lists ignored", chat_id=chat.id, user_id=user.id)
            return None
        private = chat.type == "private"
        text = msg.text or ""
        command = command_of(text, tg.username) if text else None
        addressed = (
            private
            or command is not None
            or mentions_bot(msg, tg.username, tg.id)
            or (msg.reply_to_message is not None and msg.reply_to_message.from_user is not None
                and msg.reply_to_message.from_user.id == tg.id)
        )
        if not addressed:
            return None
        thread_id = msg.message_thread_id if msg.is_topic_message else None
        if command is not None:
            args = text.strip().partition(" ")[2].strip()
            text = "/help" if command == "start" else f"/{command} {args}".strip()
        elif tg.username and text:
            text = re.sub(rf"@{re.escape(tg.username)}\b", "", text, flags=re.I).strip() or text
        topic = str(thread_id) if thread_id is not None else ""
        thread = topic if private or cfg.group_history == "chat" else f"{topic}/{user.id}"
        route = {"account": tg.name, "chat_id": chat.id, "thread_id": thread_id, "private": private,
                 "reply_to": None if private else msg.message_id, "text_only": not text}
        # The route decides the bot (and so its knowledge bases); nothing in the message can.
        bot = cfg.routes.get(str(chat.id), tg.name)
        return InboundMessage(platform=PLATFORM, bot=bot, chat=str(chat.id), thread=thread, user=str(user.id),
                              text=text or "(not text)", event_id=f"{tg.key}:{update.update_id}", route=route)

    async def _answer(self, tg: _TgBot, inbound: InboundMessage) -> None:
        r = inbound.route
        chat_id, thread_id = int(r["chat_id"]), r.get("thread_id")
        cfg = tg.cfg

        async def posted(ids: list[int]) -> None:
            await self.dispatcher.note_progress(inbound, {"sent": ids})

        streamer = _Streamer(tg.bot, chat_id, thread_id, r.get("reply_to"),
                             cfg.edit_interval_private_s if r.get("private") else cfg.edit_interval_group_s,
                             already_sent=inbound.progress.get("sent", []), on_post=posted)
        structlog.contextvars.bind_contextvars(platform=PLATFORM, bot=tg.name, chat_id=chat_id,
                                               request_id=inbound.request_id)
        try:
            if r.get("text_only"):
                await streamer.show(TEXT_ONLY)
            else:
                typing = asyncio.create_task(self._typing(tg.bot, chat_id, thread_id))
                try:
                    await streamer.reply(self.dispatcher, inbound)
                finally:
                    typing.cancel()
        except Interrupted:
            log.info("telegram answer interrupted by shutdown; it is answered after the restart")
            return
        except Forbidden:
            log.info("telegram: the bot was blocked or removed from the chat")
        except TelegramError as exc:
            log.error("telegram reply failed", error=f"{type(exc).__name__}: {exc}")
        except Exception:  # one bad update must never take the connector down
            log.exception("telegram answer failed")
        await self.dispatcher.finished(inbound)

    async def _typing(self, bot: Bot, chat_id: int, thread_id: int | None) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                with contextlib.suppress(TelegramError):
                    await bot.send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=thread_id)
                await asyncio.sleep(TYPING_EVERY_S)


# -- `botd telegram set-webhook / delete-webhook` ------------------------------------------------------


async def set_webhook(cfg: TelegramConfig) -> str:
    if not cfg.webhook_url:
        raise ValueError("webhook_url is not set")
    if cfg.webhook_secret is None:
        raise ValueError("webhook_secret is not set")
    async with Bot(resolve_secret(cfg.token), base_url=cfg.api_base) as bot:
        await bot.set_webhook(url=cfg.webhook_url, secret_token=resolve_secret(cfg.webhook_secret),
                              allowed_updates=ALLOWED_UPDATES)
        return f"webhook set to {cfg.webhook_url} for @{bot.username}"


async def delete_webhook(cfg: TelegramConfig) -> str:
    async with Bot(resolve_secret(cfg.token), base_url=cfg.api_base) as bot:
        await bot.delete_webhook()
        return f"webhook deleted for @{bot.username}; long polling can be used"
