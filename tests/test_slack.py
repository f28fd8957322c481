"""Slack with slack-bolt and slack-sdk for real, against a fake Web API (and Socket Mode
WebSocket) on 127.0.0.1, the real daemon and model; events signed with slack-sdk's code."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time

import pytest
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from connectors.slack.connector import markdown_to_mrkdwn
from core.messages import ThreadKey
from tests.fakes import FakeSlack, serve
from tests.helpers import busy_model, make_config, running_daemon, wait_for

SIGNING = "test-signing-secret-0123456789"
_seq = itertools.count(1)


@pytest.fixture(autouse=True)
def slack_env(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING)
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-test-token")


def slack_config(tmp_path, redis_url, api_base, mode="http", **extra):
    section = {"bot_token": "env:SLACK_BOT_TOKEN", "mode": mode, "api_base": api_base + "/api/",
               "update_interval_s": 0.5, **extra}
    if mode == "http":
        section["signing_secret"] = "env:SLACK_SIGNING_SECRET"
    else:
        section["app_token"] = "env:SLACK_APP_TOKEN"
    return make_config(tmp_path, redis_url, slack={"assistant": section}, model={"max_tokens": 40})


def new_ts() -> str:
    return f"{1700000000 + next(_seq)}.000100"


def event(kind: str, text: str, *, channel="C1", user="U123", ts=None, thread_ts=None, event_id=None, **more):
    ev = {"type": kind, "user": user, "text": text, "ts": ts or new_ts(), "channel": channel, **more}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return {"token": "x", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
            "event_id": event_id or f"Ev{next(_seq)}", "event_time": int(time.time()), "event": ev}


async def post_event(api, payload, *, secret=SIGNING, ts=None, headers=None, raw=None, content_type=None):
    body = raw if raw is not None else json.dumps(payload)
    stamp = str(int(ts if ts is not None else time.time()))
    sig = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    h = {"Content-Type": content_type or "application/json", "X-Slack-Request-Timestamp": stamp,
         "X-Slack-Signature": sig, **(headers or {})}
    h = {k: v for k, v in h.items() if v is not None}
    t0 = time.monotonic()
    async with api.session.post(f"{api.base}/slack/events", data=body.encode(), headers=h) as r:
        return r.status, await r.text(), time.monotonic() - t0


def history(redis_server, channel, thread):
    key = "botd:hist:" + ThreadKey("slack", "assistant", channel, thread).redis_suffix()
    return [json.loads(x) for x in redis_server.client().lrange(key, 0, -1)]


async def until(pred, timeout=60):
    async def check() -> bool:
        return pred()
    await wait_for(check, timeout=timeout)


def test_official_signing_vector():
    class Clock:
        def now(self) -> float:
            return 1531420618

    body = ("token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
            "&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
            "&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
            "&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c")
    verifier = SignatureVerifier("8f742231b10e8888abcd99yyyzzz85a5", clock=Clock())
    expected = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    assert verifier.generate_signature(timestamp="1531420618", body=body) == expected
    assert verifier.is_valid(body, "1531420618", expected)
    assert not verifier.is_valid(body + "x", "1531420618", expected)


async def test_mention_dm_follow_up_and_separate_threads(tmp_path, redis_server):
    fake = FakeSlack()
    async with serve(fake.app()) as base, running_daemon(slack_config(tmp_path, redis_server.url, base)) as api:
        status, text, _ = await post_event(api, {"type": "url_verification", "challenge": "chal-123", "token": "x"})
        assert status == 200 and "chal-123" in text
        root = new_ts()
        status, _, _ = await post_event(api, event("app_mention", "<@UBOT> What is the sea?", ts=root))
        assert status == 200
        await until(lambda: len(history(redis_server, "C1", root)) == 2)
        answer = history(redis_server, "C1", root)[1]["content"]
        # the last update (which keeps the interval too) shows the whole answer
        await until(lambda: fake.of("chat.update") and fake.of("chat.update")[-1]["text"] == markdown_to_mrkdwn(answer),
                    timeout=5)
        posts = fake.of("chat.postMessage")
        assert len(posts) == 1 and posts[0]["thread_ts"] == root and posts[0]["channel"] == "C1"
        assert "<@UBOT>" not in history(redis_server, "C1", root)[0]["content"]
        # a follow-up in the same thread, no mention: answered with the first exchange in its history
        await post_event(api, event("message", "And what about rivers?", ts=new_ts(), thread_ts=root,
                                    channel_type="channel"))
        await until(lambda: len(history(redis_server, "C1", root)) == 4)
        assert history(redis_server, "C1", root)[0]["content"] == "What is the sea?"
        # a second thread in the same channel keeps its own history
        root2 = new_ts()
        await post_event(api, event("app_mention", "<@UBOT> Tell me about clouds.", ts=root2))
        await until(lambda: len(history(redis_server, "C1", root2)) == 2)
        assert len(history(redis_server, "C1", root)) == 4
        # a plain channel message (not in a followed thread, no mention) gets nothing
        n = len(fake.of("chat.postMessage"))
        await post_event(api, event("message", "chatting", ts=new_ts(), channel_type="channel"))
        # a DM: every message is answered
        await post_event(api, event("message", "Hello in private", channel="D9", channel_type="im"))
        await until(lambda: len(history(redis_server, "D9", "")) == 2)
        await asyncio.sleep(0.5)
        dm_posts = [p for p in fake.of("chat.postMessage")[n:]]
        assert len(dm_posts) == 1 and dm_posts[0]["channel"] == "D9" and "thread_ts" not in dm_posts[0]


async def test_ack_is_fast_while_the_model_is_busy(tmp_path, redis_server):
    fake = FakeSlack()
    async with serve(fake.app()) as base, running_daemon(slack_config(tmp_path, redis_server.url, base)) as api:
        async with busy_model(api):
            status, _, elapsed = await post_event(api, event("app_mention", "<@UBOT> hi"))
            assert status == 200
            assert elapsed < 3.0
            print(f"slack ack in {elapsed * 1000:.1f} ms with {len(api.daemon.runtime.queue)} jobs queued")


async def test_bad_signatures_malformed_bodies_retries_and_loops(tmp_path, redis_server):
    fake = FakeSlack()
    async with serve(fake.app()) as base, running_daemon(slack_config(tmp_path, redis_server.url, base)) as api:
        before = len(fake.calls)
        payload = event("app_mention", "<@UBOT> hi")
        assert (await post_event(api, payload, secret="wrong-secret"))[0] == 401
        assert (await post_event(api, payload, headers={"X-Slack-Signature": None}))[0] == 401
        assert (await post_event(api, payload, ts=time.time() - 360))[0] == 401  # 6 minutes old
        assert (await post_event(api, None, raw="{not json"))[0] == 400
        assert (await post_event(api, None, raw="[1, 2]"))[0] == 400
        await asyncio.sleep(0.5)
        assert len(fake.calls) == before  # no Web API call for any of them
        # the same event delivered again as Slack's retries 1 and 2: one answer
        payload = event("app_mention", "<@UBOT> Hello there")
        root = payload["event"]["ts"]
        for retry in (None, "1", "2"):
            h = {"X-Slack-Retry-Num": retry, "X-Slack-Retry-Reason": "http_timeout"} if retry else None
            assert (await post_event(api, payload, headers=h))[0] == 200
        # the same message as a message.channels event (another event_id, same channel + ts)
        twin = event("message", payload["event"]["text"], ts=root, channel_type="channel")
        assert (await post_event(api, twin))[0] == 200
        await until(lambda: len(history(redis_server, "C1", root)) == 2)
        await asyncio.sleep(1.0)
        assert len(fake.of("chat.postMessage")) == 1
        # the bot's own message and another bot's message get nothing
        n = len(fake.calls)
        await post_event(api, event("message", "my own answer", user="UBOT", channel="D9", channel_type="im"))
        await post_event(api, event("message", "beep", channel="D9", channel_type="im", bot_id="B777"))
        await post_event(api, event("message", "bot msg", channel="D9", channel_type="im", subtype="bot_message"))
        await asyncio.sleep(1.0)
        assert [m for m, _, _ in fake.calls[n:] if m.startswith("chat.")] == []


async def test_rate_limited_update_waits_for_retry_after(tmp_path, redis_server):
    fake = FakeSlack()
    fake.fail_next["chat.update"] = [(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "2"})]
    async with serve(fake.app()) as base:
        cfg = slack_config(tmp_path, redis_server.url, base)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_tokens": 200})})
        async with running_daemon(cfg) as api:
            root = new_ts()
            await post_event(api, event("app_mention", "<@UBOT> Write a long story about ships.", ts=root))
            await until(lambda: len(history(redis_server, "C1", root)) == 2)
            answer = markdown_to_mrkdwn(history(redis_server, "C1", root)[1]["content"])
            await until(lambda: fake.of("chat.update")[-1]["text"] == answer, timeout=5)
    updates = [t for m, _, t in fake.calls if m == "chat.update"]
    assert len(updates) >= 2
    assert updates[1] - updates[0] >= 1.95


async def test_a_timed_out_post_is_never_posted_again(tmp_path, redis_server):
    fake = FakeSlack()
    fake.delay_next["chat.postMessage"] = 2.5  # longer than the client's timeout
    async with serve(fake.app()) as base:
        cfg = slack_config(tmp_path, redis_server.url, base, api_timeout_s=1)
        async with running_daemon(cfg) as api:
            await post_event(api, event("app_mention", "<@UBOT> hello"))
            await until(lambda: len(fake.of("chat.postMessage")) >= 1)
            await asyncio.sleep(4)
            assert len(fake.of("chat.postMessage")) == 1  # Slack may have it: no second post
            assert not api.daemon.runtime.worker.busy  # and the generation was stopped


async def test_slash_command_answers_ephemerally_and_resets_the_dm(tmp_path, redis_server):
    fake = FakeSlack()
    async with serve(fake.app()) as base, running_daemon(slack_config(tmp_path, redis_server.url, base)) as api:
        await post_event(api, event("message", "Remember: blue.", channel="D5", channel_type="im"))
        await until(lambda: len(history(redis_server, "D5", "")) == 2)
        form = "command=%2Fassistant&text=reset&channel_id=D5&user_id=U123&team_id=T1&response_url=x&trigger_id=t"
        status, text, _ = await post_event(api, None, raw=form, content_type="application/x-www-form-urlencoded")
        assert status == 200
        body = json.loads(text)
        assert body["response_type"] == "ephemeral" and "forgotten" in body["text"]
        assert history(redis_server, "D5", "") == []
        form = form.replace("text=reset", "text=help")
        status, text, _ = await post_event(api, None, raw=form, content_type="application/x-www-form-urlencoded")
        assert json.loads(text)["response_type"] == "ephemeral"


async def test_socket_mode(tmp_path, redis_server):
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        fake.base = base
        async with running_daemon(slack_config(tmp_path, redis_server.url, base, mode="socket")):
            await asyncio.wait_for(fake.ws_ready.wait(), 10)
            root = new_ts()
            envelope = {"type": "events_api", "envelope_id": "env-1", "accepts_response_payload": False,
                        "retry_attempt": 0, "retry_reason": "",
                        "payload": event("app_mention", "<@UBOT> Hello from socket mode", ts=root)}
            await fake.send_envelope(envelope)
            await until(lambda: "env-1" in fake.acks, timeout=10)
            await until(lambda: len(history(redis_server, "C1", root)) == 2)
            assert fake.of("chat.postMessage")[0]["thread_ts"] == root
            assert fake.of("apps.connections.open")


def test_mrkdwn_conversion():
    md = ("# Result\n**Bold** and *italic* and ~~old~~ with `x < y`\n"
          "- first item\n- see [the docs](https://example.com/a?b=1&c=2)\n"
          "```python\nif a < b and c > d:\n    pass\n```\nTom & Jerry <3")
    assert markdown_to_mrkdwn(md) == (
        "*Result*\n*Bold* and _italic_ and ~old~ with `x &lt; y`\n"
        "• first item\n• see <https://example.com/a?b=1&c=2|the docs>\n"
        "```if a &lt; b and c &gt; d:\n    pass```\nTom &amp; Jerry &lt;3")


# The link attack: a URL (and a label) that closes Slack's <url|label> syntax and opens a
# channel-wide mention. It comes from a tool's output shown by /tool (an API the model does not
# control); the model's own output takes the same path (markdown_to_mrkdwn in post and edit).
EVIL = ("See [d](https://x.io><!channel>) and [a <!here> label|x](https://y.io/a|b) "
        "and [ok](https://z.io/p?q=1&r=2) <!everyone>")


def _links_are_whole(text: str) -> None:
    assert "<!channel>" not in text and "<!here>" not in text and "<!everyone>" not in text, text
    assert text.count("<") == text.count(">"), text
    for inner in re.findall(r"<([^>]*)>", text):
        url, sep, label = inner.partition("|")
        assert sep and re.fullmatch(r"https?://[^\s<>|]+", url) and "<" not in label and "|" not in label, inner


async def test_a_link_in_tool_output_cannot_ping_the_channel(tmp_path, redis_server):
    async def evil(request):
        return web.Response(text=EVIL)

    tool_api = web.Application()
    tool_api.router.add_get("/api/evil", evil)
    fake = FakeSlack()
    async with serve(fake.app()) as base, serve(tool_api) as tool_base:
        section = {"bot_token": "env:SLACK_BOT_TOKEN", "mode": "http", "api_base": base + "/api/",
                   "update_interval_s": 0.5, "signing_secret": "env:SLACK_SIGNING_SECRET"}
        cfg = make_config(tmp_path, redis_server.url, slack={"assistant": section},
                          tools={"evil": {"type": "http", "base_url": f"{tool_base}/api", "path": "/evil",
                                          "description": "A tool whose API answers hostile text"}},
                          bots={"assistant": {"tools": ["evil"]}})
        async with running_daemon(cfg) as api:
            await post_event(api, event("message", "/tool evil", channel="D7", channel_type="im"))
            await until(lambda: any("x.io" in p["text"] for p in fake.of("chat.postMessage") + fake.of("chat.update")),
                        timeout=30)
            await asyncio.sleep(0.5)
    bodies = [p["text"] for p in fake.of("chat.postMessage") + fake.of("chat.update")]
    for text in bodies:
        _links_are_whole(text)
    final = bodies[-1]
    assert "<https://x.io%3E%3C!channel%3E|d>" in final and "<https://z.io/p?q=1&r=2|ok>" in final, final


def test_mrkdwn_links_cannot_break_out():
    out = markdown_to_mrkdwn(EVIL)
    _links_are_whole(out)
    assert "&lt;!everyone&gt;" in out
