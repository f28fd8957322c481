"""Chat commands every platform understands: /start, /help, /reset, and the admins' /kb."""

from __future__ import annotations

from dataclasses import dataclass

HELP_TEXT = (
    "I am {bot}, an assistant running on a local model.\n"
    "Send me a message and I will answer; I remember this conversation.\n"
    "Commands:\n"
    "/reset - forget this conversation and start over\n"
    "/help - show this message"
)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str


KNOWN = ("start", "help", "reset", "kb")

KB_HELP = (
    "Knowledge base commands (admins of this bot only):\n"
    "/kb sources - list the documents this bot answers from\n"
    "/kb ingest - re-read this bot's documents now"
)


def parse_command(text: str, bot_username: str | None = None) -> Command | None:
    """``/reset``, ``/reset@MyBot`` (Telegram groups) or ``/help args``; None when not a known command."""
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
