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
from collections.abc import Collection
from typing import Any

# python-telegram-bot 22 moves RetryAfter.retry_after to timedelta; opt in now (both are handled).
os.environ.setdefault("PTB_TIMEDELTA", "1")

import aiohttp
import structlog
from aiohttp import web
from telegram import (
    Bot,
    CallbackQuery,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
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

from connectors.base import Connector, Route, Service
from connectors.download import check_announced, fetch, kind_of, mime_of
from connectors.markdown import Markup
from connectors.reply import AttachmentTooLarge, AttachmentUnavailable, ReplyTarget
from connectors.telegram.config import TelegramConfig
from core.config import Settings
from core.feedback import FeedbackEvent, FeedbackLabels, Vote
from core.kv import KeyValueCache
from core.lease import Holding, Lease
from core.messages import Account, Attachment, InboundMessage
from core.secrets import resolve_secret

log = structlog.get_logger("botd.telegram")

PLATFORM = "telegram"
# callback_query: the 👍 / 👎 buttons under answers.
ALLOWED_UPDATES = ["message", "callback_query"]
# A button's callback_data (at most 64 bytes): "fb:<answer id>:up|down".
_FEEDBACK_DATA = re.compile(r"^fb:([A-Za-z0-9_.-]{1,48}):(up|down)$")
# How long a "what was wrong?" prompt takes a reply as the 👎's reason (seconds).
REASON_WINDOW_S = 24 * 3600
# Telegram's limit is 4096 characters after entity parsing; leave room for what
# rendering Markdown may move around.
PART_CHARS = 4000
TYPING_EVERY_S = 4.0


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


def command_of(text: str, username: str, known: Collection[str]) -> str | None:
    """``/reset`` or ``/reset@thisbot`` -> "reset" when it is one of ``known`` (the service's
    commands); a command for another bot (or for any bot while our own username is not known
    yet) -> None."""
    text = text.strip()
    if not text.startswith("/"):
        return None
    name, _, at = text[1:].partition(" ")[0].partition("@")
    if at and at.lower() != (username or "\0").lower():
        return None
    return name.lower() if name.lower() in known else None


def _in_group(update: Update) -> bool:
    msg = update.message
    return msg is not None and msg.chat.type != "private"


# -- what was sent with the message ---------------------------------------------------------------------


def attachments_of(msg: Message) -> list[Attachment]:
    """A document, a photo (its largest size), a voice message or an audio file, as sent; a
    sticker, video or location is none of these (the message stays unreadable)."""
    if msg.document is not None:
        d = msg.document
        name = d.file_name or ""
        mime = d.mime_type or mime_of(name)
        return [Attachment(kind_of(mime, name), name=name, mime=mime, size=d.file_size,
                           ref={"file_id": d.file_id})]
    if msg.photo:
        p = msg.photo[-1]  # Telegram lists the sizes smallest first
        return [Attachment("image", mime="image/jpeg", size=p.file_size, ref={"file_id": p.file_id})]
    if msg.voice is not None:
        v = msg.voice
        return [Attachment("voice", mime=v.mime_type or "audio/ogg", size=v.file_size, ref={"file_id": v.file_id},
                           duration_s=_seconds(v.duration))]
    if msg.audio is not None:
        a = msg.audio
        return [Attachment("voice", name=a.file_name or "", mime=a.mime_type or mime_of(a.file_name or ""),
                           size=a.file_size, ref={"file_id": a.file_id}, duration_s=_seconds(a.duration))]
    return []


def _seconds(value: Any) -> float | None:
    if isinstance(value, dtm.timedelta):
        return value.total_seconds()
    return float(value) if value is not None else None


def file_base_url(api_base: str) -> str:
    """Where the Bot API serves files: ``…/bot`` -> ``…/file/bot`` (a local Bot API server or a
    proxy follows the same scheme)."""
    return api_base[: -len("/bot")] + "/file/bot" if api_base.endswith("/bot") else api_base.rstrip("/") + "/file/bot"


async def download_file(bot: Bot, attachment: Attachment, max_bytes: int) -> bytes:
    """getFile (python-telegram-bot), then the file itself, read capped. The file URL holds the
    bot token: never logged, never in an error."""
    file_id = str(attachment.ref.get("file_id") or "")
    if not file_id:
        raise AttachmentUnavailable("telegram: the attachment has no file_id")
    check_announced(attachment.size, max_bytes)
    try:
        info = await bot.get_file(file_id)
    except BadRequest as exc:
        too_big = "too big" in str(exc).lower()
        raise (AttachmentTooLarge if too_big else AttachmentUnavailable)(
            f"telegram getFile refused it: {exc.message}") from None
    except TelegramError as exc:
        raise AttachmentUnavailable(f"telegram getFile failed ({type(exc).__name__})") from None
    check_announced(info.file_size, max_bytes)
    if not info.file_path or not info.file_path.startswith(("http://", "https://")):
        raise AttachmentUnavailable("telegram gave no downloadable file path")
    async with aiohttp.ClientSession() as session:
        return await fetch(session, info.file_path, max_bytes, "telegram file")


# -- where an answer goes ----------------------------------------------------------------------------


class TelegramReply(ReplyTarget):
    """An answer in a chat: one message edited in place, further messages past 4096 characters,
    Markdown as Telegram HTML (plain text when Telegram rejects the entities)."""

    limit = PART_CHARS
    typing_every_s = TYPING_EVERY_S

    def __init__(self, account: Account, bot: Bot, route: dict[str, Any], interval: float,
                 sent: list[Any] | None = None) -> None:
        super().__init__(account, interval, sent or ())
        self.bot = bot
        self.chat_id = int(route["chat_id"])
        self.thread_id: int | None = route.get("thread_id")
        self.reply_to: int | None = route.get("reply_to")
        self.html = True

    async def _send(self, fn: Any, source: str, **kwargs: Any) -> Any:
        try:
            if self.html:
                return await fn(text=markdown_to_html(source), parse_mode=ParseMode.HTML, **kwargs)
        except BadRequest as exc:
            if "parse entities" not in str(exc).lower():
                raise
            log.info("telegram rejected the formatting; sending plain text", chat_id=self.chat_id)
            self.html = False
        return await fn(text=source, **kwargs)

    async def post(self, part: str, first: bool) -> int:
        extra: dict[str, Any] = {}
        if self.thread_id is not None:
            extra["message_thread_id"] = self.thread_id
        if self.reply_to is not None and first:
            extra["reply_parameters"] = ReplyParameters(self.reply_to, allow_sending_without_reply=True)
        msg = await self._send(self.bot.send_message, part, chat_id=self.chat_id, **extra)
        return int(msg.message_id)

    async def edit(self, ref: Any, part: str) -> None:
        try:
            await self._send(self.bot.edit_message_text, part, chat_id=self.chat_id, message_id=int(ref))
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():
                raise

    def retry_after(self, exc: Exception) -> float | None:
        if not isinstance(exc, RetryAfter):
            return None
        ra = exc.retry_after
        return ra.total_seconds() if isinstance(ra, dtm.timedelta) else float(ra)

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        return await download_file(self.bot, attachment, max_bytes)

    async def offer_feedback(self, answer_id: str, labels: FeedbackLabels) -> None:
        """👍 / 👎 as an inline keyboard on the answer's last message: its reply markup only, the
        text stays as it is."""
        if not self.sent:
            return
        markup = InlineKeyboardMarkup([[InlineKeyboardButton(labels.up, callback_data=f"fb:{answer_id}:up"),
                                        InlineKeyboardButton(labels.down, callback_data=f"fb:{answer_id}:down")]])
        ref = self.sent[-1][0]

        async def _markup() -> None:
            await self.bot.edit_message_reply_markup(chat_id=self.chat_id, message_id=int(ref), reply_markup=markup)

        await self.call(_markup)

    async def typing(self) -> None:
        await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id)

    async def failed(self, exc: Exception, text: str) -> None:
        if isinstance(exc, Forbidden):
            log.info("telegram: the bot was blocked or removed from the chat", chat_id=self.chat_id)
        elif isinstance(exc, TelegramError):
            log.error("telegram reply failed", error=f"{type(exc).__name__}: {exc}")
        else:
            log.error("telegram answer failed", exc_info=exc)


# -- the connector ---------------------------------------------------------------------------------------


class _TgBot:
    def __init__(self, name: str, cfg: TelegramConfig) -> None:
        self.name = name
        self.cfg = cfg
        token = resolve_secret(cfg.token)
        self.bot = Bot(token, base_url=cfg.api_base, base_file_url=file_base_url(cfg.api_base))
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
        self.account = Account(
            connector="telegram", name=name, routes=cfg.routes,
            allow_chats=frozenset(map(str, cfg.allow_chats)), allow_users=frozenset(map(str, cfg.allow_users)))


class TelegramConnector(Connector):
    name = "telegram"

    def __init__(self, service: Service, settings: Settings, cache: KeyValueCache) -> None:
        super().__init__(service, settings, cache)
        self.bots = {name: _TgBot(name, cfg) for name, cfg in TelegramConfig.sections(self.config).items()}
        self._stopping = False


    def routes(self) -> list[Route]:
        return [("POST", "/telegram/{bot}", "webhook")]

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

    async def close(self) -> None:
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
        """Hand an addressed message up (recorded before Telegram hears "received")."""
        try:
            if update.callback_query is not None:
                await self._feedback(tg, update.callback_query)
                return
            if await self._reason(tg, update):
                return
        except Exception:  # feedback must never take the connector down
            log.exception("telegram feedback not taken", update_id=update.update_id)
            return
        try:
            inbound = self._inbound(tg, update)
        except Exception:  # one odd update must never take the connector down
            log.exception("telegram update not understood", update_id=update.update_id)
            return
        if inbound is not None:
            await self.service.receive(inbound, self._target(tg, inbound))

    async def _feedback(self, tg: _TgBot, query: CallbackQuery) -> None:
        """A 👍 / 👎 pressed under an answer: stored by the service (same chat, not replayed), told
        in a toast; after a 👎 a "what was wrong?" prompt whose reply is the reason."""
        match = _FEEDBACK_DATA.match(query.data or "")
        chat = query.message.chat if query.message is not None else None
        if match is None or chat is None:
            with contextlib.suppress(TelegramError):
                await query.answer()  # not ours (or a message too old to know its chat): just stop the spinner
            return
        answer_id, vote = match.group(1), Vote(match.group(2))
        user = str(query.from_user.id)
        reply = await self.service.feedback(FeedbackEvent(
            PLATFORM, tg.name, str(chat.id), user, answer_id, vote, event_id=f"{tg.key}:cb:{query.id}"))
        with contextlib.suppress(TelegramError):
            await query.answer(text=reply.text[:200] or None)
        if reply.ask_reason and query.message is not None:
            try:
                prompt = await tg.bot.send_message(
                    chat.id, reply.ask_reason,
                    reply_markup=ForceReply(selective=True),
                    reply_parameters=ReplyParameters(query.message.message_id, allow_sending_without_reply=True),
                    message_thread_id=getattr(query.message, "message_thread_id", None))
            except TelegramError as exc:
                log.warning("telegram: could not ask for the reason", error=type(exc).__name__)
                return
            await self.cache.set(f"telegram:fbask:{tg.key}:{chat.id}:{prompt.message_id}",
                                 json.dumps({"answer": answer_id, "user": user}), REASON_WINDOW_S)

    async def _reason(self, tg: _TgBot, update: Update) -> bool:
        """A reply to a "what was wrong?" prompt by the user who pressed 👎: their reason (not a
        question); True when it was one."""
        msg = update.message
        if msg is None or msg.reply_to_message is None or msg.from_user is None or not msg.text:
            return False
        replied = msg.reply_to_message
        if replied.from_user is None or replied.from_user.id != tg.id:
            return False
        raw = await self.cache.get(f"telegram:fbask:{tg.key}:{msg.chat.id}:{replied.message_id}")
        if not raw:
            return False
        asked = json.loads(raw)
        if asked.get("user") != str(msg.from_user.id):
            return False  # someone else replying to the prompt: an ordinary message
        reply = await self.service.feedback(FeedbackEvent(
            PLATFORM, tg.name, str(msg.chat.id), str(msg.from_user.id), str(asked.get("answer", "")),
            reason=msg.text, event_id=f"{tg.key}:{update.update_id}"))
        if reply.text:
            with contextlib.suppress(TelegramError):
                await tg.bot.send_message(msg.chat.id, reply.text,
                                          reply_parameters=ReplyParameters(msg.message_id,
                                                                           allow_sending_without_reply=True),
                                          message_thread_id=msg.message_thread_id if msg.is_topic_message else None)
        return True

    def _target(self, tg: _TgBot, inbound: InboundMessage) -> TelegramReply:
        r = inbound.route
        cfg = tg.cfg
        return TelegramReply(tg.account, tg.bot, r,
                             cfg.edit_interval_private_s if r.get("private") else cfg.edit_interval_group_s,
                             sent=inbound.progress.get("sent", []))

    def target(self, msg: InboundMessage) -> TelegramReply | None:
        tg = self.bots.get(msg.account or msg.route.get("account", msg.bot))
        return self._target(tg, msg) if tg is not None else None

    async def _poll(self, tg: _TgBot) -> None:
        """Long polling, by one daemon at a time among all on one Redis (Telegram allows one
        getUpdates caller per bot): the holder of the bot's polling lease; another takes over
        within the lease time when it dies."""
        lease = Lease(self.cache.redis, self.cache.prefix, f"telegram:poll:{tg.key}", self.config.redis.lease_s,
                      self.config.server.instance_name())
        async with Holding(lease, f"telegram-lease-{tg.name}") as holding:
            await self._poll_while_held(tg, holding)

    async def _poll_while_held(self, tg: _TgBot, holding: Holding) -> None:
        offset: int | None = None
        backoff = 1.0
        async for _ in holding.while_held(lambda: self._stopping, "telegram polling", bot=tg.name):
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
        private = chat.type == "private"
        text = msg.text or ""
        # Only a text that starts with "/" can be a command: the service's vocabulary is asked for no other.
        command = command_of(text, tg.username, self.service.command_names) if text.lstrip().startswith("/") else None
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
        attachments = attachments_of(msg)
        if attachments and not text:
            text = msg.caption or ""  # a file's, photo's or voice message's caption is its question
        if command is not None:
            args = text.strip().partition(" ")[2].strip()
            text = "/help" if command == "start" else f"/{command} {args}".strip()
        elif tg.username and text:
            # A file whose caption only @mentions the bot has no question (the mention is not one).
            text = re.sub(rf"@{re.escape(tg.username)}\b", "", text, flags=re.I).strip() or (
                "" if attachments else text)
        topic = str(thread_id) if thread_id is not None else ""
        thread = topic if private or cfg.group_history == "chat" else f"{topic}/{user.id}"
        route = {"chat_id": chat.id, "thread_id": thread_id, "private": private,
                 "reply_to": None if private else msg.message_id}
        return InboundMessage(platform=PLATFORM, bot=tg.name, account=tg.name, chat=str(chat.id), thread=thread,
                              user=str(user.id), text=text or ("" if attachments else "(not text)"),
                              readable=bool(text or attachments), attachments=attachments,
                              event_id=f"{tg.key}:{update.update_id}", route=route)

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
