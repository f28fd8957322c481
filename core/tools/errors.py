"""The one error a tool raises: an outcome (for the metric) and a short reason (for the model)."""

from __future__ import annotations

from typing import Literal

from core.errors import BotdError

Outcome = Literal["ok", "error", "timeout", "refused", "invalid"]


class ToolError(BotdError):
    """A tool call that failed or was refused. ``outcome``: "error", "refused", "invalid" or
    "timeout"; ``reason``: a short text, shown to the model and the user as "error: <reason>"."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome: Outcome = outcome
        self.reason = reason
