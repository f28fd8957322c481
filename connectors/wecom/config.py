"""[wecom.NAME]: one WeCom self-built app (自建应用) per table. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from connectors.sections import AccountSection
from connectors.wecom_common.config import encoding_aes_key_problem
from core.secrets import Secret, SecretForm


class WecomConfig(AccountSection):
    """One WeCom self-built app (自建应用) in callback mode, answering as the bot of the same name."""

    doc_zh: ClassVar[str] = "一个企业微信自建应用（回调模式），以同名机器人回答。"

    SECTION: ClassVar[str] = "wecom"
    ROUTES: ClassVar[tuple[str, ...]] = ("/wecom",)

    corp_id: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="Your CorpID (我的企业 -> 企业信息 -> 企业ID).",
        json_schema_extra={"zh": "企业的 CorpID（我的企业 -> 企业信息 -> 企业ID）。"})
    agent_id: Annotated[int, Field(ge=1)] = Field(
        description="The app's AgentId (应用管理 -> the app).",
        json_schema_extra={"zh": "应用的 AgentId（应用管理 -> 该应用）。"})
    token: Secret = Field(
        description="The callback Token (接收消息 -> 设置API接收): a secret reference.",
        json_schema_extra={"zh": "回调 Token（接收消息 -> 设置API接收）：秘密引用。"})
    encoding_aes_key: Annotated[Secret, SecretForm(encoding_aes_key_problem)] = Field(
        description="The callback EncodingAESKey (43 characters of base64): a secret reference.",
        json_schema_extra={"zh": "回调 EncodingAESKey（43 个 base64 字符）：秘密引用。"})
    secret: Secret = Field(
        description="The app's Secret, for sending replies: a secret reference.",
        json_schema_extra={"zh": "应用的 Secret，用于发送回复：秘密引用。"})
    api_base: str = Field(
        default="https://qyapi.weixin.qq.com",
        description="WeCom's API; change for a private deployment or a proxy.",
        json_schema_extra={"zh": "企业微信的 API 地址；私有部署或代理时修改。"})
    allow_users: list[str] = Field(
        default_factory=list,
        description="Only these user ids may use the app; empty: everyone who can see it.",
        json_schema_extra={"zh": "只有这些用户 id 可以使用该应用；留空：所有能看到它的人。"})
    allow_departments: list[int] = Field(
        default_factory=list,
        description="Only users of these department ids may use the app; empty: all.",
        json_schema_extra={"zh": "只有这些部门 id 的用户可以使用该应用；留空：全部。"})
    reply_format: Literal["text", "markdown"] = Field(
        default="text",
        description='"text", or "markdown" (rendered in the WeCom client, not in WeChat).',
        json_schema_extra={"zh": '"text"，或 "markdown"（在企业微信客户端中渲染，微信中不渲染）。'})
    routes: dict[str, str] = Field(
        default_factory=dict,
        description='Send some users to another bot (and its knowledge bases): { "zhangsan" = "finance" }.',
        json_schema_extra={"zh": '把某些用户交给另一个机器人（及其知识库）：{ "zhangsan" = "finance" }。'})
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = Field(
        default=300,
        description="A callback whose signed timestamp or CreateTime is further than this many seconds from this "
                    "machine's clock is refused (a replayed capture); keep the clock synced (NTP).",
        json_schema_extra={"zh": "签名时间戳或 CreateTime 与本机时钟相差超过这么多秒的回调被拒绝（重放的抓包）；请"
                                 "保持时钟同步（NTP）。"})

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")
