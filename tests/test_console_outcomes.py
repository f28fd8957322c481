"""The console's JSON endpoints turn busy / refused / unavailable into the same HTTP statuses as
the HTTP API (one mapping: connectors/http_status.py): a user past their own limit is 429 with
Retry-After, not a 503 that tells them the whole daemon is busy."""

from __future__ import annotations

from tests.helpers import running_daemon
from tests.test_console import _signing_key, browsers, console_config  # noqa: F401  (_signing_key: autouse)


async def test_a_console_user_past_their_limit_is_429_with_retry_after(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url, limits={"user_messages_per_minute": 1})
    async with running_daemon(cfg) as api, browsers(api, "alice") as (alice,):
        status, _, _ = await alice.chat("hr", "Hello.", max_tokens=2)
        assert status == 200
        async with alice.http.post(alice.base + "/api/chat", headers={"X-CSRF-Token": alice.csrf},
                                   json={"bot": "hr", "text": "Hello again.", "max_tokens": 2}) as r:
            body = await r.json()
            assert r.status == 429, body
            assert body["error"]["code"] == "rate_limited"
            assert 0 < int(r.headers["Retry-After"]) <= 60
