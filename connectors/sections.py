"""What the platforms' config sections share: each ``[PLATFORM.NAME]`` table is one account on
the platform and answers as the bot NAME; its ``routes`` (``{ "<chat id>" = "bot" }``) may send
some chats to another bot.

Light (pydantic and core only): every platform's config module imports it, and they are all
imported to validate a config, even where their connectors are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.config import Config, KeyProblem, NamedSection


def check_bot_accounts(config: Config, section: str, accounts: Mapping[str, Any]) -> None:
    """Each ``[section.NAME]`` names a defined bot, and so does each of its ``routes``."""
    bots = ", ".join(sorted(config.bots))
    for name, account in accounts.items():
        if name not in config.bots:
            raise KeyProblem(f"{section}.{name}", f"names no bot; define [bots.{name}] (bots: {bots})")
        for chat, bot in account.routes.items():
            if bot not in config.bots:
                raise KeyProblem(f"{section}.{name}.routes.{chat}", f"names no bot {bot!r} (bots: {bots})")


class AccountSection(NamedSection):
    """``[SECTION.NAME]``: one account on a platform, answering as the bot NAME. A subclass
    declares ``routes: dict[str, str]`` (chat or user ids sent to another bot)."""

    @classmethod
    def check(cls, config: Config) -> None:
        check_bot_accounts(config, cls.SECTION, cls.sections(config))
