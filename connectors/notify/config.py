"""[notify]: admin alerts to a WeCom group robot (群机器人). Light: pydantic and core only."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from core.config import OptionalSection
from core.secrets import Secret, SecretForm

# The alerts [notify] can send; NOTIFY_DEFAULT_EVENTS is what it sends unless `events` says otherwise.
NOTIFY_EVENTS = ("ingest_failed", "ingest_skipped", "redis_down", "redis_up", "model_reload", "model_failed",
                 "reload_failed", "dead_letter", "started", "stopping")
NOTIFY_DEFAULT_EVENTS = ("ingest_failed", "ingest_skipped", "redis_down", "redis_up", "model_reload",
                         "model_failed", "reload_failed", "dead_letter")


def _robot_key_problem(value: str) -> str:
    value = value.strip()
    if value.startswith(("http://", "https://")):
        value = next((p[4:] for p in value.partition("?")[2].split("&") if p.startswith("key=")), "")
    ok = re.fullmatch(r"[A-Za-z0-9_-]{1,128}", value) is not None
    return "" if ok else ("a group robot's key (the part after key= in its webhook URL), or the whole webhook "
                          "URL, from the robot's settings in the group")


class NotifyConfig(OptionalSection):
    """Admin alerts to a WeCom group robot (群机器人): outgoing only."""

    SECTION: ClassVar[str] = "notify"

    # The robot's webhook key, or its whole webhook URL: a secret reference.
    wecom_webhook: Annotated[Secret, SecretForm(_robot_key_problem)]
    # Where the webhook API lives (tests point it at a local fake).
    url: str = "https://qyapi.weixin.qq.com"
    # The language of the alerts: "zh", "en" or "both".
    language: Literal["zh", "en", "both"] = "zh"
    events: list[str] = Field(default_factory=lambda: list(NOTIFY_DEFAULT_EVENTS))
    format: Literal["text", "markdown"] = "text"
    # Group members to @ (WeCom user ids; "@all" for everyone).
    mention: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")

    @field_validator("events")
    @classmethod
    def _known_events(cls, v: list[str]) -> list[str]:
        for event in v:
            if event not in NOTIFY_EVENTS:
                raise ValueError(f"unknown event {event!r}; events: {', '.join(NOTIFY_EVENTS)}")
        return v
