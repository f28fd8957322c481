"""Rate limits and token quotas, held in a real Redis across daemon restarts."""

from __future__ import annotations

from tests.helpers import make_config, running_daemon


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
        # Another "user" from the same caller is the same quota (a fresh name per request must not
        # be a fresh allowance); another caller is not affected.
        assert (await _ask(api, "bob", "b1"))[0] == 429
        assert (await _ask(api.elsewhere(2), "bob", "b2"))[0] == 200
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
        keys = redis_server.client().keys("botd:rl:tok:api:local@127.0.0.1:*")
        assert len(keys) == 1 and int(redis_server.client().get(keys[0])) == used


# -- limits are keyed on who the caller is, not on what it says (issue 25, item 5) ----------------


async def test_a_fresh_user_field_per_request_is_no_fresh_quota(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, limits={"user_messages_per_minute": 2})
    async with running_daemon(cfg) as api:
        statuses = [(await _ask(api, f"sock-puppet-{i}", f"p{i}"))[0] for i in range(3)]
        if statuses[2] == 200:  # the minute rolled over between the calls: once more
            statuses += [(await _ask(api, f"sock-puppet-{i}", f"p{i}"))[0] for i in range(3, 5)]
        assert statuses[-1] == 429, statuses
        # Another caller (another address) has its own allowance.
        assert (await _ask(api.elsewhere(3), "anyone", "other"))[0] == 200


def _tool_config(tmp_path, redis_url: str, base: str, **limits: int):
    return make_config(tmp_path, redis_url, limits=limits,
                       tools={"lookup": {"type": "http", "base_url": f"{base}/api", "path": "/lookup",
                                         "description": "A company API that opens a ticket per call",
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                                         "timeout_s": 10}},
                       bots={"assistant": {"tools": ["lookup"]}})


def _tool_api(seen: list[str], delay_s: float = 0.0, running: list[int] | None = None):
    import asyncio

    from aiohttp import web

    async def lookup(request: web.Request) -> web.Response:
        seen.append(request.query.get("q", ""))
        if running is not None:
            running[0] += 1
            running[1] = max(running[1], running[0])
        await asyncio.sleep(delay_s)
        if running is not None:
            running[0] -= 1
        return web.Response(text=f"ticket for {request.query.get('q', '')}")

    app = web.Application()
    app.router.add_get("/api/lookup", lookup)
    return app


async def test_a_tool_command_answered_429_has_called_no_tool(tmp_path, redis_server):
    from tests.fakes import serve

    seen: list[str] = []
    async with serve(_tool_api(seen)) as base:
        cfg = _tool_config(tmp_path, redis_server.url, base, user_messages_per_minute=1)
        async with running_daemon(cfg) as api:
            status, data, _ = await _say(api, "/tool lookup q=first", "t1")
            assert status == 200 and "ticket for first" in data["choices"][0]["message"]["content"]
            refused = "second"
            status, data, headers = await _say(api, "/tool lookup q=second -- Was the ticket opened?", "t2")
            if status == 200:  # the minute rolled over: the next one is over the limit
                refused = "third"
                status, data, headers = await _say(api, "/tool lookup q=third -- Was it opened?", "t3")
            assert status == 429 and data["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
            assert refused not in seen  # the refused command called nothing: no ticket was opened


async def test_a_burst_of_tool_commands_beyond_the_cap_is_refused(tmp_path, redis_server):
    import asyncio

    from tests.fakes import serve

    seen: list[str] = []
    running = [0, 0]  # now, most at once
    async with serve(_tool_api(seen, delay_s=1.0, running=running)) as base:
        cfg = _tool_config(tmp_path, redis_server.url, base)  # user_tool_calls_in_flight: 2 by default
        async with running_daemon(cfg) as api:
            # One caller, each request under a fresh "user" name and conversation.
            results = await asyncio.gather(*(api.post("/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"/tool lookup q=burst{i}"}], "user": f"u{i}",
                "conversation_id": f"burst{i}"}) for i in range(6)))
            codes = sorted(status for status, _, _ in results)
            assert codes == [200, 200, 429, 429, 429, 429], results
            assert running[1] <= 2 and len(seen) == 2
            refused = next(data for status, data, _ in results if status == 429)
            assert refused["error"]["code"] == "rate_limited" and "tool calls running" in refused["error"]["message"]
            # Another caller still has its own places.
            status, _, _ = await api.elsewhere(4).post("/v1/chat/completions", {
                "messages": [{"role": "user", "content": "/tool lookup q=other"}], "conversation_id": "o"})
            assert status == 200


async def _say(api, text: str, cid: str):
    return await api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                                    "max_tokens": 8, "conversation_id": cid})
