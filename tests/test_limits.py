"""Rate limits and token quotas, held in a real Redis across daemon restarts."""

from __future__ import annotations

from conftest import make_config, running_daemon


async def _ask(api, user: str, cid: str = "q"):
    return await api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                    "max_tokens": 8, "user": user, "conversation_id": cid})


async def test_messages_per_minute_hold_across_a_restart(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, limits={"user_messages_per_minute": 2})
    async with running_daemon(cfg) as api:
        assert (await _ask(api, "ann", "a1"))[0] == 200
        assert (await _ask(api, "ann", "a2"))[0] == 200
    async with running_daemon(cfg) as api:  # a new daemon, same Redis
        status, data, headers = await _ask(api, "ann", "a3")
        if status == 200:  # the minute rolled over between the calls: the window restarts
            assert (await _ask(api, "ann", "a4"))[0] == 200
            status, data, headers = await _ask(api, "ann", "a5")
        assert status == 429
        assert 1 <= int(headers["Retry-After"]) <= 61
        assert "messages this minute" in data["error"]["message"] and "try again in" in data["error"]["message"]
        assert (await _ask(api, "bob", "b1"))[0] == 200  # others are not affected
        # a refused message changed nothing
        assert not redis_server.client().exists("botd:hist:api:assistant:local/a5:")


async def test_tokens_per_day(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, limits={"user_tokens_per_day": 60})
    async with running_daemon(cfg) as api:
        status, data, _ = await _ask(api, "cara", "c1")
        assert status == 200
        used = data["usage"]["total_tokens"]
        assert used > 30
        status, data, _ = await _ask(api, "cara", "c2")
        if status == 200:
            used += data["usage"]["total_tokens"]
            status, data, _ = await _ask(api, "cara", "c3")
        assert used >= 60 and status == 429
        assert "tokens for today" in data["error"]["message"]
        keys = redis_server.client().keys("botd:rl:tok:api:local:cara:*")
        assert len(keys) == 1 and int(redis_server.client().get(keys[0])) == used
