"""The base of every config table (core's sections, each engine's settings, each platform's
section) and the error a cross-field check raises. Below core.config and core.engines, so that
each can declare its tables without importing the other."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """One table of config.toml."""

    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)
    # The docstring says what the table is for (the configuration reference shows it); this, in Chinese.
    doc_zh: ClassVar[str] = ""


class KeyProblem(ValueError):
    """A cross-field problem that belongs to one dotted key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
