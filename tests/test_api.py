"""The HTTP API against the real daemon, model and Redis: answers, streaming, history, reset, expiry."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from core.messages import ThreadKey
from tests.helpers import make_config, running_daemon, wait_for


def hist_key(cid: str, bot: str = "assistant") -> str:
    return "botd:hist:" + ThreadKey("api", bot, f"local/{cid}", "").redis_suffix()


async def test_non_streaming_answer_and_usage(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        data = await api.chat("What is the capital of France?", max_tokens=24)
        choice = data["choices"][0]
        assert data["object"] == "chat.completion"
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].strip()
        assert choice["finish_reason"] in ("stop", "length")
        usage = data["usage"]
        assert usage["prompt_tokens"] > 5
        assert 0 < usage["completion_tokens"] <= 24
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # stateless: nothing was written to Redis
        assert redis_server.client().keys("botd:hist:*") == []


async def test_streaming_sse_matches_the_whole_answer(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        body = {"messages": [{"role": "user", "content": "Tell me a short story about a cat."}],
                "stream": True, "max_tokens": 40, "conversation_id": "s1",
                "stream_options": {"include_usage": True}}
        events, arrivals = [], []
        async with api.session.post(api.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: "):
                    events.append(line[6:])
                    arrivals.append(time.monotonic())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
        text = "".join(deltas)
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["usage"]["completion_tokens"] > 5
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == finals[0]["usage"]
        # streamed, not buffered: many chunks, arriving over time
        assert len([d for d in deltas if d]) >= 5
        assert arrivals[-2] - arrivals[1] > 0.02
        # the stored answer is exactly what was streamed
        stored = [json.loads(x) for x in redis_server.client().lrange(hist_key("s1"), 0, -1)]
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[1]["content"] == text


async def test_conversation_history_is_kept_in_redis_and_given_to_the_model(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        first = await api.chat("My name is Ada. Remember it.", cid="conv-1", max_tokens=20)
        answer1 = first["choices"][0]["message"]["content"]
        r = redis_server.client()
        stored = [json.loads(x) for x in r.lrange(hist_key("conv-1"), 0, -1)]
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "My name is Ada. Remember it."), ("assistant", answer1)]

        second = await api.chat("What is my name?", cid="conv-1", max_tokens=20)
        # The second prompt holds exactly system + first exchange + new message, counted with
        # the model's own tokenizer: proof the first exchange went to the model.
        tok = api.daemon.runtime.tokenizer
        system = api.daemon.cfg.bots["assistant"].system_prompt
        expected = tok.count_chat([
            {"role": "system", "content": system},
            {"role": "user", "content": "My name is Ada. Remember it."},
            {"role": "assistant", "content": answer1},
            {"role": "user", "content": "What is my name?"},
        ])
        assert second["usage"]["prompt_tokens"] == expected
        assert len(r.lrange(hist_key("conv-1"), 0, -1)) == 4
        # another conversation starts empty
        other = await api.chat("What is my name?", cid="conv-2", max_tokens=5)
        assert other["usage"]["prompt_tokens"] < expected
        status, conv = await api.get("/v1/conversations/conv-1")
        assert status == 200 and len(conv["messages"]) == 4


async def test_history_is_trimmed_to_fit_the_context(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, model={"n_ctx": 512, "max_tokens": 32})
    async with running_daemon(cfg) as api:
        r = redis_server.client()
        key = hist_key("long")
        filler = "The quick brown fox jumps over the lazy dog near the river bank. " * 4
        for i in range(30):  # ~30 exchanges of ~60 tokens each: far beyond 512 tokens
            r.rpush(key, json.dumps({"role": "user", "content": f"Question {i}: {filler}"}),
                    json.dumps({"role": "assistant", "content": f"Answer {i}: {filler}"}))
        data = await api.chat("Summarise.", cid="long", max_tokens=32)
        used = data["usage"]["prompt_tokens"]
        assert used + 32 <= 512
        assert used > 300  # as much history as fits, not none
        # the kept part is the most recent history
        tok = api.daemon.runtime.tokenizer
        system = api.daemon.cfg.bots["assistant"].system_prompt
        last = [{"role": "system", "content": system},
                {"role": "user", "content": f"Question 29: {filler}"},
                {"role": "assistant", "content": f"Answer 29: {filler}"},
                {"role": "user", "content": "Summarise."}]
        assert used >= tok.count_chat(last)


async def test_reset_clears_one_conversation_only(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        await api.chat("Hello there", cid="a", max_tokens=5)
        await api.chat("Hello there", cid="b", max_tokens=5)
        r = redis_server.client()
        assert r.exists(hist_key("a")) and r.exists(hist_key("b"))
        data = await api.chat("/reset", cid="a")
        assert "forgotten" in data["choices"][0]["message"]["content"]
        assert not r.exists(hist_key("a")) and r.exists(hist_key("b"))
        async with api.session.delete(api.base + "/v1/conversations/b") as resp:
            assert resp.status == 200 and (await resp.json())["deleted"] is True
        assert not r.exists(hist_key("b"))


async def test_idle_threads_expire(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, redis={"history_ttl_s": 2})
    async with running_daemon(cfg) as api:
        await api.chat("Remember the number 7.", cid="exp", max_tokens=5)
        r = redis_server.client()
        assert 0 < r.ttl(hist_key("exp")) <= 2
        await asyncio.sleep(2.6)
        assert not r.exists(hist_key("exp"))
        data = await api.chat("Which number?", cid="exp", max_tokens=5)
        assert len(r.lrange(hist_key("exp"), 0, -1)) == 2  # a fresh thread
        assert data["usage"]["prompt_tokens"] < 40


async def test_simple_chat_endpoint(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        status, data, _ = await api.post("/chat", {"query": "Hello", "history": [["Hi", "Hello! How can I help?"]],
                                                   "max_tokens": 12})
        assert status == 200, data
        assert data["response"].strip()
        assert data["history"][-1] == ["Hello", data["response"]]
        assert len(data["history"]) == 2
        status, data, _ = await api.post("/chat", {"query": "Hello", "conversation_id": "simple", "max_tokens": 5})
        assert status == 200 and data["conversation_id"] == "simple"
        assert redis_server.client().exists(hist_key("simple"))


async def test_models_listing(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        status, data = await api.get("/v1/models")
        assert status == 200
        assert {m["id"] for m in data["data"]} == {"smollm2-135m", "assistant"}


async def test_client_gone_cancels_streaming_generation(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url, model={"max_tokens": 1000})) as api:
        body = {"messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
                "stream": True, "max_tokens": 1000, "conversation_id": "gone"}
        async with aiohttp.ClientSession() as s:
            resp = await s.post(api.base + "/v1/chat/completions", json=body)
            n = 0
            async for _ in resp.content:
                n += 1
                if n > 6:
                    break
            resp.close()  # the client goes away mid-answer
        t0 = time.monotonic()

        async def idle() -> bool:
            return not api.daemon.runtime.worker.busy

        await wait_for(idle, timeout=3)
        assert time.monotonic() - t0 < 3  # 1000 tokens would take several seconds more
        # a cancelled answer is not stored as an exchange
        assert not redis_server.client().exists(hist_key("gone"))


async def test_client_gone_cancels_non_streaming_generation(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url, model={"max_tokens": 1000})) as api:
        body = {"messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
                "max_tokens": 1000}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.8)) as s:
            try:
                async with s.post(api.base + "/v1/chat/completions", json=body) as r:
                    await r.read()
                raise AssertionError("expected the client to time out")
            except TimeoutError:
                pass

        async def idle() -> bool:
            return not api.daemon.runtime.worker.busy

        await wait_for(idle, timeout=8)  # 1000 tokens would take ~10 s
        assert len(api.daemon.runtime.queue) == 0
