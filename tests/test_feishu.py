"""Feishu / Lark (飞书): botd's frame codec against lark-oapi's generated protobuf class, its
long-connection client, API client and reply targets against the local fake
(tests/fake_feishu.py, written from docs/protocols/feishu.md), lark-oapi's own ws.Client against
the same fake, the callback checks, the connector with a recording service, and the real daemon
and model answering over the long connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from lark_oapi.core.utils.decryptor import AESCipher
from lark_oapi.ws.pb.pbbp2_pb2 import Frame as PbFrame

from connectors.feishu.api import FeishuApi, FeishuApiError
from connectors.feishu.callback import CallbackRefused, encrypt, open_callback, signature
from connectors.feishu.config import FeishuConfig
from connectors.feishu.frame import Frame, FrameError
from connectors.feishu.reply import CardKitReply, PatchReply, TextReply
from connectors.feishu.ws import FeishuLink
from core.kv import KeyValueCache
from core.messages import Account
from tests.fake_feishu import FakeFeishu
from tests.fakes import serve
from tests.helpers import wait_for

SECRET = "feishu-app-secret"


@pytest.fixture(autouse=True)
def feishu_env(monkeypatch):
    monkeypatch.setenv("FEISHU_SECRET", SECRET)


@contextlib.asynccontextmanager
async def fake_server(fake: FakeFeishu) -> AsyncIterator[FakeFeishu]:
    async with serve(fake.app()) as base:
        fake.url = base
        yield fake


def app_cfg(fake: FakeFeishu, **extra: Any) -> FeishuConfig:
    return FeishuConfig(app_id=fake.app_id, app_secret="env:FEISHU_SECRET", api_base=fake.url, **extra)


async def _true(value: Any) -> Any:
    return value


# -- the frame codec --------------------------------------------------------------------------------------


def test_the_codec_matches_lark_oapis_generated_class():
    ours = Frame(seq_id=2**40, log_id=9, service=-3, method=1, headers=[("type", "event"), ("sum", "1")],
                 payload="飞书".encode(), log_id_new="n")
    theirs = PbFrame()
    theirs.ParseFromString(ours.encode())
    assert (theirs.SeqID, theirs.LogID, theirs.service, theirs.method) == (2**40, 9, -3, 1)
    assert [(h.key, h.value) for h in theirs.headers] == ours.headers and theirs.payload == "飞书".encode()
    assert Frame.decode(theirs.SerializeToString()) == ours
    ping = PbFrame()
    ping.SeqID, ping.LogID, ping.service, ping.method = 0, 0, 33, 0
    assert Frame.decode(ping.SerializeToString()) == Frame(service=33, method=0)
    for bad in (b"\x08", b"\x0a\x05ab", ours.encode()[:-2], b"\x08\x01"):
        with pytest.raises(FrameError):
            Frame.decode(bad)


# -- the long connection ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def linked(fake: FakeFeishu, got: list[dict[str, Any]]):
    async def on_event(event: dict[str, Any]) -> None:
        got.append(event)

    link = FeishuLink("assistant", fake.url, fake.app_id, SECRET, on_event)
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(link.session(http, lambda: True))
        await asyncio.wait_for(link.connected.wait(), 5)
        try:
            yield link, task
        finally:
            await link.close()
            await asyncio.gather(task, return_exceptions=True)


async def test_events_are_answered_split_ones_combined_and_pings_take_the_pong_settings():
    fake = FakeFeishu(ping_interval=1)
    got: list[dict[str, Any]] = []
    async with fake_server(fake), linked(fake, got) as (link, task):
        t0 = time.monotonic()
        one = await fake.push(fake.message_event("zhang", "你好"))
        big = await fake.push(fake.message_event("li", "长" * 3000), parts=3)
        await wait_for(lambda: _true(one in fake.answers and big in fake.answers), timeout=5)
        assert time.monotonic() - t0 < 3  # Feishu's limit
        assert [fake.answers[m]["code"] for m in (one, big)] == [200, 200]
        assert "biz_rt" in fake.answers[one]["headers"]
        assert [json.loads(e["event"]["message"]["content"])["text"] for e in got] == ["你好", "长" * 3000]
        await wait_for(lambda: _true(fake.pings >= 2), timeout=5)  # PingInterval 1 s, from the endpoint
        assert link.ping_interval == 1
        await fake.drop_connections()
        await asyncio.wait_for(task, 2)  # the session ends; the connector reconnects
    assert fake.errors == []


def test_lark_oapis_own_client_speaks_with_the_fake(tmp_path):
    """The fake is checked against lark-oapi 1.7.5's ws.Client: it connects, pings, gets an event
    and answers it code 200."""
    script = tmp_path / "sdk.py"
    script.write_text(
        "import sys, lark_oapi as lark\n"
        "def on(data):\n"
        "    m = data.event.message\n"
        "    print('GOT', m.chat_type, m.message_type, data.event.sender.sender_id.open_id, flush=True)\n"
        "h = lark.EventDispatcherHandler.builder('', '').register_p2_im_message_receive_v1(on).build()\n"
        "lark.ws.Client(sys.argv[1], sys.argv[2], event_handler=h, domain=sys.argv[3],\n"
        "               log_level=lark.LogLevel.ERROR).start()\n")

    async def run() -> None:
        fake = FakeFeishu(ping_interval=1)
        async with fake_server(fake):
            proc = await asyncio.create_subprocess_exec(sys.executable, str(script), fake.app_id, SECRET, fake.url,
                                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                await wait_for(lambda: _true(fake.connected() == 1), timeout=30)
                mid = await fake.push(fake.message_event("wang", "hi", chat="oc_group1"), parts=2)
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 10)
                assert line.decode().split() == ["GOT", "group", "text", "ou_wang"]
                await wait_for(lambda: _true(mid in fake.answers and fake.pings >= 1), timeout=5)
                assert fake.answers[mid]["code"] == 200
            finally:
                proc.kill()
                await proc.wait()
        assert fake.errors == []

    asyncio.run(run())


# -- the API client ---------------------------------------------------------------------------------------


async def test_the_tenant_token_is_shared_and_refreshed_once_when_refused(manager):
    fake = FakeFeishu()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        cache = KeyValueCache(manager, "botd")
        one, two = (FeishuApi(app_cfg(fake), SECRET, http, cache) for _ in range(2))
        assert await one.token() == await two.token() and fake.token_requests == 1
        fake.departments["ou_x"] = ["od_1", "od_2"]
        fake.expire_tokens()
        assert await two.departments("ou_x") == ["od_1", "od_2"] and fake.token_requests == 2
        assert await one.departments("ou_x") == ["od_1", "od_2"] and fake.user_lookups == ["ou_x"]
        with pytest.raises(FeishuApiError, match="10014"):
            await FeishuApi(app_cfg(fake), "wrong", http, KeyValueCache(manager, "other")).token()


# -- the reply targets alone --------------------------------------------------------------------------------


async def _target(kind, fake: FakeFeishu, http, manager, **cfg: Any):
    api = FeishuApi(app_cfg(fake, **cfg), SECRET, http, KeyValueCache(manager, "botd"))
    route = {"message_id": "om_user_msg", "open_id": "ou_zhao", "chat_id": "oc_1", "group": False}
    return kind(Account("feishu", "assistant"), api, KeyValueCache(manager, "botd"), route, 0.1)


async def test_a_cardkit_answer_grows_in_updates_obeys_the_rate_limit_and_ends_streaming(manager):
    fake = FakeFeishu()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        target = await _target(CardKitReply, fake, http, manager)
        await target.show("飞书")
        fake.throttle("card_content", 1)
        t0 = time.monotonic()
        await target.show("飞书卡片")
        assert time.monotonic() - t0 >= 0.95  # waited x-ogw-ratelimit-reset (1 s)
        fake.expire_tokens()
        await target.show("飞书卡片流式更新")
        await target.closed("飞书卡片流式更新")
    [card] = fake.cards.values()
    assert card.contents == ["飞书卡片", "飞书卡片流式更新"] and card.streaming is False
    [reply] = fake.replies
    assert reply["reply_to"] == "om_user_msg" and reply["content"] == {"type": "card", "data": {"card_id":
                                                                                               card.card_id}}
    assert len(fake.throttle_hits) == 1 and fake.token_requests == 2 and fake.errors == []


async def test_a_long_cardkit_answer_continues_in_a_second_card(manager):
    fake = FakeFeishu()
    text = "飞书长回答。" * 1500  # 27,000 bytes: past one card
    async with fake_server(fake), aiohttp.ClientSession() as http:
        target = await _target(CardKitReply, fake, http, manager)
        for n in (100, 4000, len(text)):
            await target.show(text[:n])
        await target.closed(text)
    cards = list(fake.cards.values())
    assert len(cards) == 2 and len(fake.replies) == 2 and not any(c.streaming for c in cards)
    assert "".join(c.content for c in cards) == text and fake.errors == []


async def test_patched_card_and_plain_text_replies(manager):
    fake = FakeFeishu()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        patched = await _target(PatchReply, fake, http, manager, reply_in_thread=True)
        fake.throttle("patch", 1)
        await patched.show("one")
        await patched.show("one two")
        await patched.closed("one two")
        plain = await _target(TextReply, fake, http, manager)
        plain.route["message_id"] = "om_other"
        plain.message_id = "om_other"
        await plain.show("just text")
    card, text = fake.replies
    assert card["msg_type"] == "interactive" and card["reply_in_thread"] is True
    assert [p[1]["body"]["elements"][0]["content"] for p in fake.patches] == ["one two"]
    assert text["msg_type"] == "text" and text["content"] == {"text": "just text"} and fake.errors == []


# -- callback mode -------------------------------------------------------------------------------------------


KEY, TOKEN = "test key", "vtoken"


def _signed(event: dict[str, Any], key: str = KEY) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"encrypt": encrypt(json.dumps(event).encode(), key, b"0123456789abcdef")}).encode()
    ts, nonce = str(int(time.time())), "n1"
    return {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": signature(ts, nonce, key, body)}, body


def test_callback_crypto_matches_lark_oapi_and_the_published_vector():
    # The published test vector (lark-oapi's decryptor docs): key "test key".
    assert AESCipher(KEY).decrypt_str("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=") == "hello world"
    ours = encrypt("你好 feishu".encode(), KEY, b"\x01" * 16)
    assert AESCipher(KEY).decrypt_str(ours) == "你好 feishu"
    fake = FakeFeishu()
    headers, body = _signed(fake.message_event("qian", "hello"))
    assert open_callback(headers, body, KEY, TOKEN, 300)["header"]["event_type"] == "im.message.receive_v1"
    # The signature the SDK computes is the one checked.
    assert headers["X-Lark-Signature"] == hashlib.sha256(
        (headers["X-Lark-Request-Timestamp"] + "n1" + KEY).encode() + body).hexdigest()


def test_a_wrong_signature_is_refused_before_anything_is_decrypted():
    fake = FakeFeishu()
    headers, body = _signed(fake.message_event("qian", "hello"))
    forged = dict(headers, **{"X-Lark-Signature": "0" * 64})
    with pytest.raises(CallbackRefused, match="wrong signature"):
        open_callback(forged, body, KEY, TOKEN, 300)
    # Garbage that would fail to decrypt fails on the signature first: nothing was decrypted.
    junk = json.dumps({"encrypt": base64.b64encode(b"x" * 40).decode()}).encode()
    with pytest.raises(CallbackRefused, match="wrong signature"):
        open_callback(headers, junk, KEY, TOKEN, 300)
    old = dict(headers, **{"X-Lark-Request-Timestamp": str(int(time.time()) - 3600)})
    with pytest.raises(CallbackRefused, match="window"):
        open_callback(old, body, KEY, TOKEN, 300)
    with pytest.raises(CallbackRefused, match="verification token"):
        open_callback(headers, body, KEY, "another-token", 300)
    # Unsigned: only the URL check is answered.
    check = json.dumps({"encrypt": encrypt(json.dumps({"challenge": "c1", "token": TOKEN, "type":
                                                       "url_verification"}).encode(), KEY, b"2" * 16)}).encode()
    assert open_callback({}, check, KEY, TOKEN, 300)["challenge"] == "c1"
    with pytest.raises(CallbackRefused, match="unsigned"):
        open_callback({}, body, KEY, TOKEN, 300)
