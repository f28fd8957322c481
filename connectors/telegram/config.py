"""[telegram.NAME]: one Telegram bot per table. Light: pydantic and core only."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from connectors.sections import AccountSection
from core.secrets import Secret, SecretForm


def _webhook_secret_problem(value: str) -> str:
    ok = re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value) is not None
    return "" if ok else "Telegram accepts 1-256 characters of A-Z, a-z, 0-9, _ and -"


class TelegramConfig(AccountSection):
    """One Telegram bot (from @BotFather), answering as the botd bot of the same name."""

    doc_zh: ClassVar[str] = "一个 Telegram 机器人（由 @BotFather 创建），以同名机器人回答。"

    SECTION: ClassVar[str] = "telegram"
    ROUTES: ClassVar[tuple[str, ...]] = ("/telegram",)

    token: Secret = Field(
        description="The bot token from @BotFather: a secret reference.",
        json_schema_extra={"zh": "@BotFather 给出的机器人令牌：秘密引用。"})
    mode: Literal["polling", "webhook"] = Field(
        default="polling",
        description='"polling" (getUpdates; no public address needed) or "webhook" (POST /telegram/NAME).',
        json_schema_extra={"zh": '"polling"（getUpdates；无需公网地址）或 "webhook"（POST /telegram/NAME）。'})
    webhook_url: str = Field(
        default="",
        description="Webhook mode: the public HTTPS URL `botd telegram set-webhook` registers.",
        json_schema_extra={"zh": "webhook 模式：`botd telegram set-webhook` 注册的公网 HTTPS 地址。"})
    webhook_secret: Annotated[Secret, SecretForm(_webhook_secret_problem)] | None = Field(
        default=None,
        description="Webhook mode: the secret Telegram sends back in X-Telegram-Bot-Api-Secret-Token (A-Z a-z 0-9 _ "
                    "-): a secret reference.",
        json_schema_extra={"zh": "webhook 模式：Telegram 在 X-Telegram-Bot-Api-Secret-Token 中回传的密钥（A-Z a-z "
                                 "0-9 _ -）：秘密引用。"})
    api_base: str = Field(
        default="https://api.telegram.org/bot",
        description="The Bot API server (a local Bot API server or a proxy may stand here).",
        json_schema_extra={"zh": "Bot API 服务器（可以换成本地 Bot API 服务器或代理）。"})
    group_history: Literal["chat", "member"] = Field(
        default="chat",
        description='In groups: one history per chat/topic ("chat") or per member ("member").',
        json_schema_extra={"zh": '群组中：每个会话/话题一份历史（"chat"）或每个成员一份（"member"）。'})
    allow_chats: list[int] = Field(
        default_factory=list,
        description="Only these chat ids are answered; empty: all.",
        json_schema_extra={"zh": "只回答这些会话 id；留空：全部。"})
    allow_users: list[int] = Field(
        default_factory=list,
        description="Only these user ids are answered; empty: all.",
        json_schema_extra={"zh": "只回答这些用户 id；留空：全部。"})
    edit_interval_private_s: Annotated[float, Field(ge=0.1, le=60)] = Field(
        default=1.0,
        description="Private chats: shortest time between two edits of a streamed answer, in seconds.",
        json_schema_extra={"zh": "私聊：流式回答两次编辑之间的最短时间（秒）。"})
    edit_interval_group_s: Annotated[float, Field(ge=0.1, le=60)] = Field(
        default=3.0,
        description="Groups: shortest time between two edits of a streamed answer, in seconds.",
        json_schema_extra={"zh": "群组：流式回答两次编辑之间的最短时间（秒）。"})
    poll_timeout_s: Annotated[int, Field(ge=0, le=50)] = Field(
        default=25,
        description="Long-polling timeout, in seconds.",
        json_schema_extra={"zh": "长轮询超时（秒）。"})
    routes: dict[str, str] = Field(
        default_factory=dict,
        description='Send some chat ids to another bot (and its knowledge bases): { "-1001234567" = "finance" }.',
        json_schema_extra={"zh": '把某些会话 id 交给另一个机器人（及其知识库）：{ "-1001234567" = "finance" }。'})

    @model_validator(mode="after")
    def _webhook_needs(self) -> TelegramConfig:
        if self.mode == "webhook" and self.webhook_secret is None:
            raise ValueError("webhook mode needs webhook_secret (e.g. \"env:TELEGRAM_WEBHOOK_SECRET\")")
        if self.webhook_url and not self.webhook_url.startswith("https://"):
            raise ValueError("webhook_url must be https:// (Telegram only calls HTTPS webhooks)")
        return self
