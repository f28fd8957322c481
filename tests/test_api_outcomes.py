"""How the HTTP API reports answers that did not complete (busy, shutdown), in both the
plain and the streamed mode and on ``/chat``; and who may be an admin over the API.

Real daemon, real model, real Redis: the outcomes come from the real worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from connectors.config import config_from_dict
from core.config import ConfigError
from tests.helpers import Client, busy_model, make_config, running_daemon, wait_for

LONG = {"messages": [{"role": "user", "content": "Write a very long essay about the sea."}], "max_tokens": 1000}


async def _stream(api: Client, body: dict[str, Any], on_event: Any = None) -> tuple[int, Any, list[str]]:
    """POST a streamed request; returns the status, headers and the SSE data lines (or the JSON error)."""
    events: list[str] = []
    async with api.session.post(api.base + "/v1/chat/completions", json={**body, "stream": True}) as r:
        if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            return r.status, r.headers, [await r.text()]
        async for line in r.content:
            text = line.decode().strip()
            if text.startswith("data: "):
                events.append(text[6:])
                if on_event is not None:
                    on_event(len(events))
        return r.status, r.headers, events


# -- item 19.3: a queue wait that expired is 503 busy in every mode ------------------------


async def test_queue_wait_expired_is_503_busy_streamed_plain_and_chat(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, queue={"max_wait_s": 0.5, "retry_after_s": 7})
    async with running_daemon(cfg) as api:
        async with busy_model(api, jobs=2):
            body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
            plain, streamed, simple = await asyncio.gather(
                api.post("/v1/chat/completions", {**body, "user": "plain"}),
                _stream(api, {**body, "user": "streamed"}),
                api.post("/chat", {"query": "Hello", "max_tokens": 4, "user": "simple"}),
            )
        for name, (status, data, headers) in {"plain": plain, "chat": simple}.items():
            assert status == 503, (name, data)
            assert data["error"]["code"] == "busy", (name, data)
            assert headers["Retry-After"] == "7", name
            assert "queue" in data["error"]["message"], name  # says why
        status, headers, events = streamed
        # The status was chosen before the stream began: a real 503, not 200 + an SSE error.
        assert status == 503, events
        assert headers["Retry-After"] == "7"
        assert json.loads(events[0])["error"]["code"] == "busy"


# -- item 11.7: an answer cut by shutdown is not reported as complete ------------------------


async def test_streamed_answer_cut_by_shutdown_ends_with_an_error_event(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, model={"max_tokens": 1000})
    async with running_daemon(cfg) as api:
        stopping: list[asyncio.Task[None]] = []

        def stop_after_some_tokens(n: int) -> None:
            if n == 8 and not stopping:  # mid-answer: 1000 tokens would take several seconds more
                stopping.append(asyncio.create_task(api.daemon.stop(grace_s=0.5)))

        status, _, events = await _stream(api, LONG, stop_after_some_tokens)
        await stopping[0]
        assert status == 200
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        assert "stop" not in finishes and "length" not in finishes
        errors = [c["error"] for c in chunks if "error" in c]
        assert len(errors) == 1 and errors[0]["code"] == "shutdown", chunks[-2:]
        assert errors[0]["message"]
        assert events[-1] == "[DONE]"
        assert len([c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]) >= 5


async def test_plain_answers_cut_by_shutdown_are_503_shutdown(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, model={"max_tokens": 1000})
    async with running_daemon(cfg) as api:
        running = asyncio.create_task(api.post("/v1/chat/completions", {**LONG, "user": "a"}))

        async def generating() -> bool:
            jobs = list(api.daemon.runtime.worker._running)
            return bool(jobs) and len(jobs[0].text) > 20

        await wait_for(generating)
        # A second one waits in the queue: it is cut before it starts.
        queued = asyncio.create_task(api.post("/chat", {"query": "Hello", "max_tokens": 50, "user": "b"}))

        async def waiting() -> bool:
            return len(api.daemon.runtime.queue) == 1

        await wait_for(waiting)
        await api.daemon.stop(grace_s=0.5)
        for task in (running, queued):
            status, data, headers = await task
            assert status == 503, data
            assert data["error"]["code"] == "shutdown"
            assert int(headers["Retry-After"]) > 0


# -- item 11.13: API admins need API keys ------------------------------------------------------


def _admin_config(tmp_path, admins: list[str], keys: list[str]):
    return config_from_dict({
        "bots": {"assistant": {"admins": admins}},
        "api": {"keys": keys},
        "server": {"state_dir": str(tmp_path / "state")},
    }, tmp_path / "config.toml")


def test_api_admins_are_refused_without_api_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        _admin_config(tmp_path, ["telegram:4242", "api:local:alice"], [])
    text = str(err.value)
    assert "bots.assistant.admins" in text
    assert "api:local:alice" in text and "api:<key id>:<user>" in text
    # Platform admins alone need no keys.
    assert _admin_config(tmp_path, ["telegram:4242"], []).bots["assistant"].admins == ["telegram:4242"]


def test_api_admins_load_with_api_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_BOTD_KEY", "s3cret-key-123")
    key_id = hashlib.sha256(b"s3cret-key-123").hexdigest()[:12]
    cfg = _admin_config(tmp_path, [f"api:{key_id}:alice"], ["env:TEST_BOTD_KEY"])
    assert cfg.bots["assistant"].admins == [f"api:{key_id}:alice"]
