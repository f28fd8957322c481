"""[telegram.NAME]: one Telegram bot per table. Light: pydantic and core only."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from connectors.sections import AccountSection
from core.secrets import Secret, SecretForm


def _webhook_secret_problem(value: str) -> str:
    ok = re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value) is not None
    return "" if ok else "Telegram accepts 1-256 characters of A-Z, a-z, 0-9, _ and -"


class TelegramConfig(AccountSection):
    """One Telegram bot (from @BotFather), answering as the botd bot of the same name."""

    SECTION: ClassVar[str] = "telegram"

    token: Secret
    # "polling" (getUpdates; no public address needed) or "webhook" (POST /telegram/<bot>).
    mode: Literal["polling", "webhook"] = "polling"
    # Public HTTPS URL that `botd telegram set-webhook` registers (webhook mode).
    webhook_url: str = ""
    # Secret Telegram sends back in X-Telegram-Bot-Api-Secret-Token (webhook mode).
    webhook_secret: Annotated[Secret, SecretForm(_webhook_secret_problem)] | None = None
    api_base: str = "https://api.telegram.org/bot"
    # In groups: one history per chat/topic ("chat") or per member ("member").
    group_history: Literal["chat", "member"] = "chat"
    allow_chats: list[int] = Field(default_factory=list)
    allow_users: list[int] = Field(default_factory=list)
    # Shortest time between two edits of a streamed answer, in seconds.
    edit_interval_private_s: Annotated[float, Field(ge=0.1, le=60)] = 1.0
    edit_interval_group_s: Annotated[float, Field(ge=0.1, le=60)] = 3.0
    poll_timeout_s: Annotated[int, Field(ge=0, le=50)] = 25
    # Send some chat ids to another bot (and so to its knowledge bases): { "<chat id>" = "bot" }.
    routes: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _webhook_needs(self) -> TelegramConfig:
        if self.mode == "webhook" and self.webhook_secret is None:
            raise ValueError("webhook mode needs webhook_secret (e.g. \"env:TELEGRAM_WEBHOOK_SECRET\")")
        if self.webhook_url and not self.webhook_url.startswith("https://"):
            raise ValueError("webhook_url must be https:// (Telegram only calls HTTPS webhooks)")
        return self
