"""[console]: the web console and its logins ([console.users.NAME]). Light: pydantic and core only."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from connectors.signing import SigningKeySection
from core.config import Config, KeyProblem, Section

# Paths the daemon itself serves: the console cannot be served there (nor under any section's ROUTES).
_TAKEN_PATHS = ("/healthz", "/metrics")


def _taken(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


class ConsoleUserConfig(Section):
    """One web console login ([console.users.NAME])."""

    doc_zh: ClassVar[str] = "一个 Web 控制台登录用户（[console.users.NAME]）。"

    password_hash: str = Field(
        description="The argon2 hash `botd console passwd` made (never the password itself).",
        json_schema_extra={"zh": "`botd console passwd` 生成的 argon2 哈希（绝不是密码本身）。"})
    role: Literal["admin", "department", "viewer"] = Field(
        description='"admin": everything; "department": only its bots (chat, their conversations and knowledge); '
                    '"viewer": reads only (status, knowledge, conversations, audit) of its bots, or of every bot.',
        json_schema_extra={"zh": '"admin"：全部权限；"department"：只限其机器人（聊天、这些机器人的会话和知识库）；'
                                 '"viewer"：只读（状态、知识库、会话、审计），限其机器人或全部机器人。'})
    bots: list[str] = Field(
        default_factory=list,
        description="The bots this user sees (department: required; viewer: empty = every bot).",
        json_schema_extra={"zh": "该用户可见的机器人（department：必填；viewer：留空 = 全部机器人）。"})


class ConsoleConfig(SigningKeySection):
    """The web console, served by the daemon under ``path``; its ``signing_key`` (declared in
    :mod:`connectors.signing`) also signs the HTTP API's JWTs."""

    doc_zh: ClassVar[str] = "Web 控制台，由守护进程在 path 下提供；其 signing_key 也为 HTTP API 的 JWT 签名。"

    SECTION: ClassVar[str] = "console"

    enabled: bool = Field(
        default=False,
        description="Serve the console (needs signing_key and at least one user).",
        json_schema_extra={"zh": "启用控制台（需要 signing_key 和至少一个用户）。"})
    path: Annotated[str, Field(pattern=r"^(/[A-Za-z0-9._-]+)+$", max_length=128)] = Field(
        default="/console",
        description="URL path it is served under (e.g. behind a reverse proxy's sub-path); restart to change.",
        json_schema_extra={"zh": "控制台所在的 URL 路径（例如反向代理的子路径）；修改后需重启。"})
    session_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = Field(
        default=3600,
        description="How long a login lasts, in seconds; then the browser is sent to the login page again.",
        json_schema_extra={"zh": "一次登录的有效时间（秒）；之后浏览器会回到登录页。"})
    secure_cookie: bool = Field(
        default=False,
        description="Send the session cookie over HTTPS only; set true behind an HTTPS reverse proxy.",
        json_schema_extra={"zh": "只通过 HTTPS 发送会话 cookie；在 HTTPS 反向代理之后应设为 true。"})
    login_attempts: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5,
        description="Failed logins allowed per user name (and 4x that per client address) within login_window_s.",
        json_schema_extra={"zh": "在 login_window_s 内每个用户名允许的登录失败次数（每个客户端地址为其 4 倍）。"})
    login_window_s: Annotated[int, Field(ge=10, le=86_400)] = Field(
        default=900,
        description="The window of login_attempts, in seconds; then logins wait until the window ends.",
        json_schema_extra={"zh": "login_attempts 的计数窗口（秒）；超出后须等窗口结束才能再登录。"})
    users: dict[str, ConsoleUserConfig] = Field(
        default_factory=dict,
        description="The console's logins: [console.users.NAME] sections, made with `botd console passwd NAME`.",
        json_schema_extra={"zh": "控制台的登录用户：[console.users.NAME] 小节，用 `botd console passwd NAME` 生成。"})

    @field_validator("path")
    @classmethod
    def _free_path(cls, v: str) -> str:
        if _taken(v, _TAKEN_PATHS):
            raise ValueError(f"{v!r} is used by another route ({', '.join(_TAKEN_PATHS)})")
        return v

    @field_validator("users")
    @classmethod
    def _user_names(cls, v: dict[str, ConsoleUserConfig]) -> dict[str, ConsoleUserConfig]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"user name {name!r}: use 1-64 letters, digits, '.', '-' and '_'")
            if not re.match(r"^\$argon2(id|i|d)\$", v[name].password_hash):
                # What was written is not repeated: it may be a pasted password.
                raise KeyProblem(f"console.users.{name}.password_hash",
                                 "not an argon2 hash; make one with `botd console passwd NAME`")
        return v

    @classmethod
    def check(cls, config: Config) -> None:
        console = cls.of(config)
        routes = tuple(p for section in type(config).plugged for p in section.ROUTES)
        if _taken(console.path, routes):
            raise KeyProblem("console.path", f"{console.path!r} is used by another route "
                             f"({', '.join((*_TAKEN_PATHS, *routes))})")
        if console.enabled and console.signing_key is None:
            raise KeyProblem("console.signing_key", 'the console needs a signing key, e.g. "env:BOTD_CONSOLE_KEY" '
                            "(at least 32 random characters: openssl rand -hex 32)")
        if console.enabled and not console.users:
            raise KeyProblem("console.users", "the console has no user; add one with `botd console passwd NAME` "
                            "and a [console.users.NAME] section")
        bots = ", ".join(sorted(config.bots))
        for name, user in console.users.items():
            key = f"console.users.{name}.bots"
            if user.role == "admin" and user.bots:
                raise KeyProblem(key, "an admin sees every bot; remove bots (or use role \"viewer\")")
            if user.role == "department" and not user.bots:
                raise KeyProblem(key, f"a department user needs the bots it may use (bots: {bots})")
            for b in user.bots:
                if b not in config.bots:
                    raise KeyProblem(key, f"names no bot {b!r} (bots: {bots})")
