"""The web console and JWT bearer tokens, against the real daemon, model and Redis over real HTTP.

A browser is played by aiohttp's client with a cookie jar: the login form's own CSRF nonce,
the session cookie's attributes, the CSRF token on every POST, roles and department limits
on every endpoint, logout revoking the token, the chat streaming in, the status figures.
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
import jwt
import pytest

from bots import cli
from connectors.config import config_from_dict
from connectors.web_console import connector as console_module
from core.auth import API_AUDIENCE, CONSOLE_AUDIENCE, Tokens, hash_password, verify_password
from core.config import Config, ConfigError
from core.messages import ThreadKey
from tests.helpers import Client, make_config, running_daemon, wait_for

KEY = "console-signing-key-for-the-tests-0123456789"
PASSWORDS = {"root": "root-password-1", "alice": "alice-password-1", "ivan": "ivan-password-1",
             "vera": "vera-password-1"}
HASHES = {name: hash_password(pw) for name, pw in PASSWORDS.items()}
USERS = {
    "root": {"password_hash": HASHES["root"], "role": "admin"},
    "alice": {"password_hash": HASHES["alice"], "role": "department", "bots": ["hr"]},
    "ivan": {"password_hash": HASHES["ivan"], "role": "department", "bots": ["it"]},
    "vera": {"password_hash": HASHES["vera"], "role": "viewer"},
}
HR_FACT = "The parental leave bonus is 1850 euros."
IT_FACT = "The VPN password rotates every 90 days."


@pytest.fixture(autouse=True)
def _signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", KEY)
    # Sample the status figures often enough for a test to see them.
    monkeypatch.setattr(console_module, "SAMPLE_EVERY_S", 0.2)


def console_config(tmp_path: Path, redis_url: str, knowledge: bool = False, **sections: Any) -> Config:
    bots: dict[str, Any] = {"assistant": {}, "hr": {"system_prompt": "You are the HR assistant."},
                            "it": {"system_prompt": "You are the IT helpdesk."}}
    extra: dict[str, Any] = {}
    if knowledge:
        for name, fact in (("hr", HR_FACT), ("it", IT_FACT)):
            folder = tmp_path / "docs" / name
            folder.mkdir(parents=True)
            (folder / f"{name}-policy.md").write_text(f"# {name.upper()} policy\n\n## Facts\n\n{fact}\n")
            bots[name]["knowledge"] = [name]
            bots[name]["no_match"] = "answer"
        extra["knowledge"] = {n: {"paths": [str(tmp_path / "docs" / n)], "schedule": ""} for n in ("hr", "it")}
    return make_config(
        tmp_path, redis_url, bots=bots,
        console={"enabled": True, "signing_key": "env:BOTD_TEST_CONSOLE_KEY", "login_attempts": 3,
                 "users": USERS},
        audit={"file": str(tmp_path / "audit.jsonl")},
        **extra, **sections,
    )


class Browser:
    """One user's browser: a cookie jar, the login form, the CSRF token of its login."""

    def __init__(self, api: Client, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.http = session
        self.base = api.base + "/console"
        self.csrf = ""

    async def login(self, user: str, password: str | None = None) -> aiohttp.ClientResponse:
        async with self.http.get(self.base + "/login") as r:
            assert r.status == 200
            nonce = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert nonce
        form = {"user": user, "password": PASSWORDS.get(user, "x") if password is None else password,
                "csrf": nonce.group(1), "next": "/console/status"}
        async with self.http.post(self.base + "/login", data=form, allow_redirects=False) as r:
            await r.read()
        if r.status == 303:
            status, me = await self.get("/api/me")
            assert status == 200, me
            self.csrf = me["csrf"]
        return r

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as r:
            body = await r.text()
            with contextlib.suppress(ValueError):
                return r.status, json.loads(body)
            return r.status, body

    async def post(self, path: str, *, csrf: bool = True, **kw: Any) -> tuple[int, Any]:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        headers.update(kw.pop("headers", {}))
        async with self.http.post(self.base + path, allow_redirects=False, headers=headers, **kw) as r:
            body = await r.text()
            with contextlib.suppress(ValueError):
                return r.status, json.loads(body)
            return r.status, body

    async def chat(self, bot: str, text: str, conversation: str = "c1", max_tokens: int = 12,
                   ) -> tuple[int, list[dict[str, Any]], list[float]]:
        """The NDJSON events of one answer, and when each arrived."""
        events, times = [], []
        async with self.http.post(self.base + "/api/chat", headers={"X-CSRF-Token": self.csrf},
                                  json={"bot": bot, "text": text, "conversation": conversation,
                                        "max_tokens": max_tokens}) as r:
            if r.status != 200:
                return r.status, [await r.json()], []
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            async for line in r.content:
                if line.strip():
                    events.append(json.loads(line))
                    times.append(time.monotonic())
        return r.status, events, times


@contextlib.asynccontextmanager
async def browsers(api: Client, *users: str) -> AsyncIterator[list[Browser]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for user in users:
            http = await stack.enter_async_context(aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=60)))
            b = Browser(api, http)
            if user:
                r = await b.login(user)
                assert r.status == 303, (user, r.status)
            out.append(b)
        yield out


def history_key(bot: str, chat: str, platform: str = "web") -> str:
    return "botd:hist:" + ThreadKey(platform, bot, chat, "").redis_suffix()


# -- config and CLI --------------------------------------------------------------------------------


def test_console_config_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", KEY)

    def load(console: dict[str, Any]) -> str:
        data = {"bots": {"assistant": {}, "hr": {}}, "console": {"enabled": True,
                                                                 "signing_key": "env:BOTD_TEST_CONSOLE_KEY",
                                                                 **console}}
        with pytest.raises(ConfigError) as exc:
            config_from_dict(data, tmp_path / "config.toml")
        return str(exc.value)

    ok = {"password_hash": HASHES["alice"], "role": "department", "bots": ["hr"]}
    assert "console.users: the console has no user" in load({})
    assert "console.users.a.bots: names no bot 'ghost'" in load({"users": {"a": {**ok, "bots": ["ghost"]}}})
    assert "console.users.a.bots: a department user needs" in load({"users": {"a": {**ok, "bots": []}}})
    assert "console.users.a.bots: an admin sees every bot" in load({"users": {"a": {**ok, "role": "admin"}}})
    msg = load({"users": {"a": {**ok, "password_hash": "hunter2-plain"}}})
    assert "console.users.a.password_hash: not an argon2 hash" in msg and "hunter2" not in msg
    assert "console.path" in load({"users": {"a": ok}, "path": "/v1/console"})
    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", "short")
    assert "console.signing_key: a signing key needs at least 32 characters" in load({"users": {"a": ok}})


def test_passwd_prints_a_section_whose_hash_checks_and_token_issue_signs_for_the_named_bots(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("s3cret-password\n"))
    assert cli.main(["console", "passwd", "alice", "--bots", "hr", "--stdin"]) == 0
    section = capsys.readouterr().out
    assert section.startswith("[console.users.alice]\n") and 'role = "department"' in section
    hashed = re.search(r'password_hash = "([^"]+)"', section).group(1)
    assert verify_password(hashed, "s3cret-password") and not verify_password(hashed, "wrong")
    assert cli.main(["console", "passwd", "bob", "--stdin"]) == 1  # department without bots

    config = tmp_path / "config.toml"
    config.write_text('[bots.assistant]\n[bots.hr]\n[console]\nsigning_key = "env:BOTD_TEST_CONSOLE_KEY"\n')
    assert cli.main(["token", "issue", "-c", str(config), "--bots", "hr", "--user", "alice", "--ttl", "7d"]) == 0
    token = capsys.readouterr().out.strip()
    claims = Tokens(KEY).decode(token, API_AUDIENCE)
    assert claims["bots"] == ["hr"] and claims["sub"] == "alice"
    assert 7 * 86400 - 5 <= claims["exp"] - time.time() <= 7 * 86400
    assert cli.main(["token", "issue", "-c", str(config), "--bots", "ghost", "--user", "alice"]) == 1
    assert cli.main(["token", "issue", "-c", str(config), "--bots", "hr", "--user", "alice", "--ttl", "9y"]) == 1


def test_every_console_text_exists_in_both_languages_and_the_language_follows_the_browser():
    from connectors.web_console import i18n

    assert set(i18n.TEXTS["en"]) == set(i18n.TEXTS["zh"])
    assert set(i18n.JS_KEYS) <= set(i18n.TEXTS["en"])
    # Every t.KEY / t["KEY"] a template uses exists.
    templates = Path(console_module.__file__).parent / "templates"
    used = set()
    for path in templates.glob("*.html"):
        used |= set(re.findall(r"\bt\.([a-z_]+)", path.read_text()))
        used |= set(re.findall(r"\bt\[['\"]([a-z_]+)['\"]\]", path.read_text()))
    assert used and used - {"get"} <= set(i18n.TEXTS["en"]), used - set(i18n.TEXTS["en"])
    assert i18n.choose(None, "zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert i18n.choose(None, "en-US,en;q=0.9,zh;q=0.8") == "en"
    assert i18n.choose(None, "fr-FR, zh-TW;q=0.5") == "zh"
    assert i18n.choose(None, "") == "en" and i18n.choose("zh", "en") == "zh"


# -- logins ----------------------------------------------------------------------------------------


async def test_login_cookie_csrf_rate_limit_logout_and_expiry(tmp_path, redis_server):
    async with running_daemon(console_config(tmp_path, redis_server.url)) as api, \
            browsers(api, "", "") as (b, other):
        # Not logged in: pages go to the login page, JSON is 401.
        status, _ = await b.get("/chat")
        assert status == 302
        assert (await b.get("/api/status"))[0] == 401

        r = await b.login("alice", "wrong password")
        assert r.status == 401 and "botd_console" not in {c.key for c in b.http.cookie_jar}
        r = await b.login("alice")
        assert r.status == 303 and r.headers["Location"] == "/console/status"
        cookie = next(h for h in r.headers.getall("Set-Cookie") if h.startswith("botd_console="))
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
        token = cookie.split(";")[0].split("=", 1)[1]
        claims = jwt.decode(token, KEY, algorithms=["HS256"], audience=CONSOLE_AUDIENCE)
        assert claims["sub"] == "alice" and 3590 <= claims["exp"] - time.time() <= 3600
        assert (await b.get("/status"))[0] == 200

        # A login form posted without its nonce (a cross-site form) is refused.
        r2 = await other.http.post(other.base + "/login", data={"user": "alice", "password": PASSWORDS["alice"]},
                                   allow_redirects=False)
        assert r2.status == 403
        r2.release()

        # State-changing requests need the login's CSRF token: without it nothing happens.
        status, body = await b.post("/logout", csrf=False)
        assert status == 403 and body["error"]["code"] == "csrf"
        assert (await b.post("/logout", csrf=False, headers={"X-CSRF-Token": "0" * 32}))[0] == 403
        assert (await b.get("/api/me"))[0] == 200
        # The logout form sends it as a field.
        status, _ = await b.post("/logout", csrf=False, data={"csrf": b.csrf})
        assert status == 303
        # The old cookie is refused after logout, even when sent again by hand.
        raw = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        async with raw:
            headers = {"Cookie": f"botd_console={token}"}
            async with raw.get(b.base + "/api/me", headers=headers) as r3:
                assert r3.status == 401
            async with raw.get(b.base + "/chat", headers=headers, allow_redirects=False) as r3:
                assert r3.status == 302 and "/console/login" in r3.headers["Location"]
            assert redis_server.client().exists(f"botd:cache:auth:revoked:{claims['jti']}")

            # An expired token goes back to the login page; a token signed with another key, or
            # an API token, is no login either.
            now = int(time.time())
            expired = Tokens(KEY).issue("alice", CONSOLE_AUDIENCE, 60)
            expired = jwt.encode({**jwt.decode(expired, KEY, algorithms=["HS256"], audience=CONSOLE_AUDIENCE),
                                  "iat": now - 7200, "exp": now - 3600}, KEY, algorithm="HS256")
            for bad in (expired, Tokens("another-key-" + "x" * 40).issue("alice", CONSOLE_AUDIENCE, 600),
                        Tokens(KEY).issue("alice", API_AUDIENCE, 600, bots=["hr"])):
                async with raw.get(b.base + "/status", headers={"Cookie": f"botd_console={bad}"},
                                   allow_redirects=False) as r3:
                    assert r3.status == 302 and "/console/login" in r3.headers["Location"]
                async with raw.get(b.base + "/api/me", headers={"Cookie": f"botd_console={bad}"}) as r3:
                    assert r3.status == 401

        # Rate limit: 3 attempts per user name per window, counted in Redis; then even the
        # right password is refused, with Retry-After.
        for _ in range(3):
            assert (await other.login("vera", "guess")).status == 401
        r = await other.login("vera")
        assert r.status == 429 and 0 < int(r.headers["Retry-After"]) <= 900
        assert [k for k in redis_server.client().keys("botd:auth:login:user:*")]
        # Another user is not locked out by vera's.
        assert (await other.login("root")).status == 303

        # Every login is in the audit log.
        await asyncio.sleep(0.3)
        actions = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        done = [(a.get("user"), a.get("action")) for a in actions if a.get("platform") == "console"]
        assert ("alice", "login") in done and ("alice", "logout") in done and ("vera", "login_failed") in done


# -- roles -----------------------------------------------------------------------------------------


async def test_a_department_user_reaches_only_its_bots_on_every_endpoint(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url, knowledge=True)
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan", "vera", "root") as (alice, ivan, vera,
                                                                                                  root):
        await wait_for(lambda: _ready(api), timeout=90)
        # Ivan (IT) has a conversation; alice (HR) has one.
        status, events, _ = await ivan.chat("it", "Say hi.", conversation="secret")
        assert status == 200 and events[-1]["done"]
        status, events, _ = await alice.chat("hr", "Say hello.", conversation="mine")
        assert status == 200 and events[-1]["done"]
        it_id = ThreadKey("web", "it", "ivan/secret", "").redis_suffix()
        hr_id = ThreadKey("web", "hr", "alice/mine", "").redis_suffix()
        r = redis_server.client()
        assert r.exists(history_key("it", "ivan/secret")) and r.exists(history_key("hr", "alice/mine"))

        # Alice and the IT bot: 403 everywhere, and nothing changed.
        status, body, _ = await alice.chat("it", "What is the VPN password?")
        assert status == 403, body
        assert (await alice.get("/chat?bot=it"))[0] == 403
        assert (await alice.get("/api/conversations?bot=it"))[0] == 403
        assert (await alice.get("/conversations?bot=it"))[0] == 403
        assert (await alice.get("/api/conversation", params={"id": it_id}))[0] == 403
        status, page = await alice.get("/conversation", params={"id": it_id})
        assert status == 403 and "VPN" not in page and "Say hi" not in page
        assert (await alice.post("/api/conversation/delete", json={"id": it_id}))[0] == 403
        assert (await alice.get("/api/knowledge?bot=it"))[0] == 403
        assert (await alice.post("/api/knowledge/ingest", json={"kb": "it"}))[0] == 403
        assert (await alice.get("/api/audit?bot=it"))[0] == 403
        assert r.exists(history_key("it", "ivan/secret"))
        # An unknown bot is 404, a malformed id 400.
        assert (await alice.chat("ghost", "hi"))[0] == 404
        assert (await alice.get("/api/conversation", params={"id": "nonsense"}))[0] == 400

        # What she sees is hers only: conversations, knowledge, audit lines, status.
        status, body = await alice.get("/api/conversations")
        assert status == 200 and [c["id"] for c in body["conversations"]] == [hr_id]
        status, page = await alice.get("/conversations")
        assert status == 200 and "alice/mine" in page and "ivan/secret" not in page
        status, body = await alice.get("/api/conversation", params={"id": hr_id})
        assert status == 200 and body["messages"][0] == {**body["messages"][0], "role": "user",
                                                         "content": "Say hello."}
        status, body = await alice.get("/api/knowledge")
        assert [kb["name"] for kb in body["knowledge"]] == ["hr"]
        hr_kb = body["knowledge"][0]
        assert hr_kb["documents"] == [{"source": "hr-policy.md", "chunks": 1}] and hr_kb["state"] == "ready"
        status, page = await alice.get("/knowledge")
        assert "hr-policy.md" in page and "it-policy.md" not in page and "Re-ingest" not in page
        await wait_for(lambda: _audit_has(tmp_path, "it"), timeout=10)
        status, body = await alice.get("/api/audit")
        assert body["enabled"] and body["lines"] and {line["bot"] for line in body["lines"]} == {"hr"}
        status, body = await alice.get("/api/status")
        assert set(body["knowledge"]) == {"hr"} and body["recent_errors"] == []

        # Only admins re-ingest; a viewer reads everything and changes nothing.
        assert (await alice.post("/api/knowledge/ingest", json={"kb": "hr"}))[0] == 403
        assert (await vera.chat("hr", "hi"))[0] == 403
        assert (await vera.post("/api/conversation/delete", json={"id": hr_id}))[0] == 403
        status, body = await vera.get("/api/conversations")
        assert {c["bot"] for c in body["conversations"]} == {"hr", "it"}
        status, body = await root.post("/api/knowledge/ingest", json={"kb": "it"})
        assert status == 202 and body["started"]

        async def ingested() -> bool:
            kb = next(k for k in (await root.get("/api/knowledge"))[1]["knowledge"] if k["name"] == "it")
            return bool(kb["last_ingest"]) and kb["state"] != "ingesting"

        await wait_for(ingested, timeout=60)

        # Deleting needs the CSRF token; with it, alice deletes her own conversation.
        status, _ = await alice.post("/api/conversation/delete", csrf=False, json={"id": hr_id})
        assert status == 403 and r.exists(history_key("hr", "alice/mine"))
        status, _ = await alice.post("/api/conversation/delete", csrf=False, data={"id": hr_id, "csrf": alice.csrf})
        assert status == 303 and not r.exists(history_key("hr", "alice/mine"))


async def _ready(api: Client) -> bool:
    return all(s == "ready" for s in api.daemon.runtime.knowledge_state.values()) and \
        len(api.daemon.runtime.knowledge_state) == 2


async def _audit_has(tmp_path: Path, bot: str) -> bool:
    path = tmp_path / "audit.jsonl"
    return path.exists() and any(json.loads(x).get("bot") == bot for x in path.read_text().splitlines())


# -- chat and status ---------------------------------------------------------------------------------


async def test_the_chat_streams_with_timings_and_the_status_has_its_figures(tmp_path, redis_server):
    async with running_daemon(console_config(tmp_path, redis_server.url)) as api, \
            browsers(api, "alice", "root") as (alice, root):
        status, events, times = await alice.chat("hr", "Tell me a short story about a cat.", max_tokens=24)
        assert status == 200
        deltas = [e["delta"] for e in events if "delta" in e]
        final = events[-1]
        # Streamed: several pieces, arriving over time, then one final event.
        assert len(deltas) >= 5 and times[-2] - times[0] > 0.02
        assert final["done"] and final["complete"] and final["finish"] in ("stop", "length")
        d = final["details"]
        for key in ("queue_wait_ms", "ttft_ms", "tokens_per_s", "prompt_tokens", "prompt_tokens_reused",
                    "completion_tokens", "sources"):
            assert key in d, key
        assert d["prompt_tokens"] > 5 and 0 < d["completion_tokens"] <= 24
        stored = [json.loads(x) for x in redis_server.client().lrange(history_key("hr", "alice/c1"), 0, -1)]
        assert stored[1]["content"] == "".join(deltas)
        # The next turn of the same thread reuses the prompt read before.
        _, events, _ = await alice.chat("hr", "And another one.", max_tokens=8)
        assert events[-1]["details"]["prompt_tokens_reused"] > 0

        # Bad input is refused before anything is generated.
        for body in ({"bot": "hr", "text": "  "}, {"bot": "hr", "text": "hi", "conversation": "a/b"},
                     {"bot": "hr", "text": "hi", "max_tokens": 10**6}):
            async with alice.http.post(alice.base + "/api/chat", json=body,
                                       headers={"X-CSRF-Token": alice.csrf}) as r:
                assert r.status == 400, body

        async def sampled() -> bool:
            s = (await root.get("/api/status"))[1]
            web = next(c for c in s["connectors"] if c["name"] == "web_console")
            return web["events"] >= 2 and any(p["tokens_per_s"] > 0 for p in s["last_hour"]["series"])

        await wait_for(sampled, timeout=10)
        status, s = await root.get("/api/status")
        assert s["model"]["name"] == "smollm2-135m" and s["model"]["loaded"] is True
        assert s["model"]["file"].endswith(".gguf") and s["model"]["engine"] == "llama_cpp"
        assert set(s["queue"]) >= {"depth", "capacity", "generating", "active_sequences", "slots"}
        assert s["redis"]["status"] == "ok"
        web = next(c for c in s["connectors"] if c["name"] == "web_console")
        assert web["platform"] == "web" and web["last_event"] and web["errors"] == 0
        assert {c["name"] for c in s["connectors"]} >= {"http_api", "web_console"}
        point = s["last_hour"]["series"][-1]
        assert set(point) >= {"t", "tokens_per_s", "cache_hit_ratio", "queue_depth", "active_sequences"}
        status, page = await root.get("/status")
        assert status == 200 and 'id="chart-tps"' in page and "smollm2-135m" in page


async def test_pages_speak_chinese_or_english_and_fit_a_phone(tmp_path, redis_server):
    async with running_daemon(console_config(tmp_path, redis_server.url)) as api, browsers(api, "") as (b,):
        status, page = await b.get("/login", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
        assert status == 200 and "登录 botd 控制台" in page and 'lang="zh-CN"' in page
        assert 'name="viewport" content="width=device-width' in page
        status, page = await b.get("/login?lang=en", headers={"Accept-Language": "zh-CN"})
        assert "Log in to the botd console" in page
        # The switch is remembered.
        status, page = await b.get("/login", headers={"Accept-Language": "zh-CN"})
        assert "Log in to the botd console" in page
        assert (await b.login("alice")).status == 303
        status, page = await b.get("/chat?lang=zh")
        assert "对话" in page and "发送" in page and 'src="/console/static/console.js' in page
        # Assets ship in the package; nothing comes from elsewhere.
        assert "http://" not in page and "https://" not in page
        for name in ("console.js", "console.css", "favicon.svg"):
            async with b.http.get(b.base + "/static/" + name) as r:
                assert r.status == 200 and len(await r.read()) > 100
        assert (await b.get("/static/..%2Fconnector.py"))[0] == 404


# -- JWT bearer tokens on the HTTP API ---------------------------------------------------------------


async def test_a_jwt_bearer_token_uses_only_the_bots_it_names(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("BOTD_TEST_API_KEY", "an-api-key-for-the-tests")
    cfg = console_config(tmp_path, redis_server.url, api={"keys": ["env:BOTD_TEST_API_KEY"]})
    token = Tokens(KEY).issue("alice", API_AUDIENCE, 600, bots=["hr"])
    auth = {"Authorization": f"Bearer {token}"}
    async with running_daemon(cfg) as api:
        def body(**kw: Any) -> dict[str, Any]:
            return {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6, **kw}

        status, data, _ = await api.post("/v1/chat/completions", body(model="hr", conversation_id="t1"),
                                         headers=auth)
        assert status == 200 and data["choices"][0]["message"]["content"]
        # Its conversations are its own, under its user.
        assert redis_server.client().exists(
            "botd:hist:" + ThreadKey("api", "hr", "jwt.alice/t1", "").redis_suffix())
        # No model named: its own bot, not [api] default_bot.
        status, data, _ = await api.post("/v1/chat/completions", body(conversation_id="t2"), headers=auth)
        assert status == 200
        assert redis_server.client().exists(
            "botd:hist:" + ThreadKey("api", "hr", "jwt.alice/t2", "").redis_suffix())
        status, data, _ = await api.post("/v1/chat/completions", body(model="it"), headers=auth)
        assert status == 404 and data["error"]["code"] == "model_not_found"
        status, data, _ = await api.post("/chat", {"query": "hi", "bot": "assistant", "max_tokens": 4}, headers=auth)
        assert status == 404
        status, data = await api.get("/v1/models", headers=auth)
        assert [m["id"] for m in data["data"]] == ["smollm2-135m", "hr"]
        status, data = await api.get("/v1/conversations/t1?bot=it", headers=auth)
        assert status == 404

        # Expired, wrongly signed, or a console login: 401. The API key still works for every bot.
        now = int(time.time())
        expired = jwt.encode({"iss": "botd", "aud": API_AUDIENCE, "sub": "alice", "bots": ["hr"], "jti": "x",
                              "iat": now - 100, "exp": now - 10}, KEY, algorithm="HS256")
        for bad in (expired, Tokens("another-key-" + "x" * 40).issue("alice", API_AUDIENCE, 600, bots=["hr"]),
                    Tokens(KEY).issue("alice", CONSOLE_AUDIENCE, 600)):
            status, _, _ = await api.post("/v1/chat/completions", body(model="hr"),
                                          headers={"Authorization": f"Bearer {bad}"})
            assert status == 401
        status, data = await api.get("/v1/models", headers={"Authorization": "Bearer an-api-key-for-the-tests"})
        assert [m["id"] for m in data["data"]] == ["smollm2-135m", "assistant", "hr", "it"]
