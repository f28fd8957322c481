"""[console]: the web console and its logins ([console.users.NAME]). Light: pydantic and core only."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from connectors.signing import SigningKeySection
from core.config import Config, KeyProblem, Section

# Paths the daemon's other routes use: the console cannot be served there.
_TAKEN_PATHS = ("/v1", "/chat", "/healthz", "/metrics", "/telegram", "/slack", "/wecom", "/wecom_aibot")


class ConsoleUserConfig(Section):
    """One web console login ([console.users.NAME])."""

    # An argon2 hash, made by `botd console passwd` (never the password itself).
    password_hash: str
    # admin: everything; department: only `bots` (chat, their conversations and knowledge);
    # viewer: reads only (status, knowledge, conversations, audit) of `bots`, or of every bot.
    role: Literal["admin", "department", "viewer"]
    bots: list[str] = Field(default_factory=list)


class ConsoleConfig(SigningKeySection):
    """The web console, served by the daemon under ``path``; its ``signing_key`` (declared in
    :mod:`connectors.signing`) also signs the HTTP API's JWTs."""

    SECTION: ClassVar[str] = "console"

    enabled: bool = False
    # URL path of the console (a reverse proxy may put it under a sub-path); restart to change.
    path: Annotated[str, Field(pattern=r"^(/[A-Za-z0-9._-]+)+$", max_length=128)] = "/console"
    # Lifetime of a login, in seconds; then the browser is sent to the login page again.
    session_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = 3600
    # Mark the session cookie Secure (sent over HTTPS only): set true behind an HTTPS proxy.
    secure_cookie: bool = False
    # Failed logins allowed per user name (and 4x that per client address) within login_window_s.
    login_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    login_window_s: Annotated[int, Field(ge=10, le=86_400)] = 900
    users: dict[str, ConsoleUserConfig] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _free_path(cls, v: str) -> str:
        if any(v == p or v.startswith(p + "/") for p in _TAKEN_PATHS):
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
