"""[wecom_aibot.NAME]: one WeCom AI bot (智能机器人) per table. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from connectors.sections import AccountSection
from connectors.wecom_common.config import encoding_aes_key_problem
from core.secrets import Secret, SecretForm


class WecomAibotConfig(AccountSection):
    """One WeCom AI bot (智能机器人), answering as the botd bot of the same name: over WeCom's long
    connection (a WebSocket botd opens; no public address) or in callback mode (WeCom POSTs
    encrypted JSON to /wecom_aibot/<bot>)."""

    doc_zh: ClassVar[str] = "一个企业微信智能机器人，以同名机器人回答：经长连接（无需公网地址）或回调模式。"

    SECTION: ClassVar[str] = "wecom_aibot"
    ROUTES: ClassVar[tuple[str, ...]] = ("/wecom_aibot",)

    enabled: bool = Field(
        default=True,
        description="false keeps the section without connecting or answering.",
        json_schema_extra={"zh": "false：保留该小节，但不连接也不回答。"})
    mode: Literal["websocket", "callback"] = Field(
        default="websocket",
        description="\"websocket\": botd opens WeCom's long connection (no public address needed); \"callback\": "
                    "WeCom POSTs encrypted JSON to /wecom_aibot/NAME.",
        json_schema_extra={"zh": '"websocket"：botd 建立企业微信的长连接（无需公网地址）；"callback"：企业微信把加'
                                 "密的 JSON POST 到 /wecom_aibot/NAME。"})
    bot_id: Annotated[str, Field(max_length=128)] = Field(
        default="",
        description="Long connection: the BotID from the bot's API settings.",
        json_schema_extra={"zh": "长连接：机器人 API 设置中的 BotID。"})
    secret: Secret | None = Field(
        default=None,
        description="Long connection: the long-connection Secret: a secret reference.",
        json_schema_extra={"zh": "长连接：长连接 Secret：秘密引用。"})
    ws_url: str = Field(
        default="wss://openws.work.weixin.qq.com",
        description="Long connection: WeCom's WebSocket address.",
        json_schema_extra={"zh": "长连接：企业微信的 WebSocket 地址。"})
    token: Secret | None = Field(
        default=None,
        description="Callback mode: the Token set beside the callback URL: a secret reference.",
        json_schema_extra={"zh": "回调模式：与回调 URL 一起设置的 Token：秘密引用。"})
    encoding_aes_key: Annotated[Secret, SecretForm(encoding_aes_key_problem)] | None = Field(
        default=None,
        description="Callback mode: the EncodingAESKey set beside the callback URL: a secret reference.",
        json_schema_extra={"zh": "回调模式：与回调 URL 一起设置的 EncodingAESKey：秘密引用。"})
    allow_users: list[str] = Field(
        default_factory=list,
        description="Only these user ids may use the bot; empty: all.",
        json_schema_extra={"zh": "只有这些用户 id 可以使用机器人；留空：全部。"})
    allow_chats: list[str] = Field(
        default_factory=list,
        description="Only these group chat ids may use the bot (a single chat's id is the user id); empty: all.",
        json_schema_extra={"zh": "只有这些群聊 id 可以使用机器人（单聊的 id 就是用户 id）；留空：全部。"})
    group_history: Literal["chat", "member"] = Field(
        default="chat",
        description='In group chats: one history per chat ("chat") or per member ("member").',
        json_schema_extra={"zh": '群聊中：每个群一份历史（"chat"）或每个成员一份（"member"）。'})
    update_interval_s: Annotated[float, Field(ge=0.1, le=10)] = Field(
        default=0.5,
        description="Shortest time between two updates of a streamed answer, in seconds.",
        json_schema_extra={"zh": "流式回答两次更新之间的最短时间（秒）。"})
    keepalive_s: Annotated[float, Field(ge=1, le=290)] = Field(
        default=240.0,
        description="An update at least this often while nothing new is written (WeCom drops a silent stream).",
        json_schema_extra={"zh": "没有新内容时也至少每隔这么久更新一次（企业微信会丢弃沉默的流）。"})
    stream_window_s: Annotated[float, Field(ge=1, le=350)] = Field(
        default=330.0,
        description="The stream is finished within this many seconds (WeCom's window is 6 minutes); the rest of a "
                    "longer answer follows as a pushed message.",
        json_schema_extra={"zh": "流在这么多秒内结束（企业微信的窗口为 6 分钟）；更长回答的其余部分以推送消息发出。"})
    max_in_flight: Annotated[int, Field(ge=1, le=3)] = Field(
        default=3,
        description="Answers open at once per user (WeCom allows 3); a further one waits its turn.",
        json_schema_extra={"zh": "每个用户同时进行的回答数（企业微信允许 3 个）；更多的排队等候。"})
    heartbeat_s: Annotated[float, Field(ge=1, le=120)] = Field(
        default=30.0,
        description="Long connection: heartbeat interval, in seconds.",
        json_schema_extra={"zh": "长连接：心跳间隔（秒）。"})
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = Field(
        default=60.0,
        description="Long connection: the longest wait between reconnection attempts, in seconds.",
        json_schema_extra={"zh": "长连接：两次重连之间的最长等待（秒）。"})
    routes: dict[str, str] = Field(
        default_factory=dict,
        description="Send some user or group chat ids to another bot (and its knowledge bases).",
        json_schema_extra={"zh": "把某些用户或群聊 id 交给另一个机器人（及其知识库）。"})
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = Field(
        default=300,
        description="Callback mode: a callback signed more than this many seconds from this machine's clock is "
                    "refused (a replay).",
        json_schema_extra={"zh": "回调模式：签名时间与本机时钟相差超过这么多秒的回调被拒绝（重放）。"})

    @field_validator("ws_url")
    @classmethod
    def _ws_url(cls, v: str) -> str:
        if not v.startswith(("wss://", "ws://")):
            raise ValueError("must be a ws(s):// URL")
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> WecomAibotConfig:
        if self.mode == "websocket":
            if not self.bot_id:
                raise ValueError("websocket mode needs bot_id (the BotID from the bot's API settings)")
            if self.secret is None:
                raise ValueError('websocket mode needs secret (e.g. "env:WECOM_AIBOT_SECRET")')
        else:
            if self.token is None:
                raise ValueError('callback mode needs token (e.g. "env:WECOM_AIBOT_TOKEN")')
            if self.encoding_aes_key is None:
                raise ValueError('callback mode needs encoding_aes_key (e.g. "env:WECOM_AIBOT_AES_KEY")')
        if self.keepalive_s >= self.stream_window_s:
            raise ValueError("keepalive_s must be shorter than stream_window_s")
        return self
