"""Admin alerts to a WeCom group robot (群机器人 webhook): outgoing only, never in the way.

``[notify]`` names the robot's webhook key (a secret reference), the language and the events
an admin wants to hear about. :meth:`Notifier.post` (and ``await notify(...)``) never raises
and never waits: the alert joins a bounded queue that one background task sends, one POST
at a time. Without ``[notify]`` (or for an event not listed in ``events``) it does nothing;
the section is read at each alert, so a reload turns it on, off or re-points it.

The robot accepts at most 20 messages a minute and throttles a robot that sends more for
ten minutes, so botd never sends more: a sliding window counts every POST that may have
reached the platform. Alerts that find the window full are not sent one by one: they are
held (counted by event, the first lines kept) and go out as one summary as soon as the
window has room again -- never lost silently, never a storm. Texts are capped to the
platform's limits (text 2048 bytes, markdown 4096) on a UTF-8 character boundary.

The webhook key is a secret: it is never logged (the URL is never logged either, and the
key is handed to the log's masking). An answer with ``errcode != 0`` and an unreachable
webhook are logged once per kind until a send succeeds again. The words themselves are
the caller's (``render``): core holds no user-facing text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import structlog

from connectors.notify.config import NotifyConfig
from core.config import Settings
from core.secrets import SecretError, known_secrets, remember_secret, resolve_secret

log = structlog.get_logger("botd.notify")

# The platform's limits (PROTOCOLS.md, group robot webhook).
MAX_PER_WINDOW = 20
WINDOW_S = 61.0  # a minute, plus a second for the clocks and the network between us and the platform
MAX_BYTES = {"text": 2048, "markdown": 4096}
# errcode of "api freq out of limit": someone else sent with the same key; the robot is throttled.
THROTTLED_ERRCODE = 45009
THROTTLED_PAUSE_S = 600.0
# Alerts waiting to be sent at most; more are counted into the next summary.
MAX_QUEUED = 200
# Lines of held alerts a summary quotes (the rest are counted by event only).
SUMMARY_LINES = 10
SEND_TIMEOUT_S = 10.0
# At stop: how long the last alerts (e.g. "stopping") may take to go out.
FLUSH_S = 3.0

# An alert's words: (event, language, fields) -> text. botd's are in bots/texts.py.
Render = Callable[..., str]


def _plain(event: str, lang: str, **fields: Any) -> str:
    """The fallback rendering when no texts are given (and when a text cannot be filled in)."""
    instance = fields.pop("instance", "")
    detail = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"[botd {instance}] {event}" + (f": {detail}" if detail else "")


def truncate_utf8(text: str, max_bytes: int, ellipsis: str = "…") -> str:
    """``text`` cut to at most ``max_bytes`` bytes of UTF-8, never inside a character."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    room = max(0, max_bytes - len(ellipsis.encode("utf-8")))
    return data[:room].decode("utf-8", "ignore") + ellipsis


def webhook_key(value: str) -> str:
    """The robot's key from a secret's value: the key itself, or the whole webhook URL."""
    value = value.strip()
    if value.startswith(("http://", "https://")):
        keys = parse_qs(urlsplit(value).query).get("key") or [""]
        return keys[0]
    return value


def mask_secrets(text: str) -> str:
    """``text`` with every secret value botd has resolved replaced by ``***`` (an alert's detail
    may quote an error message)."""
    _, values = known_secrets()
    for v in sorted(values, key=len, reverse=True):
        if v in text:
            text = text.replace(v, "***")
    return text


@dataclass(slots=True)
class _Alert:
    event: str
    text: str


class Notifier:
    """``async with Notifier(settings, render):`` for the daemon's lifetime; ``post(event, **fields)``
    from anywhere on its event loop (its thread). ``window_s`` and ``max_per_window`` are the
    platform's limit (tests shorten the window)."""

    def __init__(self, settings: Settings, render: Render | None = None, *,
                 clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S,
                 max_per_window: int = MAX_PER_WINDOW) -> None:
        self.settings = settings
        self.render = render or _plain
        self.clock = clock
        self.window_s = window_s
        self.max_per_window = max_per_window
        self._queue: deque[_Alert] = deque()
        self._held: list[_Alert] = []  # found the window full: they go out as one summary
        self._held_counts: Counter[str] = Counter()
        self._sent: deque[float] = deque()  # when each POST of the window went out
        self._paused_until = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failing = ""  # the kind of failure already logged ("" after a success)
        self._sending = False
        self.posts = 0  # POSTs made (tests, metrics)

    @property
    def cfg(self) -> NotifyConfig | None:
        return NotifyConfig.of(self.settings.config)

    # -- the callers' side: never raises, never waits -------------------------------------------

    def post(self, event: str, **fields: Any) -> None:
        """Queue the alert ``event`` (if [notify] is set and lists it); returns at once."""
        try:
            cfg = self.cfg
            if cfg is None or event not in cfg.events:
                return
            text = self._text(cfg, event, fields)
            if self._task is None:
                log.info("alert not sent: the notifier is not running", alert=event)
                return
            if len(self._queue) >= MAX_QUEUED:
                self._hold(_Alert(event, text))
            else:
                self._queue.append(_Alert(event, text))
            self._wake.set()
        except Exception:
            log.exception("alert could not be queued", alert=event)

    async def notify(self, event: str, **fields: Any) -> None:
        """The same as :meth:`post`, for callers that prefer to await."""
        self.post(event, **fields)

    def _text(self, cfg: NotifyConfig, event: str, fields: dict[str, Any]) -> str:
        fields = {"instance": self.settings.config.server.instance_name(), **fields}
        try:
            text = self.render(event, cfg.language, **fields)
        except Exception:  # a text without its field: the alert still goes out, plainly
            log.exception("alert text could not be filled in", alert=event)
            text = _plain(event, cfg.language, **fields)
        return mask_secrets(text)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Notifier:
        self._task = asyncio.create_task(self._run(), name="botd-notify")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, flush_s: float = FLUSH_S) -> None:
        task, self._task = self._task, None
        if task is not None:
            # The last alerts ("stopping") get a moment to go out; a dead webhook does not hold the stop.
            deadline = self.clock() + flush_s
            while (self._queue or self._held or self._sending) and self.clock() < deadline and not task.done():
                if self._held and not self._queue and not self._sending and self._room() == 0:
                    break  # the summary would wait for the window: it cannot go out now
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = len(self._queue) + sum(self._held_counts.values())
        if left:
            log.warning("alerts not sent at stop", count=left,
                        alerts=sorted({a.event for a in self._queue} | set(self._held_counts)))
        self._queue.clear()
        self._held.clear()
        self._held_counts.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the sending side ------------------------------------------------------------------------

    def _room(self) -> int:
        """POSTs the window allows now."""
        now = self.clock()
        if now < self._paused_until:
            return 0
        while self._sent and self._sent[0] <= now - self.window_s:
            self._sent.popleft()
        return self.max_per_window - len(self._sent)

    def _next_room_in(self) -> float:
        now = self.clock()
        if now < self._paused_until:
            return self._paused_until - now
        if not self._sent:
            return 0.0
        return max(0.0, self._sent[0] + self.window_s - now)

    def _hold(self, alert: _Alert) -> None:
        self._held.append(alert)
        del self._held[:-SUMMARY_LINES]  # the latest lines are kept
        self._held_counts[alert.event] += 1

    def _summary(self, cfg: NotifyConfig) -> _Alert:
        n = sum(self._held_counts.values())
        counts = ", ".join(f"{event} ×{c}" for event, c in self._held_counts.most_common())
        lines = "\n".join("- " + a.text.splitlines()[0] if a.text else "-" for a in self._held)
        text = self._text(cfg, "suppressed", {"n": n, "limit": self.max_per_window, "counts": counts,
                                              "lines": lines})
        self._held.clear()
        self._held_counts.clear()
        return _Alert("suppressed", text)

    async def _run(self) -> None:
        while True:
            if not self._queue and not self._held:
                self._wake.clear()
                await self._wake.wait()
                continue
            cfg = self.cfg
            if cfg is None:  # [notify] removed by a reload: what waits is dropped, and said so
                log.info("notifications turned off: queued alerts dropped",
                         count=len(self._queue) + sum(self._held_counts.values()))
                self._queue.clear()
                self._held.clear()
                self._held_counts.clear()
                continue
            if self._room() <= 0:
                # The window is full: what waits is held for the summary; wait for room (or
                # for a new alert to hold), without spinning.
                while self._queue:
                    self._hold(self._queue.popleft())
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.01, self._next_room_in()))
                continue
            alert = self._summary(cfg) if self._held else self._queue.popleft()
            self._sending = True
            try:
                await self._send(cfg, alert)
            except Exception:  # a bug here must not end the alerts for good
                log.exception("alert not sent", alert=alert.event)
            finally:
                self._sending = False

    async def _send(self, cfg: NotifyConfig, alert: _Alert) -> None:
        try:
            key = webhook_key(resolve_secret(cfg.wecom_webhook))
        except SecretError as exc:
            self._failed("secret", "alert not sent: the webhook key cannot be read", alert, error=str(exc))
            return
        if len(key) >= 6:
            remember_secret(key)  # masked wherever it might turn up in the log
        body = self._body(cfg, alert.text)
        self.posts += 1
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S))
            async with self._session.post(f"{cfg.url}/cgi-bin/webhook/send", params={"key": key},
                                          json=body) as resp:
                status = resp.status
                try:
                    answer = await resp.json(content_type=None) if status == 200 else None
                except ValueError:  # not JSON: not the robot's API
                    answer = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._sent.append(self.clock())
            # The exception's text may hold the URL: only its kind is logged.
            self._failed("unreachable", "alert not sent: the webhook cannot be reached", alert,
                         error=type(exc).__name__)
            return
        # Counted from its answer, the latest moment the platform can have counted it: the window
        # then starts no earlier than the platform's own (a slow first connection cannot make
        # the 21st POST arrive inside the platform's minute).
        self._sent.append(self.clock())
        if status != 200 or not isinstance(answer, dict):
            self._failed(f"http {status}", "alert not sent: the webhook answered with an error", alert,
                         status=status)
            return
        errcode = answer.get("errcode", 0)
        if errcode != 0:
            if errcode == THROTTLED_ERRCODE:
                # Throttled (another sender uses this robot too): nothing more for a while.
                self._paused_until = self.clock() + THROTTLED_PAUSE_S
                self._hold(alert)
            self._failed(f"errcode {errcode}", "alert not sent: the webhook refused it", alert,
                         errcode=errcode, errmsg=str(answer.get("errmsg", ""))[:200])
            return
        if self._failing:
            log.info("alerts are delivered again")
        self._failing = ""
        log.debug("alert sent", alert=alert.event)

    def _failed(self, kind: str, message: str, alert: _Alert, **fields: Any) -> None:
        """Log a failure once per kind until a send succeeds again; each alert at debug level."""
        if kind != self._failing:
            log.error(message, alert=alert.event, **fields)
            self._failing = kind
        else:
            log.debug(message, alert=alert.event, **fields)

    def _body(self, cfg: NotifyConfig, text: str) -> dict[str, Any]:
        limit = MAX_BYTES[cfg.format]
        if cfg.format == "markdown":
            # Markdown messages mention with <@userid> in the text (mentioned_list is text only).
            mentions = "".join(f"<@{m}>" for m in cfg.mention)
            suffix = f"\n{mentions}" if mentions else ""
            content = truncate_utf8(text, limit - len(suffix.encode("utf-8"))) + suffix
            return {"msgtype": "markdown", "markdown": {"content": content}}
        payload: dict[str, Any] = {"content": truncate_utf8(text, limit)}
        if cfg.mention:
            payload["mentioned_list"] = list(cfg.mention)
        return {"msgtype": "text", "text": payload}
