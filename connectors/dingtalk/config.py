"""The ``[dingtalk.NAME]`` config section: one DingTalk enterprise internal app's robot
(企业内部应用机器人), answering as the botd bot NAME."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from connectors.sections import AccountSection
from core.secrets import Secret


def _http_base(v: str) -> str:
    if not v.startswith(("https://", "http://")):
        raise ValueError("must be an http(s) URL")
    return v.rstrip("/")


class DingtalkConfig(AccountSection):
    """One DingTalk robot of an enterprise internal app (企业内部应用), answering as the bot of the
    same name: over Stream mode (a WebSocket botd opens; no public address) or HTTP callbacks."""

    SECTION: ClassVar[str] = "dingtalk"

    enabled: bool = Field(True, description="Whether botd connects this robot.")
    mode: Literal["stream", "callback"] = Field(
        "stream", description='"stream" (a long connection botd opens; no public address) or "callback" '
                              "(DingTalk POSTs each message to /dingtalk/NAME).")
    client_id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="The app's Client ID (AppKey), from the app's 凭证与基础信息 page.")
    client_secret: Secret = Field(
        description='The app\'s Client Secret (AppSecret): a secret reference, e.g. "env:DINGTALK_SECRET". '
                    "It also keys the callback signature.")
    robot_code: Annotated[str, Field(max_length=128)] = Field(
        "", description="The robot's RobotCode for OpenAPI sends; empty: the client_id (as for an internal app).")
    card_template_id: Annotated[str, Field(max_length=200)] = Field(
        "", description="An AI card (AI 卡片) template id: answers stream into this card. Empty: markdown "
                        "replies (needs no card permission).")
    card_content_key: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        "content", description="The template's variable the answer streams into.")
    api_base: str = Field("https://api.dingtalk.com", description="DingTalk's new OpenAPI (api.dingtalk.com).")
    oapi_base: str = Field("https://oapi.dingtalk.com", description="DingTalk's old OpenAPI (oapi.dingtalk.com).")
    allow_users: list[str] = Field(default_factory=list,
                                   description="Only these user ids (staff ids) may use the robot; empty: all.")
    allow_chats: list[str] = Field(default_factory=list,
                                   description="Only these conversation ids (groups) may use it; empty: all.")
    allow_departments: list[int] = Field(default_factory=list,
                                         description="Only users of these department ids may use it; empty: all.")
    group_history: Literal["chat", "member"] = Field(
        "chat", description='In groups: one history per group ("chat") or per member ("member").')
    update_interval_s: Annotated[float, Field(ge=0.2, le=10)] = Field(
        0.8, description="Shortest time between two updates of a streamed card, in seconds.")
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = Field(
        60.0, description="Stream mode: the longest wait between two reconnection attempts, in seconds.")
    routes: dict[str, str] = Field(default_factory=dict,
                                   description='Send some conversation ids to another bot: { "<id>" = "bot" }.')
    department_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = Field(
        3600, description="How long a user's department ids (contact API) are cached, in seconds.")
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = Field(
        3600, description="Callback mode: a callback whose signed timestamp is further than this from the clock "
                          "is refused before it is read (DingTalk's own window is one hour).")

    @field_validator("api_base", "oapi_base")
    @classmethod
    def _bases(cls, v: str) -> str:
        return _http_base(v)

    @property
    def robot(self) -> str:
        return self.robot_code or self.client_id
