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

    SECTION: ClassVar[str] = "wecom_aibot"

    enabled: bool = True
    mode: Literal["websocket", "callback"] = "websocket"
    # Long connection: the BotID and the long-connection Secret from the bot's API settings.
    bot_id: Annotated[str, Field(max_length=128)] = ""
    secret: Secret | None = None
    ws_url: str = "wss://openws.work.weixin.qq.com"
    # Callback mode: the Token and EncodingAESKey set beside the callback URL.
    token: Secret | None = None
    encoding_aes_key: Annotated[Secret, SecretForm(encoding_aes_key_problem)] | None = None
    # Only these user ids / group chat ids may use the bot; empty lists allow everyone.
    allow_users: list[str] = Field(default_factory=list)
    allow_chats: list[str] = Field(default_factory=list)
    # In group chats: one history per chat ("chat") or per member ("member").
    group_history: Literal["chat", "member"] = "chat"
    # Shortest time between two updates of a streamed answer, in seconds.
    update_interval_s: Annotated[float, Field(ge=0.1, le=10)] = 0.5
    # An update at least this often while nothing new is written (WeCom drops a silent stream).
    keepalive_s: Annotated[float, Field(ge=1, le=290)] = 240.0
    # The stream is finished within this many seconds (WeCom's window is 6 minutes); the rest
    # of a longer answer follows as a pushed message.
    stream_window_s: Annotated[float, Field(ge=1, le=350)] = 330.0
    # Answers open at once per user (WeCom allows 3); a further one waits its turn.
    max_in_flight: Annotated[int, Field(ge=1, le=3)] = 3
    # Long connection: heartbeat interval and the longest wait between reconnection attempts.
    heartbeat_s: Annotated[float, Field(ge=1, le=120)] = 30.0
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = 60.0
    # Send some user or group chat ids to another bot (and so to its knowledge bases).
    routes: dict[str, str] = Field(default_factory=dict)
    # Callback mode: a callback whose signed timestamp (or create_time) is further than this
    # from the clock is refused unanswered (a replay).
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = 300

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
