"""The ``[dingtalk.NAME]`` config section: one DingTalk enterprise internal app's robot
(企业内部应用机器人), answering as the botd bot NAME. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from connectors.sections import AccountSection
from core.secrets import Secret


def _key(default: Any, en: str, zh: str, **kw: Any) -> Any:
    """A key's default and its description in English and Chinese."""
    return Field(default, description=en, json_schema_extra={"zh": zh}, **kw)


def _http_base(v: str) -> str:
    if not v.startswith(("https://", "http://")):
        raise ValueError("must be an http(s) URL")
    return v.rstrip("/")


class DingtalkConfig(AccountSection):
    """One DingTalk robot of an enterprise internal app (企业内部应用), answering as the bot of the
    same name: over Stream mode (a WebSocket botd opens; no public address) or HTTP callbacks."""

    SECTION: ClassVar[str] = "dingtalk"
    ROUTES: ClassVar[tuple[str, ...]] = ("/dingtalk",)
    doc_zh: ClassVar[str] = ("一个钉钉企业内部应用的机器人，以同名机器人回答：经 Stream 模式（botd 建立的 WebSocket，"
                             "无需公网地址）或 HTTP 回调。")

    enabled: bool = _key(True, "Whether botd connects this robot.", "是否连接这个机器人。")
    mode: Literal["stream", "callback"] = _key(
        "stream", '"stream" (a long connection botd opens; no public address) or "callback" (DingTalk POSTs each '
                  "message to /dingtalk/NAME).",
        "“stream”（botd 主动建立长连接，无需公网地址）或“callback”（钉钉把每条消息 POST 到 /dingtalk/NAME）。")
    client_id: Annotated[str, Field(min_length=1, max_length=128)] = _key(
        ..., "The app's Client ID (AppKey), on the app's 凭证与基础信息 page.",
        "应用的 Client ID（AppKey），见应用的「凭证与基础信息」页。")
    client_secret: Secret = _key(
        ..., 'The app\'s Client Secret (AppSecret): a secret reference, e.g. "env:DINGTALK_SECRET". It also keys '
             "the callback signature.",
        "应用的 Client Secret（AppSecret）：填密钥引用，如 env:DINGTALK_SECRET；回调签名也用它。")
    robot_code: Annotated[str, Field(max_length=128)] = _key(
        "", "The robot's RobotCode for OpenAPI sends; empty: the client_id (as for an internal app).",
        "机器人的 RobotCode（OpenAPI 发消息用）；留空则用 client_id（企业内部应用即如此）。")
    card_template_id: Annotated[str, Field(max_length=200)] = _key(
        "", "An AI card (AI 卡片) template id: answers stream into this card. Empty: markdown replies (need no card "
            "permission).",
        "AI 卡片模板 ID：回答以流式更新写入该卡片。留空则回复 Markdown 消息（无需卡片权限）。")
    card_content_key: Annotated[str, Field(min_length=1, max_length=64)] = _key(
        "content", "The template's variable the answer streams into.", "模板中承载回答内容的变量名。")
    api_base: str = _key("https://api.dingtalk.com", "DingTalk's new OpenAPI.", "钉钉新版 OpenAPI 地址。")
    oapi_base: str = _key("https://oapi.dingtalk.com", "DingTalk's old OpenAPI.", "钉钉旧版 OpenAPI 地址。")
    allow_users: list[str] = _key(
        [], "Only these user ids (staff ids) may use the robot; empty: everyone.",
        "只允许这些用户 ID（staffId）使用；留空则所有人可用。")
    allow_chats: list[str] = _key(
        [], "Only these conversation ids (groups) may use it; empty: all.",
        "只允许这些会话 ID（群）使用；留空则全部可用。")
    allow_departments: list[int] = _key(
        [], "Only users of these department ids may use it; empty: all.",
        "只允许这些部门 ID 的成员使用；留空则全部可用。")
    group_history: Literal["chat", "member"] = _key(
        "chat", 'In groups: one history per group ("chat") or per member ("member").',
        "群聊中：整个群共用一份历史（chat）或每位成员一份（member）。")
    update_interval_s: Annotated[float, Field(ge=0.2, le=10)] = _key(
        0.8, "Shortest time between two updates of a streamed card, in seconds.",
        "流式卡片两次更新之间的最短间隔（秒）。")
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = _key(
        60.0, "Stream mode: the longest wait between two reconnection attempts, in seconds.",
        "Stream 模式：两次重连尝试之间的最长等待（秒）。")
    routes: dict[str, str] = _key(
        {}, 'Send some conversation or user ids to another bot: { "<id>" = "bot" }.',
        "把某些会话或用户 ID 交给另一个机器人：{ 会话ID = 机器人名 }。")
    department_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = _key(
        3600, "How long a user's department ids (contact API) are cached, in seconds.",
        "用户部门 ID（通讯录接口）的缓存时长（秒）。")
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = _key(
        3600, "Callback mode: a callback whose signed timestamp is further than this from the clock is refused "
              "before it is read (DingTalk's own window is one hour).",
        "回调模式：签名时间戳与当前时间相差超过此值的请求在读取前即被拒绝（钉钉自身的窗口为 1 小时）。")

    @field_validator("api_base", "oapi_base")
    @classmethod
    def _bases(cls, v: str) -> str:
        return _http_base(v)

    @property
    def robot(self) -> str:
        return self.robot_code or self.client_id
