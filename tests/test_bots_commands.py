"""bots/commands.py alone: the command vocabulary and the answers to chat commands, on a real
Redis (the runtime is built but no model is loaded: commands never reach the engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bots import texts
from bots.answers import TextAnswer
from bots.commands import KNOWN, ChatCommands, Command, parse_command
from bots.tasks import TaskRegistry
from core.config import Settings
from core.dispatch import Busy
from core.messages import InboundMessage
from core.runtime import Runtime
from tests.helpers import RedisServer, make_config


@pytest.fixture
async def commands(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[ChatCommands]:
    cfg = make_config(tmp_path, redis_server.url, redis={"socket_timeout_s": 0.5},
                      tools={"calc": {"type": "calculator"}}, api={"default_bot": "helper"},
                      bots={"helper": {"tools": ["calc"], "admins": ["telegram:boss"], "language": "en"},
                            "plain": {"language": "zh"}})
    runtime = Runtime(Settings(cfg))
    await runtime.redis.start()
    try:
        yield ChatCommands(runtime.settings, runtime, TaskRegistry())
    finally:
        await runtime.redis.close()


def _msg(text: str, bot: str = "helper", user: str = "u1", platform: str = "api") -> InboundMessage:
    return InboundMessage(platform=platform, bot=bot, chat="c1", user=user, text=text)


async def _text(answer: TextAnswer | str) -> str:
    assert isinstance(answer, TextAnswer), answer
    return answer.text


def test_the_vocabulary():
    assert parse_command("/reset") == Command("reset", "")
    assert parse_command("  /KB sources ") == Command("kb", "sources")
    assert parse_command("/help@MyBot", "mybot") == Command("help", "")
    assert parse_command("/help@OtherBot", "mybot") is None  # another bot's, in a Telegram group
    assert parse_command("/weather") is None and parse_command("hello /reset") is None
    assert parse_command("/calc 1+1").runs_tool and parse_command("/tool x").runs_tool
    assert not parse_command("/reset").runs_tool
    assert set(KNOWN) == {"start", "help", "reset", "kb", "calc", "tool"}


async def test_help_speaks_the_bots_language_and_names_the_platforms_commands(commands):
    en = await _text(await commands.answer(Command("help", ""), _msg("/help"), "en"))
    assert en == texts.say("HELP", "en", bot="helper")
    zh = await _text(await commands.answer(Command("help", ""), _msg("/help", bot="plain", platform="slack"), "zh"))
    assert zh.startswith(texts.say("HELP", "zh", bot="plain"))
    assert zh.endswith(texts.say(texts.PLATFORM_HELP["slack"], "zh"))


async def test_reset_forgets_the_thread_once(commands):
    msg = _msg("/reset")
    await commands.runtime.history.append_exchange(msg.thread_key, "hi", "hello")
    assert await _text(await commands.answer(Command("reset", ""), msg, "en")) == texts.say("RESET_DONE", "en")
    assert await commands.runtime.history.load(msg.thread_key) == []
    assert await _text(await commands.answer(Command("reset", ""), msg, "en")) == texts.say("RESET_NOTHING", "en")


async def test_reset_while_redis_is_away_is_busy_with_the_users_text(commands, redis_server):
    redis_server.stop()
    with pytest.raises(Busy) as caught:
        await commands.answer(Command("reset", ""), _msg("/reset"), "zh")
    assert caught.value.user_message == texts.say("STORE_DOWN", "zh")


async def test_kb_is_for_the_bots_admins_and_ingest_runs_in_the_registry(commands):
    stranger = _msg("/kb ingest", user="someone", platform="telegram")
    refused = await commands.answer(Command("kb", "ingest"), stranger, "en")
    assert refused.text == texts.say("KB_ADMINS_ONLY", "en")
    # An admin of a bot without knowledge bases is told so; nothing is started.
    started: list[str] = []

    async def ingest(kb: str) -> Any:
        started.append(kb)

    commands.ingest_hook = ingest
    none = await commands.answer(Command("kb", "ingest"), _msg("/kb ingest", user="boss", platform="telegram"), "en")
    assert none.text == texts.say("KB_NONE", "en") and started == [] and len(commands.tasks) == 0


async def test_calc_runs_the_bots_own_calculator_and_tool_refuses_another(commands):
    assert await _text(await commands.run_tool(Command("calc", "17% of 2340"), _msg("/calc 17% of 2340"), "en")) \
        == "17% of 2340 = 397.8"
    unknown = await commands.run_tool(Command("tool", "secret"), _msg("/tool secret"), "en")
    assert await _text(unknown) == texts.say("TOOL_NONE", "en", name="secret", names="calc")
    nothing = await commands.run_tool(Command("calc", "1+1"), _msg("/calc 1+1", bot="plain"), "zh")
    assert await _text(nothing) == texts.say("CALC_NONE", "zh")
    # "-- QUESTION": the result goes to the model with the question (the text returned, not an answer).
    asked = await commands.run_tool(Command("tool", "calc 2*21 -- what is it?"), _msg("/tool calc 2*21 -- what is it?"),
                                    "en")
    assert asked == "what is it?\n\n[calc]\n2*21 = 42"
