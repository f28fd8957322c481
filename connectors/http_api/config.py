"""[api]: the HTTP API (OpenAI-compatible /v1 and /chat). Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from core.config import Config, KeyProblem, SingleSection
from core.secrets import Secret


class ApiConfig(SingleSection):
    """The HTTP API: OpenAI-compatible /v1/chat/completions and the simple /chat."""

    doc_zh: ClassVar[str] = "HTTP API：OpenAI 兼容的 /v1/chat/completions 和简单的 /chat。"

    SECTION: ClassVar[str] = "api"
    ROUTES: ClassVar[tuple[str, ...]] = ("/v1", "/chat")

    enabled: bool = Field(
        default=True,
        description="Serve the HTTP API: /v1/chat/completions (OpenAI-compatible), /chat, /v1/models.",
        json_schema_extra={"zh": "提供 HTTP API：/v1/chat/completions（OpenAI 兼容）、/chat、/v1/models。"})
    keys: list[Secret] = Field(
        default_factory=list,
        description='Bearer keys accepted on the API, each a secret reference ("env:NAME", "file:/path", '
                    '"cred:NAME"). Required when server.host is not loopback.',
        json_schema_extra={"zh": 'API 接受的 Bearer 密钥，每个都是秘密引用（"env:NAME"、"file:/path"、"cred:NAME"）'
                                 "。server.host 不是回环地址时必须设置。"})
    max_input_chars: Annotated[int, Field(ge=1)] = Field(
        default=32_000,
        description="Longest message accepted, in characters; longer ones get 413.",
        json_schema_extra={"zh": "可接受的最长消息（字符数）；更长的返回 413。"})
    default_bot: str = Field(
        default="assistant",
        description="The bot that answers when a request names no bot in model.",
        json_schema_extra={"zh": "请求未在 model 中指定机器人时由它回答。"})
    bots: list[str] = Field(
        default_factory=list,
        description="The bots (and so the knowledge bases) the API may address; empty: every bot.",
        json_schema_extra={"zh": "API 可以访问的机器人（也就决定了可访问的知识库）；留空：所有机器人。"})
    anonymous_bots: list[str] = Field(
        default_factory=list,
        description="Bots a caller without a credential may use, knowledge included, from anywhere (through a "
                    "reverse proxy too). Empty: with no keys, only a local caller, and only bots without knowledge.",
        json_schema_extra={"zh": "没有凭据的调用方可以从任何地方（包括经反向代理）使用的机器人，含其知识库。留空："
                                 "未设密钥时只有本机调用方可用，且只能用没有知识库的机器人。"})
    allowed_hosts: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.:_\[\]-]{1,253}$")]] = Field(
        default_factory=list,
        description="Host names (besides 127.0.0.1, localhost, ::1 and server.host) a caller without a credential "
                    "may send in its Host header; others get 421 (DNS rebinding).",
        json_schema_extra={"zh": "没有凭据的调用方可在 Host 头中使用的主机名（127.0.0.1、localhost、::1 和 "
                                 "server.host 之外）；其他的返回 421（防 DNS 重绑定）。"})

    @classmethod
    def check(cls, config: Config) -> None:
        api = cls.of(config)
        if api.enabled and api.default_bot not in config.bots:
            raise KeyProblem("api.default_bot", f"names no bot; defined bots: {', '.join(sorted(config.bots))}")
        for b in api.anonymous_bots:
            if b not in config.bots:
                raise KeyProblem("api.anonymous_bots",
                                 f"names no bot {b!r}; defined bots: {', '.join(sorted(config.bots))}")
        for b in api.bots:
            if b not in config.bots:
                raise KeyProblem("api.bots", f"names no bot {b!r}; defined bots: {', '.join(sorted(config.bots))}")
        if api.enabled and api.bots and api.default_bot not in api.bots:
            raise KeyProblem("api.default_bot", f"{api.default_bot!r} is not in api.bots")
        if api.enabled and not config.server.is_loopback() and not api.keys:
            raise KeyProblem(
                "api.keys",
                f"server.host is {config.server.host!r} (not loopback): set at least one API key, "
                'e.g. keys = ["env:BOTD_API_KEY"]',
            )
        for name, bot in config.bots.items():
            # Without keys an API caller names itself in `user`: "api:local:<user>" would let
            # anyone who can reach the port become this bot's admin.
            api_admins = [a for a in bot.admins if a.startswith("api:")]
            if api_admins and not api.keys:
                raise KeyProblem(
                    f"bots.{name}.admins",
                    f"{api_admins[0]!r} names an HTTP API caller, but [api] keys is empty, so any caller can "
                    "claim any user name; set [api] keys and write API admins as \"api:<key id>:<user>\" "
                    "(key id: the first 12 hex characters of the key's SHA-256)",
                )
