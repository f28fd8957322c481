"""Chat commands: the vocabulary every platform shares, and their answers.

``/start`` and ``/help`` (the bot's help, and the platform's), ``/reset`` (forget the
thread), the admins' ``/kb sources`` and ``/kb ingest``, and the tool commands ``/calc EXPR``
and ``/tool NAME ARGS [-- QUESTION]``, which run one of the bot's own tools. Connectors read
the vocabulary (:data:`KNOWN`, through the service) to tell a command addressed to this bot
from other text (Telegram's ``/reset@OtherBot``); the answer pipeline asks
:class:`ChatCommands` for the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from bots import texts, tooluse
from bots.answers import TextAnswer, audit_answer, bot_of, reset_thread
from bots.tasks import TaskRegistry
from core import metrics
from core.config import Config, Settings
from core.dispatch import Busy
from core.messages import InboundMessage
from core.ratelimit import LimitExceeded
from core.runtime import Runtime
from core.tools import ToolError

log = structlog.get_logger("botd.commands")

KNOWN = ("start", "help", "reset", "kb", "calc", "tool")
TOOL_COMMANDS = ("calc", "tool")


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str

    @property
    def runs_tool(self) -> bool:
        return self.name in TOOL_COMMANDS


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


class ChatCommands:
    """The answers to chat commands (tools and knowledge of the asking bot only)."""

    def __init__(self, settings: Settings, runtime: Runtime, tasks: TaskRegistry) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tasks = tasks
        # Set by the daemon: re-ingest one knowledge base (the admins' "/kb ingest").
        self.ingest_hook: Callable[[str], Coroutine[Any, Any, Any]] | None = None

    @property
    def cfg(self) -> Config:
        return self.settings.config

    async def answer(self, cmd: Command, msg: InboundMessage, lang: texts.Lang = "both") -> TextAnswer:
        """/help, /start, /reset and /kb (not the tool commands: :meth:`run_tool`)."""
        name = cmd.name
        if name == "kb":
            text = await self._kb(msg, cmd.args, lang)
        elif name == "reset":
            existed = await reset_thread(self.runtime, self.cfg, msg.thread_key, lang)
            text = texts.say("RESET_DONE" if existed else "RESET_NOTHING", lang)
        else:
            text = texts.say("HELP", lang, bot=msg.bot)
            if msg.platform in texts.PLATFORM_HELP:
                text += "\n\n" + texts.say(texts.PLATFORM_HELP[msg.platform], lang)
        metrics.MESSAGES.labels(msg.platform, f"command_{name}").inc()
        log.info("command", command=name, platform=msg.platform, bot=msg.bot, chat=msg.chat, user=msg.user)
        return TextAnswer(text, msg.request_id)

    async def run_tool(self, cmd: Command, msg: InboundMessage, lang: texts.Lang) -> TextAnswer | str:
        """``/calc EXPR`` and ``/tool NAME ARGS``: the tool's result is the answer; with
        `` -- QUESTION`` after the arguments, the question and the result go to the model (the
        text returned). Only the bot's own tools run."""
        name, args = cmd.name, cmd.args
        bot, box = bot_of(self.cfg, msg.bot), self.runtime.tools
        # The names the bot's tools are called by (an MCP section grants each allowed tool).
        granted = box.function_names(bot.tools) if box is not None else []
        if name == "calc":
            calcs = [t for t in bot.tools if t in granted and self.cfg.tools[t].type == "calculator"]
            if not calcs:
                return TextAnswer(texts.say("CALC_NONE", lang), msg.request_id)
            if not args:
                return TextAnswer(texts.say("CALC_USAGE", lang), msg.request_id)
            tool, rest, question = calcs[0], args, ""
        else:
            tool, rest, question = tooluse.parse_tool_command(args)
            if not granted:
                return TextAnswer(texts.say("TOOL_NO_TOOLS", lang), msg.request_id)
            if not tool:
                return TextAnswer(texts.say("TOOL_USAGE", lang, names=", ".join(granted)), msg.request_id)
            if tool not in granted:
                return TextAnswer(texts.say("TOOL_NONE", lang, name=tool, names=", ".join(granted)), msg.request_id)
        assert box is not None
        try:
            arguments = box.parse_command(tool, rest)
        except ToolError as exc:
            return TextAnswer(texts.say("TOOL_FAILED", lang, tool=tool, reason=exc.reason), msg.request_id)
        try:
            # One of the user's few places for a running tool call (a burst is refused, not queued).
            with self.runtime.limits.tool_call(msg):
                result = await box.call(tool, arguments, bot=msg.bot, user=f"{msg.platform}:{msg.user}",
                                        allowed=bot.tools)
        except LimitExceeded as exc:
            metrics.MESSAGES.labels(msg.platform, "rate_limited").inc()
            log.info("tool calls at the user's cap", platform=msg.platform, user=msg.user, tool=tool)
            raise Busy(exc.message, exc.retry_after, per_user=True, user_message=texts.say(
                "TOOL_BUSY", lang, n=self.cfg.limits.user_tool_calls_in_flight)) from None
        metrics.MESSAGES.labels(msg.platform, f"command_{name}").inc()
        if question:
            return f"{question}\n\n[{tool}]\n{result.text}"
        audit_answer(self.runtime, msg, result.text, "tool" if result.ok else "tool_error", tool=tool)
        told = result.text if result.ok else texts.say("TOOL_FAILED", lang, tool=tool, reason=result.error)
        return TextAnswer(told, msg.request_id)

    async def _kb(self, msg: InboundMessage, args: str, lang: texts.Lang = "both") -> str:
        bot = bot_of(self.cfg, msg.bot)
        who = f"{msg.platform}:{msg.user}"
        if who not in bot.admins:
            log.warning("knowledge admin command refused", who=who, bot=msg.bot, command=args)
            return texts.say("KB_ADMINS_ONLY", lang)
        action = args.split()[0].lower() if args.split() else ""
        if not bot.knowledge:
            return texts.say("KB_NONE", lang)
        if action == "sources":
            retriever = self.runtime.retriever
            lines = []
            for kb in bot.knowledge:
                # Counting 100k chunks is CPU work: off the event loop.
                files = await asyncio.to_thread(retriever.sources, kb) if retriever is not None else {}
                lines.append(texts.say("KB_SOURCES_LINE", lang, kb=kb, files=len(files), chunks=sum(files.values())))
                lines += [texts.say("KB_SOURCE_ITEM", lang, src=src, n=n) for src, n in sorted(files.items())]
            return "\n".join(lines)
        if action == "ingest":
            if self.ingest_hook is None:
                return texts.say("KB_NO_INGEST", lang)
            for kb in bot.knowledge:
                self.tasks.spawn(self.ingest_hook(kb))
            log.info("knowledge re-ingest requested", who=who, knowledge=bot.knowledge)
            return texts.say("KB_INGEST_STARTED", lang, kbs=", ".join(bot.knowledge))
        return texts.say("KB_HELP", lang)
