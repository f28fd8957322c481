"""Client JSON schemas against the grammar machinery (core/schema_limits.py, core/toolcalls.py):
each limit refused by name before anything is built, grammars llama.cpp would refuse caught
before they reach a sampler, and through the real daemon over real HTTP the exact request that
used to kill the process (segfault in libllama.so) answered 400, the daemon still serving.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core import schema_limits, toolcalls
from core.schema_limits import SchemaLimitError
from tests.helpers import Client, make_config, running_daemon

KEY = "schema-key-0123456789"


def tool(parameters: Any, name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "", "parameters": parameters}}


def obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props)}


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = obj(x=schema)
    return schema


# -- each limit, by name, before anything is built ---------------------------------------------------

@pytest.mark.parametrize(("schema", "limit"), [
    (obj(x={"type": "string", "maxLength": 100_000}), "max_string_length"),
    (obj(x={"type": "string", "minLength": 10**12}), "max_string_length"),
    (obj(x={"type": "string", "maxLength": -1}), "max_string_length"),
    (obj(x={"type": "string", "maxLength": "many"}), "max_string_length"),
    (obj(x={"type": "array", "items": {"type": "integer"}, "maxItems": 100_000}), "max_items"),
    (obj(x={"type": "array", "items": {"type": "integer"}, "minItems": 5000}), "max_items"),
    (nested(40), "max_schema_depth"),
    (obj(x={"enum": list(range(5000))}), "max_enum"),
    (obj(x={"anyOf": [{"const": i} for i in range(500)]}), "max_alternatives"),
    (obj(x={"oneOf": [{"type": "integer"}] * 100}), "max_alternatives"),
    (obj(**{f"p{i}": {"type": "integer"} for i in range(500)}), "max_properties"),
    (obj(x={"type": "string", "pattern": "^(ab){0,100000}$"}), "max_string_length"),
    (obj(x={"type": "string", "pattern": "^" + "a" * 5000 + "$"}), "max_pattern_chars"),
    (obj(x={"type": "string", "pattern": "^" + "(" * 40 + "a" + ")" * 40 + "$"}), "max_schema_depth"),
    (obj(x={"$ref": "https://example.com/schema.json"}), "max_refs"),
    (obj(x={"type": "string", "description": "x" * 100_000}), "max_schema_chars"),
    (obj(**{f"p{i}": {"type": "string", "maxLength": 1000} for i in range(30)}), "max_grammar_units"),
])
def test_each_limit_is_refused_by_name_before_building(schema, limit):
    start = time.monotonic()
    with pytest.raises(SchemaLimitError) as err:
        toolcalls.grammar([tool(schema)])
    assert err.value.limit == limit, str(err.value)
    assert f"limit {limit}" in str(err.value) and str(err.value).startswith("tools")
    assert time.monotonic() - start < 2.0


def test_many_tools_add_up_to_the_limit():
    tools = [tool(obj(x={"type": "string", "maxLength": 900}), f"t{i}") for i in range(30)]
    with pytest.raises(SchemaLimitError) as err:
        toolcalls.grammar(tools)
    assert err.value.limit == "max_grammar_units"


def test_grammars_llama_cpp_would_refuse_are_errors_not_samplers():
    """A grammar llama.cpp's parser refuses gives no sampler, and a chain given none crashes at
    the first token: these must fail here, as errors."""
    refused = [
        obj(x={"type": "string", "pattern": r"^\d+$"}),  # an escape GBNF does not know
        obj(x={"type": "string", "pattern": r"^[a-z]\s\xZZ$"}),
    ]
    for schema in refused:
        with pytest.raises(ValueError):
            toolcalls.grammar([tool(schema)])


def test_the_grammar_check_reads_groups_as_the_parser_does():
    assert schema_limits.grammar_nesting('a ::= ((("x")))') == 3
    # parentheses inside literals and classes, escaped quotes and brackets included, do not count
    assert schema_limits.grammar_nesting(r'a ::= "(((\"(((" [(\](] ("x")') == 1
    assert schema_limits.grammar_nesting("a ::= x # ((((\nb ::= (y)") == 1
    with pytest.raises(SchemaLimitError, match="max_grammar_nesting"):
        schema_limits.check_grammar("root ::= " + "(" * 5000 + '"a"' + ")" * 5000)
    with pytest.raises(SchemaLimitError, match="max_grammar_chars"):
        schema_limits.check_grammar('root ::= "' + "a" * 300_000 + '"')


def test_real_schemas_still_pass():
    ok = [
        obj(city={"type": "string", "maxLength": 20}, unit={"type": "string", "enum": ["celsius", "fahrenheit"]}),
        obj(q={"type": "string", "minLength": 1, "maxLength": 1000}),
        obj(tags={"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 50}),
        obj(when={"type": "string", "format": "date"}, n={"type": "integer"}, f={"type": ["number", "null"]}),
        obj(code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{1,6}$"}),
        {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
        nested(12),
    ]
    for schema in ok:
        g = toolcalls.grammar([tool(schema)])
        toolcalls.check_gbnf(g)


# -- through the daemon ------------------------------------------------------------------------------

@pytest.fixture
async def api(tmp_path, redis_server, monkeypatch) -> AsyncIterator[Client]:
    monkeypatch.setenv("TEST_BOTD_KEY", KEY)
    cfg = make_config(tmp_path, redis_server.url, api={"keys": ["env:TEST_BOTD_KEY"]}, model={"max_tokens": 48})
    async with running_daemon(cfg) as client:
        client.session.headers["Authorization"] = f"Bearer {KEY}"
        yield client


def attack(schema: dict[str, Any], choice: Any = "required") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Call the tool."}], "max_tokens": 8,
            "tools": [tool(schema, "lookup")], "tool_choice": choice}


async def test_the_schema_that_killed_the_daemon_is_a_400_and_the_daemon_lives_on(api):
    cases = [
        (obj(x={"type": "string", "maxLength": 100_000}), "max_string_length"),
        (obj(x={"type": "array", "items": {"type": "string"}, "maxItems": 100_000}), "max_items"),
        (obj(x={"type": "string", "maxLength": 100_000}), "max_string_length"),  # again: nothing was cached
    ]
    for schema, limit in cases:
        for choice in ("required", "auto", {"type": "function", "function": {"name": "lookup"}}):
            status, data, _ = await api.post("/v1/chat/completions", attack(schema, choice))
            assert status == 400, data
            assert data["error"]["code"] == "schema_limit_exceeded", data
            assert limit in data["error"]["message"] and "properties.x" in data["error"]["message"]
    # Grammars llama.cpp itself would refuse (no sampler: a crash at the first token before).
    for schema in (obj(x={"type": "string", "maxLength": 1500}), obj(x={"type": "string", "pattern": r"^\d+$"})):
        status, data, _ = await api.post("/v1/chat/completions", attack(schema))
        assert status == 400 and data["error"]["code"] in ("schema_limit_exceeded", "invalid_request"), data
    # still serving, tools and all
    status, data, _ = await api.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200, data


async def test_a_small_schema_is_still_held_to_by_the_grammar(api):
    schema = obj(city={"type": "string", "maxLength": 20})
    status, data, _ = await api.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is the weather in the city of Llanfairpwllgwyngyll?"}],
        "tools": [tool(schema, "get_weather")], "tool_choice": "required", "max_tokens": 48})
    assert status == 200, data
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls", data
    (call,) = choice["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "get_weather" and set(args) == {"city"}
    assert isinstance(args["city"], str) and len(args["city"]) <= 20


async def test_building_a_large_legal_grammar_does_not_hold_up_the_event_loop(api, monkeypatch):
    """The largest tool sets the limits allow take a while to convert: never on the event loop's
    thread (each conversion's thread is recorded), so the loop keeps turning while it runs."""
    def tools(tag: str) -> list[dict[str, Any]]:
        return [tool(obj(x={"type": "string", "maxLength": 130}), f"{tag}{i}") for i in range(128)]

    real, threads = toolcalls.grammar, []

    def recorded(*args: Any, **kwargs: Any) -> str:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(toolcalls, "grammar", recorded)
    status, data, _ = await api.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "tools": tools("t"),
        "tool_choice": "auto"})
    # 128 tool definitions do not fit this test model's context: a 400 after the tools were checked
    assert status == 400 and data["error"]["code"] == "context_length_exceeded", data
    assert threads and threading.get_ident() not in threads
