"""The ``[feishu.NAME]`` config section: one Feishu / Lark self-built app's bot (自建应用机器人),
answering as the botd bot NAME. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from connectors.sections import AccountSection
from core.secrets import Secret

DOMAINS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}


def _key(default: Any, en: str, zh: str, **kw: Any) -> Any:
    """A key's default and its description in English and Chinese."""
    return Field(default, description=en, json_schema_extra={"zh": zh}, **kw)


class FeishuConfig(AccountSection):
    """One Feishu / Lark self-built app's bot, answering as the bot of the same name: over the
    long connection (长连接, a WebSocket botd opens; no public address) or event callbacks."""

    SECTION: ClassVar[str] = "feishu"
    ROUTES: ClassVar[tuple[str, ...]] = ("/feishu",)
    doc_zh: ClassVar[str] = ("一个飞书 / Lark 自建应用的机器人，以同名机器人回答：经长连接（botd 建立的 WebSocket，"
                             "无需公网地址）或事件回调。")

    enabled: bool = _key(True, "Whether botd connects this app.", "是否连接这个应用。")
    mode: Literal["websocket", "callback"] = _key(
        "websocket", '"websocket" (the long connection; no public address) or "callback" (Feishu POSTs events to '
                     "/feishu/NAME).",
        "“websocket”（长连接，无需公网地址）或“callback”（飞书把事件 POST 到 /feishu/NAME）。")
    app_id: Annotated[str, Field(min_length=1, max_length=128)] = _key(
        ..., "The app's App ID (cli_...), on 凭证与基础信息.", "应用的 App ID（cli_...），见「凭证与基础信息」。")
    app_secret: Secret = _key(..., 'The app\'s App Secret: a secret reference, e.g. "env:FEISHU_SECRET".',
                              "应用的 App Secret：填密钥引用，如 env:FEISHU_SECRET。")
    domain: Literal["feishu", "lark"] = _key(
        "feishu", '"feishu" (open.feishu.cn) or "lark" (open.larksuite.com, Lark outside China).',
        "“feishu”（open.feishu.cn）或“lark”（open.larksuite.com，海外版 Lark）。")
    api_base: str = _key("", "Overrides the domain's address (a proxy, or a test's fake); empty: the domain's.",
                         "覆盖 domain 对应的地址（代理，或测试用的假服务）；留空则用 domain 的地址。")
    encrypt_key: Secret | None = _key(
        None, "Callback mode: the Encrypt Key (事件与回调 > 加密策略); bodies are AES-256-CBC encrypted and signed "
              "with it.",
        "回调模式：Encrypt Key（事件与回调 > 加密策略）；请求体用它加密（AES-256-CBC）并签名。")
    verification_token: Secret | None = _key(
        None, "Callback mode: the Verification Token (事件与回调 > 加密策略).",
        "回调模式：Verification Token（事件与回调 > 加密策略）。")
    streaming: Literal["cardkit", "patch", "off"] = _key(
        "cardkit", '"cardkit": the answer streams into a card entity (needs 创建与更新卡片); "patch": an interactive '
                   'card patched every update_interval_s; "off": one message at the end.',
        "cardkit：回答流式写入卡片实体（需「创建与更新卡片」权限）；patch：按 update_interval_s 更新消息卡片；"
        "off：回答结束时发一条消息。")
    reply_in_thread: bool = _key(False, "Answer in a thread (话题) under the user's message.",
                                 "以话题形式回复在用户消息下。")
    all_group_messages: bool = _key(
        False, "Answer group messages that do not @ the bot (needs the permission 获取群组中所有消息).",
        "回答群里没有 @ 机器人的消息（需「获取群组中所有消息」权限）。")
    allow_users: list[str] = _key([], "Only these open_ids may use the bot; empty: everyone.",
                                  "只允许这些 open_id 使用；留空则所有人可用。")
    allow_chats: list[str] = _key([], "Only these chat ids (oc_...) may use the bot; empty: all.",
                                  "只允许这些群 ID（oc_...）使用；留空则全部可用。")
    allow_departments: list[str] = _key([], "Only users of these open_department_ids may use it; empty: all.",
                                        "只允许这些 open_department_id 的成员使用；留空则全部可用。")
    group_history: Literal["chat", "member"] = _key(
        "chat", 'In groups: one history per chat ("chat") or per member ("member").',
        "群聊中：整个群共用一份历史（chat）或每位成员一份（member）。")
    update_interval_s: Annotated[float, Field(ge=0.2, le=10)] = _key(
        0.5, "Shortest time between two updates of a streamed answer, in seconds (a card takes 10 a second at most).",
        "流式回答两次更新之间的最短间隔（秒；一张卡片每秒最多更新 10 次）。")
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = _key(
        60.0, "Long connection: the longest wait between two reconnection attempts, in seconds.",
        "长连接：两次重连尝试之间的最长等待（秒）。")
    routes: dict[str, str] = _key({}, 'Send some chat or user ids to another bot: { "<id>" = "bot" }.',
                                  "把某些群或用户 ID 交给另一个机器人：{ 群ID = 机器人名 }。")
    department_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = _key(
        3600, "How long a user's department ids (contact API) are cached, in seconds.",
        "用户部门 ID（通讯录接口）的缓存时长（秒）。")
    timestamp_window_s: Annotated[int, Field(ge=30, le=3600)] = _key(
        300, "Callback mode: a request whose signed timestamp is further than this from the clock is refused before "
             "it is decrypted.",
        "回调模式：签名时间戳与当前时间相差超过此值的请求在解密前即被拒绝。")

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
                             "事件与回调 > 加密策略)")
        if self.mode == "callback" and self.verification_token is None:
            raise ValueError('callback mode needs verification_token (e.g. "env:FEISHU_VERIFICATION_TOKEN")')
        return self

    @property
    def base(self) -> str:
        return self.api_base or DOMAINS[self.domain]
