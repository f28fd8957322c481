"""Bad input gets a clear 4xx and changes nothing; Redis can go away and come back."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.helpers import make_config, running_daemon, wait_for

_READ = {"list": lambda r, k: r.lrange(k, 0, -1), "hash": lambda r, k: sorted(r.hgetall(k).items()),
         "string": lambda r, k: r.get(k), "set": lambda r, k: sorted(r.smembers(k)),
         "zset": lambda r, k: r.zrange(k, 0, -1, withscores=True), "stream": lambda r, k: r.xrange(k)}


def _state(redis_client) -> list[tuple[str, object]]:
    """Every botd key with its whole value, whatever its type (histories, usage, feedback...)."""
    keys = redis_client.keys("botd:*")
    return sorted((k, _READ[redis_client.type(k)](redis_client, k)) for k in keys)


BAD_BODIES = [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "empty_body"),
    (b"[1, 2]", 400, "invalid_body"),
    (json.dumps({"conversation_id": "c"}).encode(), 400, "invalid_request"),  # messages missing
    (json.dumps({"messages": []}).encode(), 400, "invalid_request"),
    (json.dumps({"messages": "hello"}).encode(), 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": 42}]}).encode(), 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode(), 400,
     "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}).encode(), 400,
     "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes please"}).encode(), 400,
     "invalid_request"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}], "conversation_id": "c"}).encode(), 400,
     "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-17"}).encode(), 404,
     "model_not_found"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}).encode(), 400,
     "invalid_request"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 40000}], "conversation_id": "c"}).encode(), 413,
     "input_too_long"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 3000}], "conversation_id": "c"}).encode(), 400,
     "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3}).encode(), 400, "invalid_request"),
]


async def test_every_bad_input_gets_its_4xx_and_changes_nothing(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        await api.chat("Hello", cid="c", max_tokens=4)  # some state to protect
        r = redis_server.client()
        before = _state(r)
        for raw, status, code in BAD_BODIES:
            got, data, _ = await api.post("/v1/chat/completions", raw=raw,
                                          headers={"Content-Type": "application/json"})
            assert (got, data["error"]["code"]) == (status, code), (raw[:80], data)
            assert data["error"]["message"]
        # /chat
        for body, status in [({"history": []}, 400), ({"query": ""}, 400), ({"query": 5}, 400),
                             ({"query": "hi", "history": "nope"}, 400), ({"query": "hi", "bot": "nobody"}, 404),
                             ({"query": "hi", "history": [["a", "b"]], "conversation_id": "c"}, 400)]:
            got, data, _ = await api.post("/chat", body)
            assert got == status, (body, data)
        # an oversized body
        got, data, _ = await api.post("/v1/chat/completions", raw=b'{"x": "' + b"a" * 1_100_000 + b'"}',
                                      headers={"Content-Type": "application/json"})
        assert got == 413
        assert _state(r) == before
        assert api.daemon.runtime.worker.busy is False and len(api.daemon.runtime.queue) == 0


async def test_api_keys_are_required_and_checked(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("TEST_BOTD_KEY", "s3cret-key-123")
    cfg = make_config(tmp_path, redis_server.url, api={"keys": ["env:TEST_BOTD_KEY"]})
    async with running_daemon(cfg) as api:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "conversation_id": "k"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key-123"}):
            status, data, h = await api.post("/v1/chat/completions", body, headers=headers)
            assert status == 401 and data["error"]["code"] == "invalid_api_key"
            assert "s3cret" not in json.dumps(data)
        assert redis_server.client().keys("botd:*") == []
        status, data, _ = await api.post("/v1/chat/completions", body,
                                         headers={"Authorization": "Bearer s3cret-key-123"})
        assert status == 200
        # conversations are per key: the same id under no key is a different thread
        assert len(redis_server.client().keys("botd:hist:*")) == 1
        status, _ = await api.get("/healthz")
        assert status == 200


async def test_redis_stopped_and_restarted_mid_run(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, redis={"socket_timeout_s": 0.5})
    async with running_daemon(cfg) as api:
        await api.chat("Hello", cid="r", max_tokens=4)
        redis_server.stop()
        # still answers (without history), and health says what is wrong
        data = await api.chat("Are you there?", cid="r", max_tokens=4)
        assert data["choices"][0]["message"]["content"] is not None

        async def degraded() -> bool:
            _, h = await api.get("/healthz")
            return h["redis"] == "unreachable" and h["status"] == "degraded"

        await wait_for(degraded, timeout=10)
        status, data, h = await api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "/reset"}], "conversation_id": "r"})
        assert status == 503 and "Retry-After" in h
        redis_server.start()

        async def recovered() -> bool:
            _, h = await api.get("/healthz")
            return h["redis"] == "ok"

        await wait_for(recovered, timeout=15)
        await api.chat("Back again", cid="r2", max_tokens=4)
        stored = redis_server.client().lrange("botd:hist:api:assistant:local/r2:", 0, -1)
        assert len(stored) == 2


async def test_daemon_starts_while_redis_is_down_and_recovers(tmp_path, redis_server):
    redis_server.stop()
    cfg = make_config(tmp_path, redis_server.url, redis={"socket_timeout_s": 0.5})
    async with running_daemon(cfg) as api:
        _, h = await api.get("/healthz")
        assert h["status"] == "degraded"
        redis_server.start()

        async def recovered() -> bool:
            _, h = await api.get("/healthz")
            return h["status"] == "ok"

        await wait_for(recovered, timeout=15)


@pytest.mark.parametrize("cut", [True])
async def test_malformed_requests_never_crash_the_server(tmp_path, redis_server, cut):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.daemon.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        await writer.drain()
        writer.close()  # a client that dies mid-body
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", api.daemon.port)
        writer2.write(b"GARBAGE\r\n\r\n")
        await writer2.drain()
        line = await reader2.readline()
        assert b"400" in line
        writer2.close()
        status, _ = await api.get("/healthz")
        assert status == 200
