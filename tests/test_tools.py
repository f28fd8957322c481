"""The tools ([tools.NAME]): calculator (hostile input included), http against a local server,
search against a fake SearXNG, MCP over stdio against a real MCP server (tests/mcp_server_fixture.py),
config validation, audit lines and metrics. No model, no Redis."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import TypeAdapter
from yarl import URL

from connectors.config import config_from_dict
from core import metrics
from core.config import ConfigError
from core.tools import ToolBox, ToolError, ToolResult
from core.tools._net import under
from core.tools.calculator import CalcError, calculate
from core.tools.config import ToolConfig
from tests.helpers import captured

FIXTURE = str(Path(__file__).with_name("mcp_server_fixture.py"))
SECRET = "tool-SECRET-header-value-42"


def tools(**sections: dict[str, Any]) -> dict[str, Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(ToolConfig)
    return {name: adapter.validate_python(cfg) for name, cfg in sections.items()}



def calls(tool: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("botd_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0


# --- calculator ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "want"), [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("7 // 2", "3"), ("7 % 3", "1"), ("2 ** 10", "1024"), ("2^10", "1024"),
    ("-3 + +5", "2"), ("10 / 4", "2.5"), ("sqrt(16) + abs(-2)", "6"), ("round(3.14159, 2)", "3.14"),
    ("max(3, 9, 4) - min(3, 9, 4)", "6"), ("log10(1000)", "3"), ("17% of 2340", "397.8"), ("2340 * 17%", "397.8"),
    ("200 + 15%", "230"), ("200 - 10%", "180"), ("2340的17%", "397.8"), ("1,234,567 * 2", "2469134"),
    ("3 km in m", "3000 m"), ("5 GB to MB", "5000 MB"), ("1 GiB in MiB", "1024 MiB"), ("100 C to F", "212 F"),
    ("2 hours in minutes", "120 minutes"), ("2026-12-25 - 2026-11-30", "25 days"), ("3 × 4 ÷ 2", "6"),
    ("2 ** -1", "0.5"), ("factorial(5)", "120"), ("3公里换算成米", "3000 米"), ("5斤是多少kg", "2.5 kg"),
    ("2+3等于多少？", "5"), ("100摄氏度 in 华氏度", "212 华氏度"),
])
def test_calculator_computes(expr: str, want: str) -> None:
    assert calculate(expr).endswith(f"= {want}"), calculate(expr)


async def test_calculator_errors_and_refusals() -> None:
    async with ToolBox(tools(calc={"type": "calculator"})) as box:
        zero = await box.call("calc", {"expression": "1/0"}, bot="b", user="u")
        huge = await box.call("calc", {"expression": "9**9**9"}, bot="b", user="u")
    assert zero.text == "error: cannot compute: division by zero" and zero.error == "cannot compute: division by zero"
    assert huge.error is not None and huge.error.startswith("refused: result too large")


def test_calculator_dates_use_the_clock() -> None:
    want = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    assert want in calculate("today + 30 days")
    assert want in calculate("今天 + 30天")


HOSTILE = [
    "9**9**9", "10**100000", "2**(2**(2**(2**5)))", "(" * 10000, "(" * 150 + "1" + ")" * 150, "-" * 400 + "1",
    "1+" * 240 + "1", "().__class__", "().__class__.__bases__[0].__subclasses__()", "__import__('os')",
    "lambda: 1", "[x for x in range(10**9)]", "x", "open('/etc/passwd')", "'a' * 10**9", "factorial(10**6)",
    "10**1000 * 10**1000", "1/0", "2.0 ** 100000", "f'{1}'", "[1] * 10**9", "(1, 2)", "1 if 1 else 2", "a := 1",
    "sum(*[1])", "round(1, 10**9)", "1e308 * 10", "max(" + "1," * 300 + "1)", "x" * 100000,
]


@pytest.mark.parametrize("expr", HOSTILE, ids=range(len(HOSTILE)))
async def test_calculator_refuses_hostile_input_quickly(expr: str) -> None:
    start = time.monotonic()
    with pytest.raises(CalcError):
        calculate(expr)
    async with ToolBox(tools(calc={"type": "calculator"})) as box:
        result = await box.call("calc", {"expression": expr}, bot="b", user="u")
    assert time.monotonic() - start < 1.0
    assert not result.ok and result.text.startswith("error: ")


# --- a local company API ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def weather(request: web.Request) -> web.Response:
        seen.append({"path": request.path, "raw_path": request.raw_path, "query": dict(request.query),
                     "key": request.headers.get("X-Api-Key"), "plain": request.headers.get("X-Plain")})
        return web.json_response({"city": request.match_info["city"], "data": {"temp_c": 21.5},
                                  "units": request.query.get("units", "")})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5_000_000)

    async def off_host(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.2:9/steal")

    async def in_base(request: web.Request) -> web.Response:
        raise web.HTTPFound("/api/weather/redirected")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=f"your key is {request.headers.get('X-Api-Key')}")

    async def outside(request: web.Request) -> web.Response:
        return web.Response(text="OUTSIDE THE BASE")

    app = web.Application()
    app.router.add_get("/api/weather/{city}", weather)
    app.router.add_get("/api/slow", slow)
    app.router.add_get("/api/big", big)
    app.router.add_get("/api/off", off_host)
    app.router.add_get("/api/in", in_base)
    app.router.add_get("/api/echo", echo)
    app.router.add_get("/outside", outside)
    async with serve(app) as base:
        yield base, seen


def http_tool(base: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "type": "http", "base_url": f"{base}/api", "path": "/weather/{city}", "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1},
                                                         "units": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"], "additionalProperties": False},
        "headers": {"X-Plain": "plain-value"}, "secret_headers": {"X-Api-Key": "env:BOTD_T_TOOL_KEY"},
    }
    cfg.update(extra)
    return cfg


async def test_http_tool_calls_the_api_and_never_logs_the_secret(api, monkeypatch) -> None:
    base, seen = api
    monkeypatch.setenv("BOTD_T_TOOL_KEY", SECRET)
    before = calls("weather", "ok")
    with captured() as log:
        async with ToolBox(tools(weather=http_tool(base))) as box:
            result = await box.call("weather", '{"city": "上海/../x", "units": "c"}', bot="ops", user="alice")
            picked = ToolBox(tools(w=http_tool(base, select="data.temp_c")))
            async with picked:
                temp = await picked.call("w", {"city": "Paris"}, bot="ops", user="alice")
    assert result.ok, result
    assert json.loads(result.text)["city"] == "上海/../x"  # one path segment, URL-encoded
    assert seen[0]["key"] == SECRET and seen[0]["plain"] == "plain-value" and seen[0]["query"] == {"units": "c"}
    assert "%2F" in seen[0]["raw_path"]
    assert temp.ok and temp.text == "21.5"
    text = log.getvalue()
    assert SECRET not in text
    line = next(json.loads(x) for x in text.splitlines() if '"tool_call"' in x)
    assert line["bot"] == "ops" and line["user"] == "alice" and line["tool"] == "weather"
    assert line["outcome"] == "ok" and line["arguments"] == {"city": "上海/../x", "units": "c"}
    assert isinstance(line["duration_ms"], float)
    assert calls("weather", "ok") == before + 1
    assert metrics.REGISTRY.get_sample_value("botd_tool_call_seconds_count", {"tool": "weather"})


async def test_http_tool_validates_arguments_and_stays_on_its_host(api, monkeypatch) -> None:
    base, seen = api
    monkeypatch.setenv("BOTD_T_TOOL_KEY", SECRET)
    async with ToolBox(tools(weather=http_tool(base), off=http_tool(base, path="/off", parameters={
            "type": "object", "properties": {}}), inside=http_tool(base, path="/in", parameters={
            "type": "object", "properties": {}}),
            echo=http_tool(base, path="/echo", parameters={"type": "object", "properties": {}}))) as box:
        missing = await box.call("weather", {}, bot="b", user="u")
        wrong = await box.call("weather", {"city": "x", "units": "kelvin"}, bot="b", user="u")
        extra = await box.call("weather", {"city": "x", "evil": 1}, bot="b", user="u")
        dots = await box.call("weather", {"city": ".."}, bot="b", user="u")
        not_json = await box.call("weather", "{city", bot="b", user="u")
        off = await box.call("off", {}, bot="b", user="u")
        inside = await box.call("inside", {}, bot="b", user="u")
        echo = await box.call("echo", {}, bot="b", user="u")
    assert missing.error is not None and missing.error.startswith("invalid arguments:") and "city" in missing.error
    assert not wrong.ok and "invalid arguments" in wrong.text
    assert not extra.ok and "invalid arguments" in extra.text
    assert not dots.ok and dots.error is not None and dots.error.startswith("refused:")
    assert not not_json.ok and "invalid arguments" in not_json.text
    assert not off.ok and off.error == "refused: redirect off the allowed host not followed"
    assert inside.ok and json.loads(inside.text)["city"] == "redirected"
    assert echo.ok and echo.text == "your key is ***"  # an API that echoes its key: masked
    assert not any(s["path"] == "/outside" for s in seen)
    b = URL(f"{base}/api", encoded=True)
    assert under(URL(f"{base}/api/x", encoded=True), b)
    for bad in (f"{base}/outside", f"{base}/api/../outside", f"{base}/apix", "http://127.0.0.2/api/x",
                f"https://{base[7:]}/api/x", f"http://user@{base[7:]}/api/x", f"{base}/api/%2e%2e/outside"):
        assert not under(URL(bad, encoded=True), b), bad


async def test_http_tool_never_forwards_undeclared_arguments(api, monkeypatch) -> None:
    """``/tool weather city=x admin=true`` against a schema that declares city and units (and,
    as most hand-written schemas, says nothing of additionalProperties): admin is dropped."""
    base, seen = api
    monkeypatch.setenv("BOTD_T_TOOL_KEY", SECRET)
    params = {"type": "object", "properties": {"city": {"type": "string"}, "units": {"type": "string"}},
              "required": ["city"]}
    open_schema = {**params, "additionalProperties": True}
    async with ToolBox(tools(weather=http_tool(base, parameters=params),
                             wide=http_tool(base, parameters=open_schema))) as box:
        args = box.parse_command("weather", "city=x admin=true units=c")
        assert args == {"city": "x", "admin": "true", "units": "c"}  # the user's words, as typed
        result = await box.call("weather", args, bot="b", user="u")
        body = await box.call("weather", '{"city": "y", "admin": 1, "debug": {"sql": "drop"}}', bot="b", user="u")
        wide = await box.call("wide", {"city": "z", "extra": "kept"}, bot="b", user="u")
    assert result.ok and body.ok and wide.ok
    assert seen[0]["query"] == {"units": "c"}  # admin never reached the API
    assert seen[1]["query"] == {}
    assert seen[2]["query"] == {"extra": "kept"}  # the schema allows more: forwarded as asked


async def test_http_tool_times_out_and_truncates(api, monkeypatch) -> None:
    base, _ = api
    monkeypatch.setenv("BOTD_T_TOOL_KEY", SECRET)
    empty = {"type": "object", "properties": {}}
    async with ToolBox(tools(slow=http_tool(base, path="/slow", parameters=empty, timeout_s=0.5),
                             big=http_tool(base, path="/big", parameters=empty, max_response_bytes=100_000,
                                           max_output_chars=3000))) as box:
        start = time.monotonic()
        slow = await box.call("slow", {}, bot="b", user="u")
        assert time.monotonic() - start < 2
        big = await box.call("big", {}, bot="b", user="u")
    assert not slow.ok and slow.error == "timeout" and slow.text.startswith("error: ")
    assert big.ok and len(big.text) <= 3000 and "[truncated" in big.text


# --- search -------------------------------------------------------------------------------------

async def test_search_against_a_fake_searxng() -> None:
    asked: list[dict[str, str]] = []

    async def search(request: web.Request) -> web.Response:
        asked.append(dict(request.query))
        results = [{"title": f"Result {i} for {request.query['q']}", "url": f"https://example.com/{i}",
                    "content": f"text   {i}\n more"} for i in range(10)]
        return web.json_response({"query": request.query["q"], "results": results})

    app = web.Application()
    app.router.add_get("/search", search)
    async with serve(app) as base:
        async with ToolBox(tools(web={"type": "search", "kind": "searxng", "url": base, "top_n": 3})) as box:
            (definition,) = box.definitions(["web"])
            result = await box.call("web", {"query": "年假 policy"}, bot="b", user="u")
            empty = await box.call("web", {"query": ""}, bot="b", user="u")
    assert definition["function"]["name"] == "web"
    assert asked[0] == {"q": "年假 policy", "format": "json"}
    assert result.ok
    assert "1. Result 0 for 年假 policy" in result.text and "https://example.com/2" in result.text
    assert "Result 3" not in result.text and "text 1 more" in result.text
    assert not empty.ok and "invalid arguments" in empty.text


# --- MCP over stdio -----------------------------------------------------------------------------

async def test_mcp_server_over_stdio(monkeypatch) -> None:
    monkeypatch.setenv("BOTD_T_MCP_TOKEN", "mcp-SECRET-token-7")
    cfg = tools(fx={"type": "mcp", "command": [sys.executable, FIXTURE], "allow": ["add", "shout", "fail"],
                    "secret_env": {"FIXTURE_TOKEN": "env:BOTD_T_MCP_TOKEN"}})
    before = calls("fx__add", "ok")
    with captured() as log:
        async with ToolBox(cfg) as box:
            names = [d["function"]["name"] for d in box.definitions(["fx"])]
            add = await box.call("fx__add", {"a": 2, "b": 40}, bot="b", user="u")
            shout = await box.call("fx__shout", json.dumps({"text": "hi"}), bot="b", user="u")
            hidden = await box.call("fx__secret_file", {}, bot="b", user="u")
            failed = await box.call("fx__fail", {}, bot="b", user="u")
            bad = await box.call("fx__add", {"a": "two"}, bot="b", user="u")
            assert box.parse_command("fx__add", "a=1 b=2") == {"a": 1, "b": 2}
            assert box.tool_of("fx__add") == "fx" and box.function_names(["fx"]) == names
    assert sorted(names) == ["fx__add", "fx__fail", "fx__shout"]  # secret_file is not allowed: not listed
    assert add.ok and add.text == "42"
    # The server got the secret from secret_env; a secret in a tool's output is masked.
    assert shout.ok and shout.text == "HI ***"
    assert not hidden.ok and hidden.error is not None and hidden.error.startswith("refused:")
    assert "TOP-SECRET" not in hidden.text
    assert not failed.ok and "broken on purpose" in failed.text
    assert not bad.ok and bad.error is not None and bad.error.startswith("invalid arguments")
    assert calls("fx__add", "ok") == before + 1
    assert "mcp-SECRET-token-7" not in log.getvalue()


async def test_a_dead_mcp_server_gives_error_results() -> None:
    cfg = tools(dead={"type": "mcp", "command": [sys.executable, "-c", "import sys; sys.exit(3)"],
                      "allow": ["add"], "startup_timeout_s": 5},
                missing={"type": "mcp", "command": ["/nonexistent/botd-mcp-server"], "allow": ["add"]})
    start = time.monotonic()
    async with ToolBox(cfg) as box:
        assert box.definitions(["dead", "missing"]) == []
        result = await box.call("dead__add", {"a": 1, "b": 2}, bot="b", user="u")
        gone = await box.call("missing__add", {"a": 1, "b": 2}, bot="b", user="u")
    assert time.monotonic() - start < 10
    assert not result.ok and "not running" in result.text
    assert not gone.ok and gone.text.startswith("error: ")


# --- the box ------------------------------------------------------------------------------------

async def test_box_names_definitions_grants_and_commands() -> None:
    cfg = tools(calc={"type": "calculator"},
                lookup={"type": "http", "base_url": "http://127.0.0.1:9/api", "path": "/users/{id}",
                        "description": "A user by id", "parameters": {
                            "type": "object", "properties": {"id": {"type": "integer"}, "full": {"type": "boolean"},
                                                             "city": {"type": "string"}},
                            "required": ["id"]}},
                web={"type": "search", "kind": "searxng", "url": "http://127.0.0.1:9"})
    async with ToolBox(cfg) as box:
        assert box.names() == ["calc", "lookup", "web"]
        defs = box.definitions(["calc", "nope", "lookup"])
        assert [d["function"]["name"] for d in defs] == ["calc", "lookup"]
        assert defs[0]["type"] == "function" and defs[0]["function"]["parameters"]["required"] == ["expression"]
        assert box.parse_command("calc", " 17% of 2340 ") == {"expression": "17% of 2340"}
        assert box.parse_command("web", "年假 政策") == {"query": "年假 政策"}
        assert box.parse_command("lookup", "id=42 full=true city='上海 浦东'") == {
            "id": 42, "full": True, "city": "上海 浦东"}
        assert box.parse_command("lookup", "42") == {"id": 42}
        assert box.parse_command("lookup", '{"id": 7}') == {"id": 7}
        with pytest.raises(ToolError):
            box.parse_command("nope", "x")
        ok = await box.call("calc", {"expression": "2+2"}, bot="b", user="u", allowed=["calc"])
        denied = await box.call("calc", {"expression": "2+2"}, bot="b", user="u", allowed=["web"])
        unknown = await box.call("nope", {}, bot="b", user="u")
        down = await box.call("lookup", {"id": 1}, bot="b", user="u")  # nothing listens on port 9
    assert isinstance(ok, ToolResult) and ok.ok and ok.text == "2+2 = 4" and ok.error is None
    assert not denied.ok and denied.error is not None and denied.error.startswith("refused:")
    assert not unknown.ok and "unknown tool" in unknown.text
    assert not down.ok and down.text.startswith("error: request failed")


# --- config -------------------------------------------------------------------------------------

def load(tmp_path: Path, tools_cfg: dict[str, Any], **bot: Any) -> Any:
    data = {"tools": tools_cfg, "bots": {"assistant": bot}}
    return config_from_dict(data, tmp_path / "config.toml", check_files=False)


def test_config_accepts_tools_and_bot_keys(tmp_path) -> None:
    cfg = load(tmp_path, {"calc": {"type": "calculator"}, "web": {"type": "search", "kind": "searxng",
                                                                  "url": "http://127.0.0.1:8888/"}},
               tools=["calc", "web"], tool_hint=["(?i)calc|算"], max_tool_rounds=2)
    bot = cfg.bots["assistant"]
    assert bot.tools == ["calc", "web"] and bot.model_tools and bot.max_tool_rounds == 2
    assert cfg.tools["web"].url == "http://127.0.0.1:8888"


@pytest.mark.parametrize(("tools_cfg", "bot", "key"), [
    ({"calc": {"type": "calculator"}}, {"tools": ["nope"]}, "bots.assistant.tools"),
    ({"weather": {"type": "http", "base_url": "ftp://x", "description": "d"}}, {}, "tools.weather.base_url"),
    ({"weather": {"type": "http", "base_url": "http://x", "description": "d", "path": "//evil.com/x"}}, {},
     "tools.weather.path"),
    ({"weather": {"type": "http", "base_url": "http://x", "description": "d", "parmeters": {}}}, {},
     "tools.weather.parmeters"),
    ({"weather": {"type": "http", "base_url": "http://x", "description": "d", "parameters": {"type": "array"}}},
     {}, "tools.weather.parameters"),
    ({"gh": {"type": "mcp", "command": ["x"]}}, {}, "tools.gh.allow"),
    ({"gh": {"type": "mcp", "command": ["x"], "url": "http://x/mcp", "allow": ["a"]}}, {}, "tools.gh"),
    ({"bad.name": {"type": "calculator"}}, {}, "tools.bad.name"),
    ({"w": {"type": "search", "kind": "elasticsearch", "url": "http://x"}}, {}, "tools.w"),
    ({"w": {"type": "teleport"}}, {}, "tools.w"),
    ({}, {"tool_hint": ["("]}, "bots.assistant.tool_hint"),
])
def test_config_errors_name_the_key(tmp_path, tools_cfg, bot, key) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, tools_cfg, **bot)
    assert f": {key}" in str(err.value), str(err.value)


def test_config_never_repeats_an_inline_secret(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"w": {"type": "http", "base_url": "http://x", "description": "d",
                              "secret_headers": {"Authorization": "Bearer sk-SECRET-inline"}}})
    assert "tools.w.secret_headers.Authorization" in str(err.value)
    assert "sk-SECRET" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"w": {"type": "http", "base_url": "http://x", "description": "d",
                              "headers": {"Authorization": "env:TOKEN"}}})
    assert "secret_headers" in str(err.value)


def test_config_checks_tool_secrets(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("BOTD_T_UNSET_TOOL_KEY", raising=False)
    data = {"tools": {"w": {"type": "http", "base_url": "http://x", "description": "d",
                            "secret_headers": {"X-Key": "env:BOTD_T_UNSET_TOOL_KEY"}}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, tmp_path / "config.toml", check_files=True)
    assert "tools.w.secret_headers.X-Key" in str(err.value)


async def test_mcp_server_over_streamable_http(monkeypatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(sys.executable, FIXTURE, "http", str(port),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        monkeypatch.setenv("BOTD_T_MCP_BEARER", "Bearer mcp-SECRET-bearer")
        cfg = tools(remote={"type": "mcp", "url": f"http://127.0.0.1:{port}/mcp", "allow": ["add", "whoami"],
                            "secret_headers": {"Authorization": "env:BOTD_T_MCP_BEARER"}})
        async with ToolBox(cfg) as box:
            assert sorted(box.function_names(["remote"])) == ["remote__add", "remote__whoami"]
            add = await box.call("remote__add", {"a": 1, "b": 2}, bot="b", user="u")
            who = await box.call("remote__whoami", {}, bot="b", user="u")
            hidden = await box.call("remote__secret_file", {}, bot="b", user="u")
    finally:
        proc.terminate()
        await proc.wait()
    assert add.ok and add.text == "3"
    assert who.ok and who.text == "***"  # the server got the header; its echo is masked
    assert not hidden.ok
