"""Tool changes on reload: narrowing an MCP server's ``allow`` list or an http tool's schema in
config.toml and reloading takes the old definitions out of service (the real daemon, a real MCP
server over stdio that records every call it gets, a real HTTP API on 127.0.0.1); a call under
way on the old tools finishes, and the old tools then refuse every call."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from connectors.config import load_config
from core.tools import ToolBox
from tests.fakes import serve
from tests.helpers import running_daemon
from tests.test_tools import tools

FIXTURE = str(Path(__file__).with_name("mcp_server_fixture.py"))


def _config_text(tmp_path: Path, redis_url: str, api_base: str, calls: Path, *, allow: list[str],
                 units: list[str]) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0
state_dir = {json.dumps(str(tmp_path / "state"))}

[model]
n_ctx = 2048
max_tokens = 8
n_threads = 2

[redis]
url = {json.dumps(redis_url)}

[tools.fx]
type = "mcp"
command = {json.dumps([sys.executable, FIXTURE])}
allow = {json.dumps(allow)}
env = {{ FIXTURE_CALLS = {json.dumps(str(calls))} }}

[tools.weather]
type = "http"
base_url = {json.dumps(api_base + "/api")}
path = "/weather/{{city}}"
description = "The weather in a city"

[tools.weather.parameters]
type = "object"
required = ["city"]

[tools.weather.parameters.properties.city]
type = "string"

[tools.weather.parameters.properties.units]
type = "string"
enum = {json.dumps(units)}

[bots.assistant]
tools = ["fx", "weather"]
"""


async def _ask(api: Any, text: str) -> str:
    # A conversation kept by the server: chat commands are read as in any chat.
    status, data, _ = await api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                                              "conversation_id": "tools-reload"})
    assert status == 200, data
    return str(data["choices"][0]["message"]["content"])


async def test_a_reload_takes_narrowed_tools_out_of_service(tmp_path, redis_server):
    seen: list[dict[str, str]] = []

    async def weather(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        return web.json_response({"city": request.match_info["city"], "units": request.query.get("units", "")})

    app = web.Application()
    app.router.add_get("/api/weather/{city}", weather)
    calls = tmp_path / "mcp-calls.txt"
    async with serve(app) as api_base:
        path = tmp_path / "config.toml"
        path.write_text(_config_text(tmp_path, redis_server.url, api_base, calls, allow=["add", "shout"],
                                     units=["c", "f", "k"]))
        async with running_daemon(load_config(path)) as api:
            assert (await _ask(api, "/tool fx__shout text=hi")).startswith("HI")
            assert json.loads(await _ask(api, "/tool weather city=Oslo units=k"))["units"] == "k"
            assert calls.read_text().split() == ["shout"] and seen == [{"units": "k"}]

            # The admin narrows both: shout is no longer allowed, kelvin no longer a unit.
            path.write_text(_config_text(tmp_path, redis_server.url, api_base, calls, allow=["add"],
                                         units=["c", "f"]))
            assert await api.daemon.reload()

            refused = await _ask(api, "/tool fx__shout text=again")
            assert "HI" not in refused and "AGAIN" not in refused
            out_of_schema = await _ask(api, "/tool weather city=Oslo units=k")
            assert '"units"' not in out_of_schema
            assert calls.read_text().split() == ["shout"]  # the removed tool never reached the server
            assert seen == [{"units": "k"}]  # nor the out-of-schema value the API
            # What is still granted works, on a server started with the new list.
            assert (await _ask(api, "/tool fx__add a=2 b=40")).strip() == "42"
            assert json.loads(await _ask(api, "/tool weather city=Oslo units=c"))["units"] == "c"
            assert calls.read_text().split() == ["shout", "add"]


async def test_a_retired_toolbox_finishes_its_calls_then_refuses(tmp_path) -> None:
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(0.5)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/api/slow", slow)
    async with serve(app) as base:
        box = ToolBox(tools(slow={"type": "http", "base_url": f"{base}/api", "path": "/slow",
                                  "description": "slow", "timeout_s": 5}))
        await box.start()
        running = asyncio.create_task(box.call("slow", {}, bot="b", user="u"))
        await started.wait()
        retiring = asyncio.create_task(box.retire(grace_s=5))
        await asyncio.sleep(0.05)
        late = await box.call("slow", {}, bot="b", user="u")  # a caller still holding the old box
        assert (await running).ok and (await running).text == "done"  # the call under way finished
        await retiring
    assert not late.ok and late.error is not None and late.error.startswith("refused:")
    assert box.closed
