"""[api]: the HTTP API (OpenAI-compatible /v1 and /chat). Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from core.config import Config, KeyProblem, SingleSection
from core.secrets import Secret


class ApiConfig(SingleSection):
    """The HTTP API: OpenAI-compatible /v1/chat/completions and the simple /chat."""

    SECTION: ClassVar[str] = "api"

    enabled: bool = True
    # Bearer keys, each "env:NAME", "file:/path" or "cred:NAME" (systemd credentials).
    keys: list[Secret] = Field(default_factory=list)
    max_input_chars: Annotated[int, Field(ge=1)] = 32_000
    default_bot: str = "assistant"
    # The bots (and so the knowledge bases) the HTTP API may address; empty: every bot.
    bots: list[str] = Field(default_factory=list)
    # Bots a caller without a credential may use, by name, even when they read knowledge and even
    # through a reverse proxy. Empty: with no keys, only a local caller, and only bots without knowledge.
    anonymous_bots: list[str] = Field(default_factory=list)
    # Host names (besides 127.0.0.1, localhost, ::1 and server.host) a caller without a credential
    # may send in its Host header; anything else is refused (DNS rebinding).
    allowed_hosts: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.:_\[\]-]{1,253}$")]] = Field(default_factory=list)

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
