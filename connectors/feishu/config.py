"""The ``[feishu.NAME]`` config section: one Feishu / Lark self-built app's bot (自建应用机器人),
answering as the botd bot NAME."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from connectors.sections import AccountSection
from core.secrets import Secret

DOMAINS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}


class FeishuConfig(AccountSection):
    """One Feishu / Lark self-built app's bot, answering as the bot of the same name: over the
    long connection (长连接, a WebSocket botd opens; no public address) or event callbacks."""

    SECTION: ClassVar[str] = "feishu"

    enabled: bool = Field(True, description="Whether botd connects this app.")
    mode: Literal["websocket", "callback"] = Field(
        "websocket", description='"websocket" (the long connection; no public address) or "callback" (Feishu '
                                 "POSTs events to /feishu/NAME).")
    app_id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="The app's App ID (cli_...), from 凭证与基础信息.")
    app_secret: Secret = Field(description='The app\'s App Secret: a secret reference, e.g. "env:FEISHU_SECRET".')
    domain: Literal["feishu", "lark"] = Field(
        "feishu", description='"feishu" (open.feishu.cn) or "lark" (open.larksuite.com, Lark outside China).')
    api_base: str = Field("", description="Overrides the domain's address (a proxy, or a test's fake); empty: "
                                          "the domain's.")
    encrypt_key: Secret | None = Field(
        None, description="Callback mode: the Encrypt Key (事件订阅 > 加密策略); bodies are AES-256-CBC and "
                          "signed with it.")
    verification_token: Secret | None = Field(
        None, description="Callback mode: the Verification Token (事件订阅 > 加密策略).")
    streaming: Literal["cardkit", "patch", "off"] = Field(
        "cardkit", description='"cardkit": the answer streams into a card entity (needs 创建与更新卡片); "patch": '
                               'an interactive card patched at update_interval_s; "off": one message at the end.')
    reply_in_thread: bool = Field(False, description="Answer in a thread (话题) under the user's message.")
    all_group_messages: bool = Field(
        False, description="Answer group messages that do not @ the bot (needs the permission 获取群组中所有消息).")
    allow_users: list[str] = Field(default_factory=list,
                                   description="Only these open_ids may use the bot; empty: everyone.")
    allow_chats: list[str] = Field(default_factory=list,
                                   description="Only these chat ids (oc_...) may use the bot; empty: all.")
    allow_departments: list[str] = Field(
        default_factory=list, description="Only users of these open_department_ids may use it; empty: all.")
    group_history: Literal["chat", "member"] = Field(
        "chat", description='In groups: one history per chat ("chat") or per member ("member").')
    update_interval_s: Annotated[float, Field(ge=0.2, le=10)] = Field(
        0.5, description="Shortest time between two updates of a streamed answer, in seconds (a card takes 10 "
                         "a second at most).")
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = Field(
        60.0, description="Long connection: the longest wait between two reconnection attempts, in seconds.")
    routes: dict[str, str] = Field(default_factory=dict,
                                   description='Send some chat or user ids to another bot: { "<id>" = "bot" }.')
    department_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = Field(
        3600, description="How long a user's department ids (contact API) are cached, in seconds.")
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = Field(
        300, description="Callback mode: a request whose signed timestamp is further than this from the clock is "
                         "refused before it is decrypted.")

    @field_validator("api_base")
    @classmethod
    def _base(cls, v: str) -> str:
        if v and not v.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _mode_needs(self) -> FeishuConfig:
        # Without an Encrypt Key Feishu neither encrypts nor signs: anyone who saw one body could forge more.
        if self.mode == "callback" and self.encrypt_key is None:
            raise ValueError('callback mode needs encrypt_key (e.g. "env:FEISHU_ENCRYPT_KEY"; set one under '
                             "事件订阅 > 加密策略)")
        if self.mode == "callback" and self.verification_token is None:
            raise ValueError('callback mode needs verification_token (e.g. "env:FEISHU_VERIFICATION_TOKEN")')
        return self

    @property
    def base(self) -> str:
        return self.api_base or DOMAINS[self.domain]
