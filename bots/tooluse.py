"""How a bot uses its tools: which it offers the model for a message, the rounds of calls the
model makes before it answers, and the ``/calc`` and ``/tool`` commands.

The tools themselves (and their safety rules) are ``core/tools``; the call format is
``core/toolcalls``. What is decided here: a bot can only ever run the tools granted to it in
config (``[bots.X] tools``) — a call the model makes to any other name gets an error result,
never a run — and tools are offered only where the bot's ``tool_hint`` patterns match (or it
has none), with ``model_tools = false`` switching model-driven calls off altogether.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from core import toolcalls
from core.config import BotConfig
from core.engines import GenerationRequest
from core.jobs import Job
from core.messages import Finish

if TYPE_CHECKING:
    from core.tools import ToolBox, ToolResult

log = structlog.get_logger("botd.tools")


def offered(bot: BotConfig, text: str, tools: ToolBox | None) -> list[dict[str, Any]]:
    """The tool definitions the model sees for this message: none unless the bot has tools,
    model-driven calls are on and a ``tool_hint`` pattern matches (every message when it has none)."""
    if tools is None or not bot.tools or not bot.model_tools:
        return []
    if bot.tool_hint and not any(re.search(p, text, re.I) for p in bot.tool_hint):
        return []
    return tools.definitions(bot.tools)


async def choice_grammar(tools: list[dict[str, Any]], choice: str) -> tuple[str | None, bool]:
    """(GBNF, lazy) for a tool choice: "none" nothing; "auto" lazy (prose or a well-formed
    call); "required" a call to any; a tool's name a call to that one. Built on an executor
    thread; raises ValueError (:class:`~core.schema_limits.SchemaLimitError` included) for
    schemas over a limit or that llama.cpp cannot follow."""
    if not tools or choice == "none":
        return None, False
    only = None if choice in ("auto", "required") else choice
    return await toolcalls.build_grammar(tools, only), choice == "auto"


@dataclass
class Rounds:
    """What the rounds of tool calls left: the job that answers (already finished when the
    model answered without a call), the messages that led to it, and the tools that ran."""

    job: Job | None
    messages: list[dict[str, Any]]
    used: list[str] = field(default_factory=list)
    finished: bool = False


async def run_rounds(
    request: GenerationRequest,
    tools: list[dict[str, Any]],
    *,
    bot: BotConfig,
    box: ToolBox,
    user: str,
    bot_name: str,
    choice: str,
    run_job: Callable[[GenerationRequest], Awaitable[Job]],
) -> Rounds:
    """Let the model call tools for up to ``bot.max_tool_rounds`` rounds. ``run_job`` queues a
    request and waits for its end. Returns the finished job when the model answered in prose
    (its events replay at once), else the messages for the final, streamed answer."""
    messages = list(request.messages)
    used: list[str] = []
    # By the functions' names (an MCP server's section grants each of its allowed tools).
    granted = box.function_names(bot.tools)
    for n in range(bot.max_tool_rounds):
        try:
            grammar, lazy = await choice_grammar(tools, choice if n == 0 else "auto")
        except ValueError as exc:
            # A tool server's schema that cannot be a grammar: its calls go unconstrained (and are
            # still checked against the schema before they run), rather than the answer failing.
            log.warning("tool calls not constrained: a tool's schema cannot be a grammar", bot=bot_name,
                        error=str(exc)[:300])
            grammar, lazy = None, False
        job = await run_job(replace(request, messages=messages, tools=tools, grammar=grammar, grammar_lazy=lazy))
        if not Finish(job.finish_reason or Finish.ERROR).complete:
            return Rounds(job, messages, used, finished=True)
        content, calls = toolcalls.parse(job.text)
        if not calls:
            return Rounds(job, messages, used, finished=True)
        messages.append({"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]})
        for call in calls:
            if call.name not in granted:
                # Offered or not, a name outside the bot's grants is never run.
                log.warning("tool call refused: not granted to this bot", bot=bot_name, tool=call.name)
                result = f"error: the tool {call.name!r} is not available"
            else:
                outcome: ToolResult = await box.call(call.name, call.arguments, bot=bot_name, user=user,
                                                     allowed=bot.tools)
                result = outcome.text
                used.append(call.name)
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
    return Rounds(None, messages, used)


def parse_tool_command(args: str) -> tuple[str, str, str]:
    """``/tool NAME rest -- question``: (name, the tool's arguments text, a question for the
    model about the result, or "" to answer with the result itself)."""
    head, _, question = args.partition(" -- ")
    name, _, rest = head.strip().partition(" ")
    return name.strip(), rest.strip(), question.strip()


def as_json(text: str) -> str:
    """A tool result for a prompt: JSON when it is JSON (compact), else the text."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text
