"""The chat command vocabulary every platform shares: /start, /help, /reset, the admins' /kb,
and the tool commands /calc and /tool.

Connectors read it to tell a command addressed to this bot from other text (Telegram's
``/reset@OtherBot``); the bots layer answers them.
"""

from __future__ import annotations

from dataclasses import dataclass

KNOWN = ("start", "help", "reset", "kb", "calc", "tool")


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str


def parse_command(text: str, bot_username: str | None = None) -> Command | None:
    """``/reset``, ``/reset@MyBot`` (Telegram groups) or ``/help args``; None when not a known
    command, or one addressed to another bot."""
    text = text.strip()
    if not text.startswith("/"):
        return None
    head, _, args = text[1:].partition(" ")
    name, _, at = head.partition("@")
    if at and bot_username and at.lower() != bot_username.lower():
        return None
    name = name.lower()
    if name not in KNOWN:
        return None
    return Command(name, args.strip())
