"""[wecom.NAME]: one WeCom self-built app (自建应用) per table. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from connectors.sections import AccountSection
from connectors.wecom_common.config import encoding_aes_key_problem
from core.secrets import Secret, SecretForm


class WecomConfig(AccountSection):
    """One WeCom self-built app (自建应用) in callback mode, answering as the bot of the same name."""

    SECTION: ClassVar[str] = "wecom"

    corp_id: Annotated[str, Field(min_length=1, max_length=64)]
    agent_id: Annotated[int, Field(ge=1)]
    # Callback Token and EncodingAESKey (接收消息 API), and the app's Secret: secret references.
    token: Secret
    encoding_aes_key: Annotated[Secret, SecretForm(encoding_aes_key_problem)]
    secret: Secret
    api_base: str = "https://qyapi.weixin.qq.com"
    # Only these user ids / department ids may use the app; empty lists allow everyone.
    allow_users: list[str] = Field(default_factory=list)
    allow_departments: list[int] = Field(default_factory=list)
    # "text", or "markdown" when the bot's answers use formatting.
    reply_format: Literal["text", "markdown"] = "text"
    # Send some user ids to another bot (and so to its knowledge bases): { "<user id>" = "bot" }.
    routes: dict[str, str] = Field(default_factory=dict)
    # A callback whose signed timestamp (or message CreateTime) is further than this from the
    # clock is refused unanswered: a captured callback cannot be replayed later.
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = 300

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")
