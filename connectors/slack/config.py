"""[slack.NAME]: one Slack app per table. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from connectors.sections import AccountSection
from core.secrets import Secret


class SlackConfig(AccountSection):
    """One Slack app, answering as the botd bot of the same name."""

    doc_zh: ClassVar[str] = "一个 Slack 应用，以同名机器人回答。"

    SECTION: ClassVar[str] = "slack"
    ROUTES: ClassVar[tuple[str, ...]] = ("/slack",)

    bot_token: Secret = Field(
        description='The bot token (xoxb-...) from "OAuth & Permissions": a secret reference.',
        json_schema_extra={"zh": '"OAuth & Permissions" 中的机器人令牌（xoxb-...）：秘密引用。'})
    mode: Literal["http", "socket"] = Field(
        default="http",
        description='"http" (Events API at POST /slack/events) or "socket" (Socket Mode, no public address).',
        json_schema_extra={"zh": '"http"（Events API，POST /slack/events）或 "socket"（Socket Mode，无需公网地址）'
                                 "。"})
    signing_secret: Secret | None = Field(
        default=None,
        description='HTTP mode: the Signing Secret from "Basic Information": a secret reference.',
        json_schema_extra={"zh": 'HTTP 模式："Basic Information" 中的 Signing Secret：秘密引用。'})
    app_token: Secret | None = Field(
        default=None,
        description="Socket Mode: an app-level token (xapp-...) with connections:write: a secret reference.",
        json_schema_extra={"zh": "Socket Mode：带 connections:write 权限的应用级令牌（xapp-...）：秘密引用。"})
    api_base: str = Field(
        default="https://slack.com/api/",
        description="Slack's Web API base URL (a proxy may stand here); must end with \"/\".",
        json_schema_extra={"zh": 'Slack Web API 的基础地址（可以换成代理）；必须以 "/" 结尾。'})
    follow_threads: bool = Field(
        default=True,
        description="Answer follow-ups in a thread the bot has answered, without a new mention.",
        json_schema_extra={"zh": "在机器人回答过的话题中，无需再次 @ 也回答后续消息。"})
    allow_channels: list[str] = Field(
        default_factory=list,
        description="Only these channel ids are answered; empty: all.",
        json_schema_extra={"zh": "只回答这些频道 id；留空：全部。"})
    allow_users: list[str] = Field(
        default_factory=list,
        description="Only these user ids are answered; empty: all.",
        json_schema_extra={"zh": "只回答这些用户 id；留空：全部。"})
    update_interval_s: Annotated[float, Field(ge=0.1, le=60)] = Field(
        default=1.0,
        description="Shortest time between two chat.update calls of a streamed answer, in seconds.",
        json_schema_extra={"zh": "流式回答两次 chat.update 调用之间的最短时间（秒）。"})
    api_timeout_s: Annotated[float, Field(gt=0, le=120)] = Field(
        default=30.0,
        description="Timeout of one Web API call, in seconds; a timed-out post is never re-posted.",
        json_schema_extra={"zh": "一次 Web API 调用的超时（秒）；超时的发送绝不重发。"})
    slash_command: Annotated[str, Field(pattern=r"^/[a-z0-9_-]{1,31}$")] = Field(
        default="/assistant",
        description="The slash command's name, as created in the app (\"/assistant help\", \"/assistant reset\").",
        json_schema_extra={"zh": '应用中创建的斜杠命令名（"/assistant help"、"/assistant reset"）。'})
    routes: dict[str, str] = Field(
        default_factory=dict,
        description='Send some channel ids to another bot (and its knowledge bases): { "C0FINANCE" = "finance" }.',
        json_schema_extra={"zh": '把某些频道 id 交给另一个机器人（及其知识库）：{ "C0FINANCE" = "finance" }。'})

    @model_validator(mode="after")
    def _mode_needs(self) -> SlackConfig:
        if self.mode == "http" and self.signing_secret is None:
            raise ValueError('http mode needs signing_secret (e.g. "env:SLACK_SIGNING_SECRET")')
        if self.mode == "socket" and self.app_token is None:
            raise ValueError('socket mode needs app_token (e.g. "env:SLACK_APP_TOKEN")')
        if not self.api_base.endswith("/"):
            raise ValueError("api_base must end with '/'")
        return self
