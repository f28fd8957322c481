"""Bots that use their tools (bots/tooluse.py) in the real daemon with the real model: a
model-driven call held to the tool's schema whose result reaches the final answer, the
``/calc`` and ``/tool`` commands, and the guard: a bot never runs a tool it was not granted,
even when the model calls it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from bots import tooluse
from core.engines import GenerationRequest
from core.messages import Finish, InboundMessage
from tests.helpers import make_config, running_daemon

CODE_WORD = "PELICAN-4711"


@contextlib.asynccontextmanager
async def company_api() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A local stand-in for a company API: /fact answers the code word, /secret must never be hit."""
    hits = {"fact": 0, "secret": 0}

    async def fact(_r: web.Request) -> web.Response:
        hits["fact"] += 1
        return web.json_response({"answer": f"The code word is {CODE_WORD}."})

    async def secret(_r: web.Request) -> web.Response:
        hits["secret"] += 1
        return web.json_response({"payroll": "confidential"})

    app = web.Application()
    app.router.add_get("/fact", fact)
    app.router.add_get("/secret", secret)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


def _config(tmp_path, redis_url: str, base: str):
    tools = {
        "calc": {"type": "calculator"},
        "fact": {"type": "http", "base_url": base, "path": "/fact", "description": "Look up the code word",
                 "select": "answer"},
        "secret": {"type": "http", "base_url": base, "path": "/secret", "description": "Payroll data"},
        "fx": {"type": "mcp", "command": [sys.executable, str(Path(__file__).with_name("mcp_server_fixture.py"))],
               "allow": ["add"]},
    }
    bots = {
        "assistant": {},
        "helper": {"tools": ["fact", "calc", "fx"], "tool_choice": "fact", "max_tool_rounds": 1,
                   "system_prompt": "Answer with the tool's result."},
        "hinted": {"tools": ["fact"], "tool_hint": ["(?i)code word"], "tool_choice": "fact"},
    }
    return make_config(tmp_path, redis_url, model={"max_tokens": 40}, tools=tools, bots=bots,
                       api={"bots": ["assistant", "helper", "hinted"]})


async def test_a_model_driven_call_runs_the_tool_and_its_result_reaches_the_answer(tmp_path, redis_server):
    async with company_api() as (base, hits), running_daemon(_config(tmp_path, redis_server.url, base)) as api:
        status, data, _ = await api.post("/v1/chat/completions", {
            "model": "helper", "messages": [{"role": "user", "content": "What is the code word?"}]})
        assert status == 200, data
        text = data["choices"][0]["message"]["content"]
        assert text.startswith("🔧 Used: fact\n\n"), text
        assert "PELICAN" in text.upper(), text
        assert hits == {"fact": 1, "secret": 0}
        # The result was in the prompt of the answering turn, as a tool turn after the call.
        service = api.daemon.service
        msg = InboundMessage(platform="api", bot="helper", chat="k/t", user="u", text="What is the code word?")
        answer = await service.dispatch(msg)
        events = [ev async for ev in answer.events()]
        assert events[-1].finish_reason in (Finish.STOP, Finish.LENGTH)
        messages = answer.job.request.messages
        assert messages[-2]["role"] == "assistant" and messages[-2]["tool_calls"][0]["function"]["name"] == "fact"
        assert messages[-1]["role"] == "tool" and CODE_WORD in messages[-1]["content"]
        assert answer.job.request.tools is None  # the answering turn offers no more calls
        # And the small model, at temperature 0, repeats it.
        assert "PELICAN" in events[-1].text.upper(), events[-1].text


async def test_tools_are_offered_only_when_the_hint_matches(tmp_path, redis_server):
    async with company_api() as (base, hits), running_daemon(_config(tmp_path, redis_server.url, base)) as api:
        status, data, _ = await api.post("/v1/chat/completions", {
            "model": "hinted", "messages": [{"role": "user", "content": "Say hello."}]})
        assert status == 200 and not data["choices"][0]["message"]["content"].startswith("🔧")
        assert hits["fact"] == 0
        status, data, _ = await api.post("/v1/chat/completions", {
            "model": "hinted", "messages": [{"role": "user", "content": "Tell me the code word."}]})
        assert status == 200 and data["choices"][0]["message"]["content"].startswith("🔧 Used: fact")
        assert hits["fact"] == 1


async def test_a_bot_never_runs_a_tool_it_was_not_granted_even_when_the_model_calls_it(tmp_path, redis_server):
    async with company_api() as (base, hits), running_daemon(_config(tmp_path, redis_server.url, base)) as api:
        service, runtime = api.daemon.service, api.daemon.runtime
        cfg = service.cfg
        # The model is made to call "secret" (the grammar allows nothing else), as a model asking
        # for a tool it saw somewhere would; the bot "helper" was granted fact and calc only.
        secret = runtime.tools.definitions(["secret"])
        msg = InboundMessage(platform="api", bot="helper", chat="k/g", user="u", text="Show the payroll.")
        request = GenerationRequest(msg.thread_key, [{"role": "user", "content": msg.text}], 40, temperature=0.0)
        rounds = await tooluse.run_rounds(
            request, secret, bot=cfg.bots["helper"], box=runtime.tools, user="api:u", bot_name="helper",
            choice="secret", run_job=lambda r: service.answers.run_round(msg, r))
        assert hits["secret"] == 0 and rounds.used == []
        assert rounds.messages[-2]["tool_calls"][0]["function"]["name"] == "secret"
        assert rounds.messages[-1] == {"role": "tool", "tool_call_id": rounds.messages[-2]["tool_calls"][0]["id"],
                                       "name": "secret", "content": "error: the tool 'secret' is not available"}
        # And a bot without tools is offered none, whatever the message says.
        assert tooluse.offered(cfg.bots["assistant"], "use the secret tool", runtime.tools) == []
        # The /tool command runs only the bot's own tools.
        status, data, _ = await api.post("/v1/chat/completions", {
            "model": "helper", "conversation_id": "c1", "messages": [{"role": "user", "content": "/tool secret"}]})
        assert status == 200 and "no tool named secret" in data["choices"][0]["message"]["content"]
        assert hits["secret"] == 0


async def test_calc_and_tool_commands_answer_in_the_users_language(tmp_path, redis_server):
    async with company_api() as (base, hits), running_daemon(_config(tmp_path, redis_server.url, base)) as api:
        async def say(bot: str, text: str) -> str:
            # A conversation kept by botd: commands are read only there (a stateless call's
            # messages are the client's own transcript).
            status, data, _ = await api.post("/v1/chat/completions", {
                "model": bot, "conversation_id": f"c-{bot}", "messages": [{"role": "user", "content": text}]})
            assert status == 200, data
            return data["choices"][0]["message"]["content"]

        assert "397.8" in await say("helper", "/calc 17% of 2340")
        # A command has no words to judge unless Chinese ones follow it: both languages, or Chinese.
        both = "此助手没有计算器工具。\nThis bot has no calculator tool."
        assert await say("assistant", "/calc two plus two") == both
        assert await say("assistant", "/calc 二加二") == "此助手没有计算器工具。"
        assert await say("assistant", "/tool 查一下") == "此助手没有可用的工具。"
        assert "Usage: /tool NAME" in await say("helper", "/tool")
        assert CODE_WORD in await say("helper", "/tool fact")
        assert hits["fact"] == 1
        # An MCP server's allowed tool, by the name the model calls it.
        assert await say("helper", "/tool fx__add a=2 b=40") == "42"
        assert "no tool named fx__shout" in await say("helper", "/tool fx__shout text=hi")
        refused = await say("helper", "/calc 9**9**9**9")
        # Refused, in both languages (a command without Chinese words), the tool's reason kept.
        assert refused.startswith("工具 calc 未能完成：") and "\nThe tool calc could not answer: " in refused, refused
        zh = await say("helper", "/calc 九的九次方 9**9**9**9")
        assert zh.startswith("工具 calc 未能完成：") and "The tool" not in zh, zh
        # "-- question": the model answers from the result (a generated answer, not the raw result).
        answered = await say("helper", "/tool fact -- What is the code word?")
        assert hits["fact"] == 2 and answered.strip()
