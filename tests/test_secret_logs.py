"""No secret value reaches the log, at debug level, through botd's lines or any library's.

The masking is checked on its own (fields, nested values, tracebacks, other libraries'
lines); then each connector runs in the real daemon against its fake platform API, with
a password-protected Redis and API keys, and answers one message while the whole log is
captured. Every secret holds the marker ``SECRET``, so that a partial leak shows too.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from connectors.wecom import WeComCrypto
from core.secrets import resolve_secret
from tests.fake_dingtalk import FakeDingtalk
from tests.fake_feishu import FakeFeishu
from tests.fake_wecom_aibot import FakeAibot
from tests.fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from tests.helpers import RedisServer, captured, make_config, running_daemon, wait_for

MARK = "SECRET"
ENV = {
    "BOTD_T_REDIS_PW": "redis-SECRET-password-01",
    "BOTD_T_API_KEY": "sk-SECRET-api-key-0123456789",
    "BOTD_T_TG": "123456:SECRETtgTOKENabc",
    "BOTD_T_TG_HOOK": "tg-hook-SECRET_42",
    "BOTD_T_SLACK_BOT": "xoxb-SECRET-slack-bot-token",
    "BOTD_T_SLACK_OTHER_BOT": "xoxb-SECRET-slack-socket-bot",
    "BOTD_T_SLACK_SIGNING": "slack-signing-SECRET-0123",
    "BOTD_T_SLACK_APP": "xapp-SECRET-slack-app-token",
    "BOTD_T_WECOM_TOKEN": "wecom-callback-SECRET-token",
    "BOTD_T_WECOM_AES": "SECRETwecomAESkey0123456789abcdefghijklmnop",  # 43 characters of base64
    "BOTD_T_WECOM_CORP": "wecom-corp-SECRET-value",
    "BOTD_T_CONSOLE_KEY": "console-signing-SECRET-key-0123456789abcdef",
    "BOTD_T_AIBOT": "aibot-SECRET-long-connection-secret",
    "BOTD_T_DINGTALK": "dingtalk-SECRET-client-secret",
    "BOTD_T_FEISHU": "feishu-SECRET-app-secret",
}
CORP = "ww0000000000test"


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)



@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """The whole log at debug level, as JSON lines."""
    with captured("debug", "json") as stream:
        yield stream


def assert_no_secret(text: str) -> None:
    assert text.strip(), "nothing was logged"
    leaks = [line for line in text.splitlines() if MARK in line]
    assert not leaks, "\n".join(leaks[:5])


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def answered_on(log: io.StringIO, platform: str) -> None:
    async def done() -> bool:
        return any(e["event"] == "answered" and e.get("platform") == platform for e in events(log.getvalue()))

    await wait_for(done, timeout=60)


# -- the masking itself --------------------------------------------------------------------

def test_known_values_are_masked_everywhere(log: io.StringIO) -> None:
    token = resolve_secret("env:BOTD_T_TG")
    key = resolve_secret("env:BOTD_T_API_KEY")
    botd = structlog.get_logger("botd.test")

    class Request:
        def __repr__(self) -> str:
            return f"<Request https://api.telegram.org/bot{token}/getMe>"

    botd.debug("calling the api", url=f"https://api.telegram.org/bot{token}/getMe", request=Request(),
               nested={"headers": [f"X-Key {key}"], key: "as a key"}, quoted=f"k={token.replace(':', '%3A')}",
               tokens_in=12)
    try:
        raise RuntimeError(f"request to /bot{token}/sendMessage failed")
    except RuntimeError:
        botd.exception("answer failed")
    # another library's lines, through the standard library
    lib = logging.getLogger("somelib")
    lib.warning("GET https://api.telegram.org/bot%s/getUpdates failed", token)
    try:
        raise ValueError(f"bad key {key}")
    except ValueError:
        lib.error("somelib request failed", exc_info=True)
    text = log.getvalue()
    assert_no_secret(text)
    lines = {e["event"]: e for e in events(text)}
    assert lines["calling the api"]["url"] == "https://api.telegram.org/bot***/getMe"
    assert lines["calling the api"]["tokens_in"] == 12
    assert lines["calling the api"]["nested"] == {"headers": ["X-Key ***"], "***": "as a key"}
    assert "failed" in lines["answer failed"]["exception"] and "RuntimeError" in lines["answer failed"]["exception"]
    assert lines["GET https://api.telegram.org/bot***/getUpdates failed"]["level"] == "warning"
    assert "ValueError: bad key ***" in lines["somelib request failed"]["exception"]


def test_console_tracebacks_are_masked_too() -> None:
    token = resolve_secret("env:BOTD_T_TG")
    with captured("info", "console") as stream:
        try:
            raise RuntimeError(f"request to /bot{token}/sendMessage failed")
        except RuntimeError:
            structlog.get_logger("botd.test").exception("answer failed")
    assert "answer failed" in stream.getvalue() and "RuntimeError" in stream.getvalue()
    assert_no_secret(stream.getvalue())


def test_libraries_that_print_urls_stay_quiet_at_debug(log: io.StringIO) -> None:
    structlog.get_logger("botd.test").debug("botd's own debug line")
    for name in ("httpx", "httpcore.http11", "telegram.ext.ExtBot", "slack_sdk.web.async_base_client",
                 "slack_bolt.AsyncApp", "aiohttp.client"):
        logging.getLogger(name).info("HTTP Request: POST https://api.example/bot12345/sendMessage")
        logging.getLogger(name).debug("HTTP Request: POST https://api.example/bot12345/sendMessage")
    logging.getLogger("httpx").warning("a warning still shows")
    text = log.getvalue()
    assert "botd's own debug line" in text and "a warning still shows" in text
    assert "HTTP Request" not in text


# -- each connector in the real daemon --------------------------------------------------------

@pytest.fixture
def locked_redis(tmp_path) -> Iterator[RedisServer]:
    # The daemon authenticates with redis.password.
    server = RedisServer(tmp_path, password=ENV["BOTD_T_REDIS_PW"])
    server.start()
    yield server
    server.stop()


def config(tmp_path, redis_url: str, **sections: Any):
    return make_config(tmp_path, redis_url, redis={"password": "env:BOTD_T_REDIS_PW"},
                       api={"keys": ["env:BOTD_T_API_KEY"]}, model={"max_tokens": 4}, **sections)


async def test_http_api(tmp_path, locked_redis, log) -> None:
    async with running_daemon(config(tmp_path, locked_redis.url)) as api:
        status, data, _ = await api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                         headers={"Authorization": f"Bearer {ENV['BOTD_T_API_KEY']}"})
        assert status == 200, data
        status, _, _ = await api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                      headers={"Authorization": "Bearer sk-wrong-guess"})
        assert status == 401
        await answered_on(log, "api")
    assert_no_secret(log.getvalue())


async def test_telegram(tmp_path, locked_redis, log) -> None:
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = config(tmp_path, locked_redis.url, telegram={"assistant": {
            "token": "env:BOTD_T_TG", "mode": "webhook", "webhook_secret": "env:BOTD_T_TG_HOOK",
            "api_base": base + "/bot", "edit_interval_private_s": 0.5}})
        async with running_daemon(cfg) as api:
            update = {"update_id": 501, "message": {
                "message_id": 501, "date": int(time.time()), "text": "Hello",
                "chat": {"id": 4242, "type": "private", "first_name": "Ada"},
                "from": {"id": 4242, "is_bot": False, "first_name": "Ada"}}}
            async with api.session.post(f"{api.base}/telegram/assistant", json=update,
                                        headers={"X-Telegram-Bot-Api-Secret-Token": ENV["BOTD_T_TG_HOOK"]}) as r:
                assert r.status == 200
            await answered_on(log, "telegram")
            assert fake.of("sendMessage")
    assert_no_secret(log.getvalue())


async def test_slack(tmp_path, locked_redis, log) -> None:
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        fake.base = base
        http_app = {"bot_token": "env:BOTD_T_SLACK_BOT", "mode": "http", "signing_secret": "env:BOTD_T_SLACK_SIGNING",
                    "api_base": base + "/api/", "update_interval_s": 0.5}
        socket_app = {"bot_token": "env:BOTD_T_SLACK_OTHER_BOT", "mode": "socket", "app_token": "env:BOTD_T_SLACK_APP",
                      "api_base": base + "/api/"}
        cfg = config(tmp_path, locked_redis.url, bots={"assistant": {}, "helper": {}},
                     slack={"assistant": http_app, "helper": socket_app})
        async with running_daemon(cfg) as api:
            await asyncio.wait_for(fake.ws_ready.wait(), 30)  # the Socket Mode app connected with its app token
            body = json.dumps({"token": "x", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
                               "event_id": "Ev1", "event_time": int(time.time()),
                               "event": {"type": "app_mention", "user": "U123", "text": "<@UBOT> hi",
                                         "ts": "1700000001.000100", "channel": "C1"}})
            stamp = str(int(time.time()))
            signature = SignatureVerifier(ENV["BOTD_T_SLACK_SIGNING"]).generate_signature(timestamp=stamp, body=body)
            headers = {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp,
                       "X-Slack-Signature": signature}
            async with api.session.post(f"{api.base}/slack/events", data=body.encode(), headers=headers) as r:
                assert r.status == 200
            await answered_on(log, "slack")
            assert fake.of("chat.postMessage")
    assert_no_secret(log.getvalue())


class SecretWeCom(FakeWeCom):
    """FakeWeCom that wants this test's corp secret and hands out access tokens with the marker."""

    async def gettoken(self, request: web.Request) -> web.Response:
        self.calls.append(("gettoken", dict(request.query)))
        if request.query.get("corpsecret") != ENV["BOTD_T_WECOM_CORP"]:
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        self.tokens_issued += 1
        token = f"wecom-access-{MARK}-{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200})


async def test_wecom(tmp_path, locked_redis, log) -> None:
    fake = SecretWeCom()
    async with serve(fake.app()) as base:
        cfg = config(tmp_path, locked_redis.url, wecom={"assistant": {
            "corp_id": CORP, "agent_id": 1000002, "token": "env:BOTD_T_WECOM_TOKEN",
            "encoding_aes_key": "env:BOTD_T_WECOM_AES", "secret": "env:BOTD_T_WECOM_CORP", "api_base": base}})
        async with running_daemon(cfg) as api:
            crypto = WeComCrypto(ENV["BOTD_T_WECOM_TOKEN"], ENV["BOTD_T_WECOM_AES"], CORP)
            encrypt = crypto.encrypt(
                f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>"
                f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
                "<Content><![CDATA[hello]]></Content><MsgId>7001</MsgId><AgentID>1000002</AgentID></xml>")
            ts, nonce = str(int(time.time())), "n0nce"
            url = (f"{api.base}/wecom/assistant?msg_signature={crypto.signature(ts, nonce, encrypt)}"
                   f"&timestamp={ts}&nonce={nonce}")
            envelope = (f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><AgentID><![CDATA[1000002]]></AgentID>"
                        f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
            async with api.session.post(url, data=envelope.encode()) as r:
                assert r.status == 200
            await answered_on(log, "wecom")

            async def sent() -> bool:
                return bool(fake.sent)

            await wait_for(sent, timeout=30)
            assert fake.tokens_issued >= 1
    assert_no_secret(log.getvalue())


async def test_web_console(tmp_path, locked_redis, log) -> None:
    """Its signing key, a user's password (right and wrong) and the login's JWT never reach the log."""
    import aiohttp

    from core.auth import hash_password
    from tests.test_console import Browser

    password = "console-SECRET-password-1"
    cfg = config(tmp_path, locked_redis.url, console={
        "enabled": True, "signing_key": "env:BOTD_T_CONSOLE_KEY",
        "users": {"root": {"password_hash": hash_password(password), "role": "admin"}}})
    # unsafe: the jar keeps cookies of an IP address (127.0.0.1)
    async with running_daemon(cfg) as api, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
            assert (await Browser(api, other).login("root", "wrong-SECRET-guess")).status != 303
        browser = Browser(api, session)
        assert (await browser.login("root", password)).status == 303
        status, _, _ = await browser.chat("assistant", "hi", max_tokens=4)
        assert status == 200
        jwts = [c.value for c in session.cookie_jar if c.value.count(".") == 2]
        assert jwts  # the login's token, in its cookie
        assert (await browser.post("/logout"))[0] in (200, 303)
        await answered_on(log, "web")
    text = log.getvalue()
    assert_no_secret(text)
    assert not any(j in text for j in jwts)


async def test_wecom_ai_bot(tmp_path, locked_redis, log) -> None:
    fake = FakeAibot(secret=ENV["BOTD_T_AIBOT"])
    async with serve(fake.app()) as base:
        fake.url = base
        cfg = config(tmp_path, locked_redis.url, wecom_aibot={"assistant": {
            "mode": "websocket", "bot_id": fake.bot_id, "secret": "env:BOTD_T_AIBOT", "ws_url": fake.ws_url}})
        async with running_daemon(cfg):
            async def subscribed() -> bool:
                return fake.connected()

            await wait_for(subscribed, timeout=30)
            await fake.send_message("zhangsan", "hello")
            await answered_on(log, "wecom_aibot")

            async def shown() -> bool:
                return fake.answers("zhangsan") >= 1

            await wait_for(shown, timeout=30)
    assert_no_secret(log.getvalue())


async def test_dingtalk(tmp_path, locked_redis, log) -> None:
    # The fake's access tokens, stream tickets and sessionWebhooks carry the marker too.
    fake = FakeDingtalk(secret=ENV["BOTD_T_DINGTALK"], marker=MARK)
    async with serve(fake.app()) as base:
        fake.url = base
        cfg = config(tmp_path, locked_redis.url, dingtalk={"assistant": {
            "client_id": fake.client_id, "client_secret": "env:BOTD_T_DINGTALK", "api_base": base,
            "oapi_base": base}})
        async with running_daemon(cfg):
            await wait_for(lambda: _connected(fake), timeout=30)
            await fake.push(fake.robot_message("zhangsan", "hello"))  # answered through its sessionWebhook
            await answered_on(log, "dingtalk")
            await wait_for(lambda: _value(len(fake.webhook_posts) == 1), timeout=30)
            await fake.push(fake.robot_message("lisi", "hello", webhook_life_s=0))  # expired: the OpenAPI send
            await wait_for(lambda: _value(len(fake.sends) == 1), timeout=30)
    assert_no_secret(log.getvalue())


async def test_feishu(tmp_path, locked_redis, log) -> None:
    fake = FakeFeishu(secret=ENV["BOTD_T_FEISHU"], marker=MARK)
    async with serve(fake.app()) as base:
        fake.url = base
        cfg = config(tmp_path, locked_redis.url, feishu={"assistant": {
            "app_id": fake.app_id, "app_secret": "env:BOTD_T_FEISHU", "api_base": base}})
        async with running_daemon(cfg):
            await wait_for(lambda: _connected(fake), timeout=30)
            await fake.push(fake.message_event("zhangsan", "hello"))
            await answered_on(log, "feishu")
            await wait_for(lambda: _value(any(not c.streaming for c in fake.cards.values())), timeout=30)
    assert_no_secret(log.getvalue())


async def _connected(fake: Any) -> bool:
    return fake.connected() == 1


async def _value(v: bool) -> bool:
    return v
