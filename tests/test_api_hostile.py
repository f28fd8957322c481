"""Hostile input and vanishing clients against the HTTP API: always a 4xx, never a 500, and
no traceback in the log. Real daemon, real model, real Redis; requests go out as raw bytes
over a socket so that headers can carry what an HTTP library would refuse to send.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Client, captured, make_config, running_daemon, wait_for

KEY = "fuzz-key-0123456789"
DEEP = 10_000



def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def assert_clean_log(stream: io.StringIO) -> None:
    """No error line and no traceback: a client that left is not a server failure."""
    bad = [line[:300] for line in stream.getvalue().splitlines()
           if "unhandled error" in line or "Traceback" in line or '"exception"' in line
           or '"level": "error"' in line or '"level": "critical"' in line]
    assert not bad, "\n".join(bad[:5])


async def raw_request(port: int, method: str, target: str, body: bytes | None = None,
                      headers: list[tuple[str, bytes]] = ()) -> tuple[int, bytes]:
    """One request as raw bytes (headers may hold any byte); returns the status and the raw body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    head += [name.encode() + b": " + value for name, value in headers]
    if body is not None:
        head += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
    try:
        data = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def error_code(raw: bytes) -> str:
    return json.loads(raw)["error"]["code"]


def completion(content: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}


@pytest.fixture
async def api(tmp_path, redis_server) -> AsyncIterator[Client]:
    cfg = make_config(tmp_path, redis_server.url, model={"max_tokens": 2})
    async with running_daemon(cfg) as client:
        yield client


# -- the three known 500s ---------------------------------------------------------------------


async def test_json_nested_ten_thousand_levels_is_400(api):
    deep = "[" * DEEP + "]" * DEEP
    cases = [
        ("/v1/chat/completions", deep),
        ("/v1/chat/completions", '{"messages": ' + deep + "}"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stream_options": '
         + '{"a": ' * DEEP + "1" + "}" * DEEP + "}"),
        ("/chat", '{"query": "hi", "history": ' + deep + "}"),
        # deep enough to parse, far deeper than any real request
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stream_options": '
         + '{"a": ' * 100 + "1" + "}" * 100 + "}"),
    ]
    for path, body in cases:
        status, raw = await raw_request(api.daemon.port, "POST", path, body.encode())
        assert (status, error_code(raw)) == (400, "invalid_json"), (path, body[:60], raw[:200])
        assert b"nested too deeply" in raw
    status, _ = await raw_request(api.daemon.port, "POST", "/v1/chat/completions", json.dumps(completion()).encode())
    assert status == 200


async def test_lone_surrogates_in_the_body_are_400(api):
    bodies = [
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi \ud800"}]}'),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}'),
        ("/v1/chat/completions", r'{"messages": [{"role": "system", "content": "\udc80"}, '
                                 r'{"role": "user", "content": "hi"}], "max_tokens": 1}'),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "user": "\ud800"}'),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "conversation_id": "\ud800"}'),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "hi"}], "\ud800": 1}'),
        ("/chat", r'{"query": "\ud800"}'),
        ("/chat", r'{"query": "hi", "history": [["\udbff", "a"]]}'),
    ]
    for path, body in bodies:
        status, raw = await raw_request(api.daemon.port, "POST", path, body.encode())
        assert (status, error_code(raw)) == (400, "invalid_request"), (path, body, raw[:200])
    # a surrogate *pair* is a real character
    status, raw = await raw_request(api.daemon.port, "POST", "/v1/chat/completions",
                                    rb'{"messages": [{"role": "user", "content": "\ud83d\ude00"}], "max_tokens": 1}')
    assert status == 200, raw


async def test_conversation_ids_are_checked_in_header_body_and_path(api, redis_server):
    port = api.daemon.port
    body = json.dumps(completion()).encode()
    for value in (b"\xff\xfe", b"ok\xc3", b"a" * 201, b"tab\xc2\x85nel", b"\xed\xa0\x80"):
        status, raw = await raw_request(port, "POST", "/v1/chat/completions", body, [("X-Conversation-Id", value)])
        assert (status, error_code(raw)) == (400, "invalid_request"), (value, raw[:200])
        assert b"X-Conversation-Id" in raw
    # the body field: the same rule
    status, raw = await raw_request(port, "POST", "/v1/chat/completions",
                                    json.dumps(completion(conversation_id="a\nb")).encode())
    assert (status, error_code(raw)) == (400, "invalid_request")
    # a good one, non-ASCII included, is used as given
    cid = "会话-" + "x" * 197
    status, raw = await raw_request(port, "POST", "/v1/chat/completions", body,
                                    [("X-Conversation-Id", cid.encode())])
    assert status == 200, raw
    assert json.loads(raw)["conversation_id"] == cid
    status, conv = await api.get("/v1/conversations/" + quote_from_bytes(cid.encode(), safe=""))
    assert status == 200 and len(conv["messages"]) == 2
    # the URL path and the ?bot= query
    for target, expected in [("/v1/conversations/" + "a" * 201, 400), ("/v1/conversations/%00", 400),
                             ("/v1/conversations/a%0Ab", 400), ("/v1/conversations/%FF", 200),
                             ("/v1/conversations/a?bot=%FF", 404), ("/v1/conversations/a?bot=%ED%A0%80", 404)]:
        for method in ("GET", "DELETE"):
            status, raw = await raw_request(port, method, target)
            assert status == expected, (method, target, raw[:200])
    assert len(redis_server.client().keys("botd:hist:*")) == 1


async def test_undecodable_authorization_and_request_id_headers(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("TEST_BOTD_KEY", KEY)
    cfg = make_config(tmp_path, redis_server.url, api={"keys": ["env:TEST_BOTD_KEY"]}, model={"max_tokens": 2})
    async with running_daemon(cfg) as api:
        body = json.dumps(completion()).encode()
        for value in (b"Bearer \xff\xfe", b"Bearer " + KEY.encode() + b"\xff", b"\xc3(", b"Bearer \xed\xa0\x80"):
            status, raw = await raw_request(api.daemon.port, "POST", "/v1/chat/completions", body,
                                            [("Authorization", value)])
            assert (status, error_code(raw)) == (401, "invalid_api_key"), (value, raw[:200])
        async with api.session.get(api.base + "/v1/models", headers={"Authorization": f"Bearer {KEY}",
                                                                     "X-Request-Id": "²²²"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] != "²²²" and r.headers["X-Request-Id"].isascii()


# -- fuzz: every JSON route, the headers, one daemon ----------------------------------------------

# Text with lone surrogates and control characters (json.dumps writes them as \u escapes).
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
JSONISH = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                       max_leaves=8)
# Small budgets only, so that a valid request costs the model one or two tokens; and bad ones
# (no whole floats or digit strings: pydantic would take 100.0 or "100" as a budget of 100).
BUDGET = st.one_of(st.integers(1, 2), st.integers(max_value=0), st.integers(min_value=2048),
                   st.floats().filter(lambda f: not f.is_integer()),
                   TEXT.filter(lambda t: not t.strip().lstrip("+-").isdigit()), st.none())
ROLE = st.one_of(st.sampled_from(["user", "user", "assistant", "system", "developer", "tool", ""]), JSONISH)
CONTENT = st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                          "text": TEXT}), max_size=2), JSONISH)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": CONTENT}), JSONISH)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=3), JSONISH)
CID = st.one_of(TEXT, st.text(max_size=210), JSONISH)
COMPLETION = st.fixed_dictionaries({"messages": MESSAGES}, optional={
    "max_tokens": BUDGET, "max_completion_tokens": BUDGET, "stream": st.one_of(st.booleans(), JSONISH),
    "conversation_id": CID, "model": st.one_of(st.sampled_from(["smollm2-135m", "assistant"]), TEXT),
    "temperature": st.one_of(st.floats(), JSONISH), "stop": JSONISH, "user": st.one_of(TEXT, JSONISH),
    "n": JSONISH, "stream_options": JSONISH,
})
HISTORY = st.one_of(st.lists(st.lists(TEXT, max_size=3), max_size=2), st.lists(MESSAGE, max_size=2), JSONISH)
SIMPLE = st.fixed_dictionaries({"query": st.one_of(TEXT, JSONISH)}, optional={
    "history": HISTORY, "bot": st.one_of(st.just("assistant"), TEXT), "conversation_id": CID,
    "max_tokens": BUDGET, "temperature": JSONISH, "user": JSONISH,
})
# Valid requests (any text but lone surrogates), so that the model and the stream are reached too.
SAFE = st.text(max_size=12)
WORDS = st.text(min_size=1, max_size=12).filter(str.strip)  # an empty question is refused (400)
GOOD_CID = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)
GOOD_COMPLETION = st.fixed_dictionaries({
    "messages": st.tuples(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": SAFE}),
                 max_size=2),
        st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(WORDS, st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": SAFE}), min_size=1, max_size=2))}),
    ).map(lambda t: [*t[0], t[1]]),
    "max_tokens": st.integers(1, 2),
}, optional={
    "stream": st.booleans(), "conversation_id": GOOD_CID, "model": st.sampled_from(["smollm2-135m", "assistant"]),
    "temperature": st.floats(0, 2), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "user": SAFE, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
})
GOOD_SIMPLE = st.fixed_dictionaries({"query": WORDS, "max_tokens": st.integers(1, 2)},
                                    optional={"history": st.lists(st.tuples(SAFE, SAFE), max_size=2), "user": SAFE})


def _nest(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


BODY_BYTES = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 3 * DEEP).map(lambda n: _nest(n).encode()),
    st.integers(1, 3 * DEEP).map(lambda n: ('{"messages": ' + _nest(n) + "}").encode()),
    st.integers(1, 3 * DEEP).map(lambda n: ('{"query": "hi", "history": ' + _nest(n, '"a"') + "}").encode()),
    JSONISH.map(lambda v: json.dumps(v).encode()),
)
# Header bytes an HTTP parser lets through (no CR, LF, NUL or other ASCII controls).
HEADER_BYTES = st.binary(max_size=260).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
URL_PART = st.binary(max_size=220).map(lambda b: quote_from_bytes(b, safe=""))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None, list[tuple[str, bytes]]]:
    route = draw(st.sampled_from(["completions", "completions", "chat", "get", "delete", "models"]))
    if route in ("completions", "chat"):
        shaped, good = (COMPLETION, GOOD_COMPLETION) if route == "completions" else (SIMPLE, GOOD_SIMPLE)
        # About a quarter valid (they reach the model), the rest malformed in every way.
        kind = draw(st.sampled_from(["good", "shaped", "shaped", "bytes"]))
        body = draw(BODY_BYTES) if kind == "bytes" else json.dumps(draw(good if kind == "good" else shaped)).encode()
        method, target = "POST", "/v1/chat/completions" if route == "completions" else "/chat"
    elif route == "models":
        method, target, body = "GET", "/v1/models", None
    else:
        method, body = route.upper(), None
        target = "/v1/conversations/" + draw(URL_PART)
        if draw(st.booleans()):
            target += "?bot=" + draw(st.one_of(st.just("assistant"), URL_PART))
    headers = [("Authorization", b"Bearer " + KEY.encode())]
    if draw(st.sampled_from([False] * 7 + [True])):  # now and then a wrong or undecodable key
        headers = [("Authorization", draw(st.one_of(HEADER_BYTES, HEADER_BYTES.map(lambda b: b"Bearer " + b))))]
    if draw(st.sampled_from([False] * 3 + [True])):
        headers.append(("X-Conversation-Id", draw(st.one_of(HEADER_BYTES, GOOD_CID.map(str.encode)))))
    if draw(st.booleans()):
        headers.append(("X-Request-Id", draw(HEADER_BYTES)))
    return method, target, body, headers


@pytest.fixture
async def keyed_api(tmp_path, redis_server, monkeypatch) -> AsyncIterator[tuple[Client, io.StringIO]]:
    monkeypatch.setenv("TEST_BOTD_KEY", KEY)
    cfg = make_config(tmp_path, redis_server.url, api={"keys": ["env:TEST_BOTD_KEY"]}, model={"max_tokens": 2})
    with captured("info") as stream:
        async with running_daemon(cfg) as client:
            yield client, stream


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(req=requests())
async def test_fuzz_no_request_gets_a_5xx(keyed_api, req):
    api, log = keyed_api
    await check_request(api, log, req)


async def check_request(api: Client, log: io.StringIO,
                        req: tuple[str, str, bytes | None, list[tuple[str, bytes]]]) -> None:
    """One request of any route: never a 5xx, never an unhandled error (bench/fuzz_api.py too)."""
    method, target, body, headers = req
    start = len(log.getvalue())
    status, raw = await raw_request(api.daemon.port, method, target, body, headers)
    assert status < 500, (status, raw[:300])
    # a stream that began cannot change its status: its events must not report a server failure either
    assert b'"generation_failed"' not in raw and b'"internal_error"' not in raw, raw[-300:]
    assert "unhandled error" not in log.getvalue()[start:]


# -- fuzz: the fields that take a JSON schema (tools, tool_choice, tool_calls) ------------------------
# Schemas become grammars that llama.cpp's C++ parser reads in this very process: a schema it
# cannot take used to crash it (issue 25 item 1). Hostile schemas must get a 4xx; valid ones
# (small, random) reach the model with their grammar; nothing may crash the process, answer 5xx
# or push its memory over RSS_CEILING_MB at any moment of a request. bench/fuzz_api.py runs the
# same checks for as long as asked.

RSS_CEILING_MB = 1536
BIG = st.one_of(st.integers(-3, 40), st.integers(990, 1010), st.integers(10**4, 10**7), st.just(10**20))
PATTERN = st.one_of(
    st.text(alphabet="ab()[]{}|*+?.^$\\dws0123456789,-\"", max_size=40).map(lambda p: f"^{p}$"),
    st.integers(0, 10**6).map(lambda n: f"^(ab){{0,{n}}}$"), TEXT)
REF = st.sampled_from(["#/$defs/a", "#/definitions/b", "#", "#/$defs/nope", "https://example.com/s.json", "a"])
KIND = st.sampled_from(["string", "integer", "number", "boolean", "array", "object", "null", "bogus"])
SCHEMA_LEAF = st.fixed_dictionaries({}, optional={
    "type": st.one_of(KIND, st.lists(KIND, max_size=3), JSONISH), "maxLength": st.one_of(BIG, JSONISH),
    "minLength": BIG, "maxItems": BIG, "minItems": BIG, "pattern": PATTERN, "const": SCALAR, "$ref": REF,
    "enum": st.one_of(st.lists(SCALAR, max_size=4), st.integers(0, 400).map(lambda n: list(range(n))), JSONISH),
    "format": st.sampled_from(["date", "time", "date-time", "uuid", "email", "nope"]),
})


def _schema_level(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    container = st.fixed_dictionaries({}, optional={
        "properties": st.dictionaries(TEXT, kids, max_size=3), "items": st.one_of(kids, st.lists(kids, max_size=2)),
        "anyOf": st.lists(kids, max_size=3), "oneOf": st.lists(kids, max_size=3), "allOf": st.lists(kids, max_size=2),
        "$defs": st.dictionaries(st.sampled_from(["a", "b"]), kids, max_size=2),
        "additionalProperties": st.one_of(st.booleans(), kids), "required": st.lists(TEXT, max_size=2),
        "prefixItems": st.lists(kids, max_size=2),
    })
    return st.tuples(SCHEMA_LEAF, container).map(lambda t: {**t[0], **t[1]})


SCHEMA = st.one_of(st.recursive(SCHEMA_LEAF, _schema_level, max_leaves=10), JSONISH,
                   st.integers(20, 200).map(lambda n: {"type": "object", "properties": {"x": _nest_schema(n)}}))
TOOL_NAME = st.one_of(st.sampled_from(["f", "g", "lookup"]), TEXT)
TOOL = st.one_of(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": TOOL_NAME}, optional={"parameters": SCHEMA, "description": TEXT})}), JSONISH)
CHOICE = st.one_of(st.sampled_from(["auto", "required", "none", "any"]), st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": TOOL_NAME})}), JSONISH)
DEEP_JSON = st.integers(1, 30_000).map(lambda n: "[" * n + "]" * n)
CALL = st.fixed_dictionaries({"id": TEXT, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": TOOL_NAME, "arguments": st.one_of(TEXT, DEEP_JSON, JSONISH.map(json.dumps), JSONISH)})})
TOOL_MESSAGES = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.one_of(st.none(), TEXT),
                           "tool_calls": st.one_of(st.lists(CALL, max_size=2), JSONISH)}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": TEXT, "content": TEXT}),
), min_size=1, max_size=4)
HOSTILE_TOOLS = st.fixed_dictionaries({"messages": st.one_of(TOOL_MESSAGES, MESSAGES)}, optional={
    "tools": st.one_of(st.lists(TOOL, max_size=3), JSONISH), "tool_choice": CHOICE,
    "parallel_tool_calls": st.one_of(st.booleans(), JSONISH), "max_tokens": st.integers(1, 2),
    "stream": st.booleans(),
})
# Valid schemas, small enough that the model writes a call within its one or two tokens' budget
# and large enough to exercise the grammar: these reach llama.cpp's parser and sampler.
SAFE_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
SAFE_LEAF = st.one_of(
    st.builds(lambda n, m: {"type": "string", "minLength": min(n, m), "maxLength": max(n, m)},
              st.integers(0, 40), st.integers(0, 40)),
    st.sampled_from([{"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
                     {"type": "string", "format": "date"}, {"type": "string", "pattern": "^[a-z]{1,5}-[0-9]{2}$"},
                     {"type": ["string", "null"]}, {}]),
    st.lists(st.one_of(SAFE, st.integers()), min_size=1, max_size=6).map(lambda v: {"enum": v}),
)
SAFE_SCHEMA = st.recursive(SAFE_LEAF, lambda kids: st.one_of(
    st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, kids, st.integers(0, 8)),
    st.dictionaries(SAFE_NAME, kids, max_size=4).map(
        lambda p: {"type": "object", "properties": p, "required": list(p)[:2]}),
    st.lists(kids, min_size=1, max_size=3).map(lambda alts: {"anyOf": alts}),
), max_leaves=8)
GOOD_TOOLS = st.fixed_dictionaries({
    "messages": st.just([{"role": "user", "content": "Call a tool."}]),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({
        "name": SAFE_NAME, "parameters": SAFE_SCHEMA.map(lambda s: {"type": "object", "properties": {"a": s}})})}),
        min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"]),
    "tool_choice": st.sampled_from(["required", "auto"]), "max_tokens": st.integers(1, 2),
}, optional={"stream": st.booleans()})


def _nest_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def peak_rss_mb() -> float:
    """The process's peak RSS since the last reset_peak_rss() (VmHWM), in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> None:
    """Start the peak over from now (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


async def check_schema_request(api: Client, log: io.StringIO, body: dict[str, Any]) -> None:
    """One request with tools: a 4xx or an answer, never a 5xx, a crash or memory over the ceiling."""
    start = len(log.getvalue())
    reset_peak_rss()
    status, raw = await raw_request(api.daemon.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                    [("Authorization", b"Bearer " + KEY.encode())])
    assert status < 500, (status, raw[:300], json.dumps(body)[:300])
    assert b'"generation_failed"' not in raw and b'"internal_error"' not in raw, raw[-300:]
    assert "unhandled error" not in log.getvalue()[start:]
    assert peak_rss_mb() < RSS_CEILING_MB, (peak_rss_mb(), json.dumps(body)[:300])


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(body=st.one_of(HOSTILE_TOOLS, HOSTILE_TOOLS, GOOD_TOOLS))
async def test_fuzz_schemas_never_crash_or_5xx(keyed_api, body):
    api, log = keyed_api
    await check_schema_request(api, log, body)


# -- clients that go away mid-stream -------------------------------------------------------------


async def _abort_mid_stream(port: int, lines: int, reset: bool, stall: bool) -> None:
    """Stream a long answer, read ``lines`` events of it, then vanish (FIN, or RST with ``reset``).

    With ``stall`` the event loop (the daemon's too) is blocked for a moment right after the
    reset, while the model keeps producing tokens: the next loop turn then sees the reset and
    a token together, and the handler writes to a closing transport before aiohttp cancels it.
    That is the race a busy box hits now and then, made certain.
    """
    loop = asyncio.get_running_loop()
    body = json.dumps({"messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
                       "stream": True, "max_tokens": 1000}).encode()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                b"Content-Type: application/json\r\n"
                                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < lines:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "the stream ended early"
            received += chunk
        if reset:  # SO_LINGER 0: close sends RST, as a killed client does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    if stall:
        time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop on purpose: see the docstring


async def test_clients_that_vanish_mid_stream_leave_one_info_line_each(tmp_path, redis_server):
    rounds = 15
    rng = random.Random(11)
    with captured("info") as log:
        cfg = make_config(tmp_path, redis_server.url, model={"max_tokens": 1000})
        async with running_daemon(cfg) as api:
            worker = api.daemon.runtime.worker

            async def idle() -> bool:
                return not worker.busy and len(api.daemon.runtime.queue) == 0

            for i in range(rounds):
                await _abort_mid_stream(api.daemon.port, rng.randint(2, 12), reset=i % 3 != 0, stall=i % 3 == 1)
                await wait_for(idle, timeout=5)  # 1000 tokens would take several seconds more
            # still serving
            status, _ = await raw_request(api.daemon.port, "POST", "/v1/chat/completions",
                                          json.dumps(completion()).encode())
            assert status == 200

            async def all_logged() -> bool:
                return len([e for e in log_events(log) if e["event"] == "finished: cancelled"]) == rounds

            await wait_for(all_logged, timeout=5)
    assert_clean_log(log)
    events = log_events(log)
    gone = [e for e in events if e["event"] == "client went away; generation stopped"]
    assert len(gone) == rounds, [e["event"] for e in events][-40:]
    assert all(e["level"] == "info" for e in gone)
    assert not redis_server.client().keys("botd:hist:*")
