"""[slack.NAME]: one Slack app per table. Light: pydantic and core only."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from connectors.sections import AccountSection
from core.secrets import Secret


class SlackConfig(AccountSection):
    """One Slack app, answering as the botd bot of the same name."""

    SECTION: ClassVar[str] = "slack"

    # The bot token (xoxb-...) from "OAuth & Permissions".
    bot_token: Secret
    # "http" (Events API at POST /slack/events) or "socket" (Socket Mode, no public address).
    mode: Literal["http", "socket"] = "http"
    # HTTP mode: "Signing Secret" from "Basic Information".
    signing_secret: Secret | None = None
    # Socket Mode: an app-level token (xapp-...) with connections:write.
    app_token: Secret | None = None
    api_base: str = "https://slack.com/api/"
    # Answer follow-ups in a thread the bot has answered, without a new mention.
    follow_threads: bool = True
    allow_channels: list[str] = Field(default_factory=list)
    allow_users: list[str] = Field(default_factory=list)
    # Shortest time between two chat.update calls of a streamed answer, in seconds.
    update_interval_s: Annotated[float, Field(ge=0.1, le=60)] = 1.0
    # Timeout of one Web API call, in seconds.
    api_timeout_s: Annotated[float, Field(gt=0, le=120)] = 30.0
    # The slash command's name, as created in the app config ("/assistant reset").
    slash_command: Annotated[str, Field(pattern=r"^/[a-z0-9_-]{1,31}$")] = "/assistant"
    # Send some channel ids to another bot (and so to its knowledge bases): { "<channel id>" = "bot" }.
    routes: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _mode_needs(self) -> SlackConfig:
        if self.mode == "http" and self.signing_secret is None:
            raise ValueError('http mode needs signing_secret (e.g. "env:SLACK_SIGNING_SECRET")')
        if self.mode == "socket" and self.app_token is None:
            raise ValueError('socket mode needs app_token (e.g. "env:SLACK_APP_TOKEN")')
        if not self.api_base.endswith("/"):
            raise ValueError("api_base must end with '/'")
        return self
