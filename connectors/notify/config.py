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

    doc_zh: ClassVar[str] = "发往企业微信群机器人的管理员告警：仅外发。"

    SECTION: ClassVar[str] = "notify"

    wecom_webhook: Annotated[Secret, SecretForm(_robot_key_problem)] = Field(
        description="The group robot's key (after key= in its webhook URL) or the whole webhook URL: a secret "
                    "reference.",
        json_schema_extra={"zh": "群机器人的 key（webhook 地址中 key= 之后的部分）或完整的 webhook 地址：秘密引用。"})
    url: str = Field(
        default="https://qyapi.weixin.qq.com",
        description="Where the webhook API lives.",
        json_schema_extra={"zh": "webhook API 的地址。"})
    language: Literal["zh", "en", "both"] = Field(
        default="zh",
        description="The alerts' language: \"zh\", \"en\" or \"both\".",
        json_schema_extra={"zh": '告警的语言："zh"、"en" 或 "both"。'})
    events: list[str] = Field(
        default_factory=lambda: list(NOTIFY_DEFAULT_EVENTS),
        description='The alerts sent; besides the default ones, "started" and "stopping".',
        json_schema_extra={"zh": '发送的告警；除默认的之外还有 "started" 和 "stopping"。'})
    format: Literal["text", "markdown"] = Field(
        default="text",
        description='"text" (2048 bytes at most) or "markdown" (4096).',
        json_schema_extra={"zh": '"text"（最多 2048 字节）或 "markdown"（4096）。'})
    mention: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        description='WeCom user ids to @ in each alert ("@all": everyone).',
        json_schema_extra={"zh": '每条告警中要 @ 的企业微信用户 id（"@all"：所有人）。'})

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
