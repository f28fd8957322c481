"""Issue 25, items 2, 3, 12 and 13, sent as an attacker would: the real daemon on a real port,
a real Redis, real sockets.

- The API behind a reverse proxy (which forwards from 127.0.0.1): a caller without a credential
  reaches no bot that reads knowledge, nor a stored conversation through a foreign Host
  (DNS rebinding); a text/plain POST (what any web page can send cross-site) is refused.
- A reload revokes: a key replaced inside its file, a new signing key, ``botd token revoke``.
- Console logins: a stranger's wrong passwords do not lock the real admin out from elsewhere;
  one IPv6 /64 is one address.
- Bounds: half-sent requests are closed within the read deadline; connections are capped;
  /healthz and /metrics show nothing of the knowledge bases or Redis errors to anonymous callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots.cli import main as cli_main
from connectors.config import load_config
from core.auth import API_AUDIENCE, LoginLimiter, Tokens, TooManyAttempts, hash_password
from core.kv import KeyValueCache
from tests.helpers import Client, make_config, running_daemon

KEY = "security-signing-key-for-the-tests-0123456789"
NEW_KEY = "security-signing-key-rotated-9876543210-abcdef"
SECRET_FACT = "The merger with Initech closes on 14 March."
ADMIN_PASSWORD = "the-real-admin-password"


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for these configs (strings, numbers, booleans, lists, tables)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    out = (f"[{prefix}]\n" if prefix and (lines or not tables) else "") + "".join(line + "\n" for line in lines)
    for key, value in tables:
        out += "\n" + _toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def knowledge_config(tmp_path: Path, redis_url: str, **sections: Any) -> dict[str, Any]:
    """A general assistant and a bot "finance" that reads the finance knowledge base."""
    docs = tmp_path / "docs" / "finance"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "board.md").write_text(f"# Board minutes\n\n{SECRET_FACT}\n")
    data: dict[str, Any] = {
        "bots": {"assistant": {}, "finance": {"knowledge": ["finance"], "no_match": "answer"}},
        "knowledge": {"finance": {"paths": [str(docs)], "schedule": ""}},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write_config(tmp_path: Path, redis_url: str, data: dict[str, Any]) -> Path:
    """The config as a file (what a reload re-reads), with the test defaults of make_config."""
    base = make_config(tmp_path, redis_url).model_dump(mode="json", include={"server", "model", "redis"},
                                                      exclude_defaults=True)
    for name, values in data.items():
        base.setdefault(name, {}).update(values)
    path = tmp_path / "config.toml"
    path.write_text(_toml(base))
    return path


@contextlib.asynccontextmanager
async def daemon_from(path: Path) -> AsyncIterator[Client]:
    async with running_daemon(load_config(path)) as api:
        yield api


def ask(model: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "What closes on 14 March?"}],
                            "max_tokens": 4, **extra}
    if model:
        body["model"] = model
    return body


# -- item 2: anonymous callers, Content-Type, Host ---------------------------------------------------


async def test_anonymous_requests_through_a_loopback_proxy_reach_no_knowledge_bot(tmp_path, redis_server):
    """No [api] keys, the default: a proxy on this machine forwards the internet from 127.0.0.1.
    Whatever it forwards (with or without the proxy's headers), nothing reads the finance base."""
    path = write_config(tmp_path, redis_server.url, knowledge_config(tmp_path, redis_server.url))
    async with daemon_from(path) as api:
        proxied = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
        for headers in ({}, proxied, {"Authorization": "Bearer sk-anything"}):
            status, data, _ = await api.post("/v1/chat/completions", ask("finance"), headers=headers)
            assert status in (401, 404), (headers, status, data)
            assert SECRET_FACT not in json.dumps(data)
            status, data, _ = await api.post("/chat", {"query": "board minutes?", "bot": "finance",
                                                       "max_tokens": 4}, headers=headers)
            assert status in (401, 404), (headers, status, data)
            status, data = await api.get("/v1/conversations/x?bot=finance", headers=headers)
            assert status in (401, 404), (headers, status, data)
        status, data = await api.get("/v1/models")
        assert "finance" not in [m["id"] for m in data["data"]]
        # Forwarded by a proxy, not even the knowledge-free assistant answers anonymously.
        status, data, _ = await api.post("/v1/chat/completions", ask(), headers=proxied)
        assert status == 401, data
        # The quick start still works: a local caller, no key, the default bot.
        status, data, _ = await api.post("/v1/chat/completions", ask())
        assert status == 200, data


async def test_a_bot_limited_jwt_gives_nothing_when_its_header_is_left_out(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("BOTD_SEC_KEY", KEY)
    data = knowledge_config(tmp_path, redis_server.url, console={"signing_key": "env:BOTD_SEC_KEY"})
    path = write_config(tmp_path, redis_server.url, data)
    token = Tokens(KEY).issue("bob", API_AUDIENCE, 600, bots=["assistant"])
    async with daemon_from(path) as api:
        status, _, _ = await api.post("/v1/chat/completions", ask("finance"),
                                      headers={"Authorization": f"Bearer {token}"})
        assert status == 404
        status, data, _ = await api.post("/v1/chat/completions", ask("finance"))
        assert status in (401, 404), data
        assert SECRET_FACT not in json.dumps(data)


async def test_anonymous_bots_opt_in_by_name_is_logged(tmp_path, redis_server):
    from tests.helpers import captured

    data = knowledge_config(tmp_path, redis_server.url, api={"anonymous_bots": ["finance"]})
    path = write_config(tmp_path, redis_server.url, data)
    with captured("info") as out:
        async with daemon_from(path) as api:
            status, body, _ = await api.post("/v1/chat/completions", ask("finance"),
                                             headers={"X-Forwarded-For": "203.0.113.9"})
            assert status == 200, body
    warnings = [json.loads(x) for x in out.getvalue().splitlines() if "anonymous_bots" in x]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning" and warnings[0]["bots"] == ["finance"]


async def test_a_text_plain_post_is_refused_415(tmp_path, redis_server):
    """A web page can POST text/plain (or a form) to 127.0.0.1:8080 without a CORS preflight."""
    async with running_daemon(make_config(tmp_path, redis_server.url)) as api:
        raw = json.dumps(ask()).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, data, _ = await api.post("/v1/chat/completions", raw=raw, headers={"Content-Type": ctype})
            assert status == 415, (ctype, status, data)
            assert data["error"]["code"] == "unsupported_media_type"
        status, data, _ = await api.post("/chat", raw=b'{"query": "hi"}', headers={"Content-Type": "text/plain"})
        assert status == 415


async def test_dns_rebinding_a_foreign_host_cannot_read_a_stored_conversation(tmp_path, redis_server):
    async with running_daemon(make_config(tmp_path, redis_server.url, api={"allowed_hosts": ["botd.lan"]})) as api:
        status, data, _ = await api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "My salary is 91234."}], "max_tokens": 4,
            "conversation_id": "private"})
        assert status == 200, data
        status, data = await api.get("/v1/conversations/private")
        assert status == 200 and "91234" in json.dumps(data)
        # The attacker's page at evil.example, whose name now resolves to 127.0.0.1.
        for host in ("evil.example", "evil.example:8080", "localhost.evil.example"):
            status, data = await api.get("/v1/conversations/private", headers={"Host": host})
            assert status == 421, (host, status, data)
            assert "91234" not in json.dumps(data) and "Host" in data["error"]["message"]
            status, data, _ = await api.post("/v1/chat/completions", ask(conversation_id="private"),
                                             headers={"Host": host})
            assert status == 421
        for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "botd.lan", "BOTD.LAN:80"):
            status, data = await api.get("/v1/conversations/private", headers={"Host": host})
            assert status == 200, (host, data)


# -- item 3: a reload revokes ------------------------------------------------------------------------


async def test_a_key_replaced_inside_its_file_stops_at_the_reload(tmp_path, redis_server):
    key_file = tmp_path / "api-key"
    key_file.write_text("old-api-key-0123456789\n")
    path = write_config(tmp_path, redis_server.url, {"api": {"keys": [f"file:{key_file}"]}})
    async with daemon_from(path) as api:
        old = {"Authorization": "Bearer old-api-key-0123456789"}
        new = {"Authorization": "Bearer new-api-key-9876543210"}
        assert (await api.get("/v1/models", headers=old))[0] == 200
        key_file.write_text("new-api-key-9876543210\n")  # config.toml itself is unchanged
        assert await api.daemon.reload()
        assert (await api.get("/v1/models", headers=old))[0] == 401
        assert (await api.get("/v1/models", headers=new))[0] == 200


async def test_a_new_signing_key_ends_the_old_api_tokens_at_the_reload(tmp_path, redis_server):
    key_file = tmp_path / "signing-key"
    key_file.write_text(KEY + "\n")
    path = write_config(tmp_path, redis_server.url, {"console": {"signing_key": f"file:{key_file}"}})
    old_token = Tokens(KEY).issue("bob", API_AUDIENCE, 3600, bots=["assistant"])
    async with daemon_from(path) as api:
        assert (await api.get("/v1/models", headers={"Authorization": f"Bearer {old_token}"}))[0] == 200
        key_file.write_text(NEW_KEY + "\n")
        assert await api.daemon.reload()
        assert (await api.get("/v1/models", headers={"Authorization": f"Bearer {old_token}"}))[0] == 401
        new_token = Tokens(NEW_KEY).issue("bob", API_AUDIENCE, 3600, bots=["assistant"])
        assert (await api.get("/v1/models", headers={"Authorization": f"Bearer {new_token}"}))[0] == 200


async def test_botd_token_revoke_ends_a_token_at_once(tmp_path, redis_server, monkeypatch, capsys):
    monkeypatch.setenv("BOTD_SEC_KEY", KEY)
    path = write_config(tmp_path, redis_server.url, {
        "api": {"keys": ["env:BOTD_SEC_KEY"]}, "console": {"signing_key": "env:BOTD_SEC_KEY"}})
    token = Tokens(KEY).issue("mallory", API_AUDIENCE, 30 * 86400, bots=["assistant"])
    other = Tokens(KEY).issue("bob", API_AUDIENCE, 3600, bots=["assistant"])
    async with daemon_from(path) as api:
        auth = {"Authorization": f"Bearer {token}"}
        assert (await api.get("/v1/models", headers=auth))[0] == 200
        assert await asyncio.to_thread(cli_main, ["token", "revoke", token, "--config", str(path)]) == 0
        assert "revoked the token of mallory" in capsys.readouterr().out
        status, data = await api.get("/v1/models", headers=auth)
        assert status == 401, data
        status, data, _ = await api.post("/v1/chat/completions", ask(), headers=auth)
        assert status == 401
        assert (await api.get("/v1/models", headers={"Authorization": f"Bearer {other}"}))[0] == 200
        # A token that is not one (or signed with another key) is said so; nothing is written.
        assert await asyncio.to_thread(cli_main, ["token", "revoke", "eyJ.not.atoken", "--config", str(path)]) == 1
        assert "not revoked" in capsys.readouterr().err


# -- item 12: console logins ------------------------------------------------------------------------


async def _login(session: aiohttp.ClientSession, base: str, user: str, password: str) -> int:
    async with session.get(base + "/console/login") as r:
        nonce = re.search(r'name="csrf" value="([^"]+)"', await r.text())
    assert nonce
    async with session.post(base + "/console/login", allow_redirects=False,
                            data={"user": user, "password": password, "csrf": nonce.group(1)}) as r:
        return r.status


async def test_a_stranger_cannot_lock_the_admin_out_from_another_address(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("BOTD_SEC_KEY", KEY)
    cfg = make_config(tmp_path, redis_server.url, console={
        "enabled": True, "signing_key": "env:BOTD_SEC_KEY",
        "users": {"admin": {"password_hash": hash_password(ADMIN_PASSWORD), "role": "admin"}}})
    async with running_daemon(cfg) as api:

        def browser(address: str) -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)),
                                         cookie_jar=aiohttp.CookieJar(unsafe=True))

        async with browser("127.0.0.1") as stranger, browser("127.0.0.2") as admin:
            for _ in range(5):
                assert await _login(stranger, api.base, "admin", "guess") == 401
            assert await _login(stranger, api.base, "admin", "guess") == 429  # the stranger is stopped
            assert await _login(admin, api.base, "admin", ADMIN_PASSWORD) == 303  # the admin is not


async def test_one_ipv6_64_is_one_address_for_the_login_limit(manager):
    limiter = LoginLimiter(KeyValueCache(manager, "botd"), attempts=2, window_s=60)
    # Per address: 4 x 2 password checks; a /64 holds 2^64 addresses, one host's to pick from.
    for i in range(8):
        await limiter.attempt(f"user{i}", f"2001:db8:1:2::{i + 1:x}")
    with pytest.raises(TooManyAttempts):
        await limiter.attempt("user9", "2001:db8:1:2:ffff::9")
    await limiter.attempt("user9", "2001:db8:1:3::1")  # the next /64 is another address


# -- item 13: bounds ------------------------------------------------------------------------------


async def test_half_sent_requests_are_closed_within_the_read_deadline(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, server={"request_read_timeout_s": 1.0})
    async with running_daemon(cfg) as api:
        conns = []
        for i in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", api.daemon.port)
            if i % 3 == 0:  # half a head
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            elif i % 3 == 1:  # a head, and half its body
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mess")
            # else: connected, and nothing sent
            await writer.drain()
            conns.append((reader, writer))
        t0 = time.monotonic()

        async def closed(reader: asyncio.StreamReader) -> float:
            while await reader.read(65536):
                pass
            return time.monotonic() - t0

        waited = await asyncio.wait_for(asyncio.gather(*(closed(r) for r, _ in conns)), timeout=10)
        assert max(waited) < 4.0, max(waited)
        for _, w in conns:
            w.close()
        # The server still answers, at once.
        assert (await api.get("/healthz"))[0] == 200


async def test_connections_over_the_cap_are_refused(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, server={"max_connections": 20})
    async with running_daemon(cfg) as api:
        idle = [await asyncio.open_connection("127.0.0.1", api.daemon.port) for _ in range(20)]
        reader, writer = await asyncio.open_connection("127.0.0.1", api.daemon.port)
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 503")
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.2)
        assert (await api.get("/healthz"))[0] == 200


async def test_healthz_and_metrics_tell_anonymous_callers_no_names_or_errors(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("BOTD_SEC_KEY", "health-api-key-0123456789")
    data = knowledge_config(tmp_path, redis_server.url, api={"keys": ["env:BOTD_SEC_KEY"]},
                            server={"health_details": "authenticated"})
    data["knowledge"]["board_minutes_2026"] = data["knowledge"].pop("finance")
    data["bots"]["finance"]["knowledge"] = ["board_minutes_2026"]
    path = write_config(tmp_path, redis_server.url, data)
    async with daemon_from(path) as api:
        redis_server.stop()  # Redis down: its error text would name the server and its address

        async def degraded() -> bool:
            _, h = await api.get("/healthz", headers={"Authorization": "Bearer health-api-key-0123456789"})
            return h.get("redis") == "unreachable"

        try:
            from tests.helpers import wait_for

            await wait_for(degraded, timeout=15)
            async with api.session.get(api.base + "/healthz") as r:
                text = await r.text()
            assert json.loads(text) == {"status": "degraded"}, text
            assert "board_minutes" not in text and "redis" not in text.lower()
            async with api.session.get(api.base + "/metrics") as r:
                assert r.status == 401 and "board_minutes" not in await r.text()
            status, detail = await api.get("/healthz", headers={"Authorization": "Bearer health-api-key-0123456789"})
            assert "board_minutes_2026" in detail["knowledge"] and detail["redis_error"]
        finally:
            redis_server.start()


async def test_the_embedded_redis_has_a_memory_ceiling_that_never_evicts(tmp_path):
    from core.redis_store import RedisManager

    cfg = make_config(tmp_path, "", redis={"embedded_maxmemory_mb": 64})
    redis = RedisManager(cfg.redis, tmp_path / "state")
    await redis.start()
    try:
        got = await redis.client.config_get("maxmemory*")
        assert got["maxmemory"] == str(64 * 1024 * 1024) and got["maxmemory-policy"] == "noeviction"
    finally:
        await redis.close()


def test_a_reload_sees_a_rotated_secret_inside_a_table_of_accounts(tmp_path, redis_server):
    """[telegram.NAME] is a table of accounts: the digest a reload compares reads each account's secrets."""
    from bots.daemon import _secrets_of

    token = tmp_path / "tg-token"
    token.write_text("123456:old-token-0123456789\n")
    hook = tmp_path / "tg-hook"
    hook.write_text("webhook-secret-0123456789\n")
    cfg = make_config(tmp_path, redis_server.url, telegram={"assistant": {
        "token": f"file:{token}", "mode": "webhook", "webhook_secret": f"file:{hook}"}})
    before = _secrets_of(cfg, "telegram")
    assert _secrets_of(cfg, "telegram") == before
    token.write_text("123456:new-token-9876543210\n")
    assert _secrets_of(cfg, "telegram") != before
