"""Feishu / Lark (飞书): botd's frame codec against lark-oapi's generated protobuf class, its
long-connection client, API client and reply targets against the local fake
(tests/fake_feishu.py, written from docs/protocols/feishu.md), lark-oapi's own ws.Client against
the same fake, the callback checks, the connector with a recording service, and the real daemon
and model answering over the long connection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import time
from functools import partial
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
from tests import platform_cluster as cluster
from tests.fake_feishu import FakeFeishu
from tests.helpers import Recorder, captured, running_daemon, wait_for
from tests.platform_cluster import fake_server
from tests.platform_cluster import now as _true

SECRET = "feishu-app-secret"
NOT_TEXT_EN = "Sorry, I read text only. Please send your question as text."


feishu_env = cluster.secret_in_env("FEISHU_SECRET", SECRET)


def app_cfg(fake: FakeFeishu, **extra: Any) -> FeishuConfig:
    return FeishuConfig(app_id=fake.app_id, app_secret="env:FEISHU_SECRET", api_base=fake.url, **extra)


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


async def test_events_are_answered_split_ones_combined_and_pings_take_the_pong_settings():
    fake = FakeFeishu(ping_interval=1)
    async with fake_server(fake), cluster.linked(
            lambda on: FeishuLink("assistant", fake.url, fake.app_id, SECRET, on)) as (link, task, got):
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
        async with fake_server(fake), cluster.sdk_process(script, fake.app_id, SECRET, fake.url) as stdout:
            await wait_for(lambda: _true(fake.connected() == 1), timeout=30)
            mid = await fake.push(fake.message_event("wang", "hi", chat="oc_group1"), parts=2)
            assert await cluster.printed(stdout) == ["GOT", "group", "text", "ou_wang"]
            await wait_for(lambda: _true(mid in fake.answers and fake.pings >= 1), timeout=5)
            assert fake.answers[mid]["code"] == 200
        assert fake.errors == []

    asyncio.run(run())


# -- the API client ---------------------------------------------------------------------------------------


async def test_the_tenant_token_is_shared_and_refreshed_once_when_refused(manager):
    fake = FakeFeishu()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        cache = KeyValueCache(manager, "botd")
        one, two = (FeishuApi(app_cfg(fake), SECRET, http, cache) for _ in range(2))
        assert await one.token() == await two.token() and fake.token_requests == 1
        # Shared through Redis, and dropped 600 s before Feishu's expire (7,200 s): refreshed before expiry.
        ttl = await manager.client.ttl(f"botd:cache:feishu:token:{fake.url}:{fake.app_id}")
        assert 6550 <= ttl <= 6600
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


# -- the connector in a cluster (a recording service, no model) ---------------------------------------------


def app_keys(fake: FakeFeishu, **extra: Any) -> dict[str, Any]:
    return {"app_id": fake.app_id, "app_secret": "env:FEISHU_SECRET", "api_base": fake.url, **extra}


def feishu_config(tmp_path, redis_url: str, fake: FakeFeishu, instance: str = "", max_tokens: int = 24,
                  **extra: Any):
    return cluster.connector_config(tmp_path, redis_url, "feishu", app_keys(fake, **extra), instance, max_tokens)


def connector(cfg, manager, service=None):
    from connectors.feishu.connector import FeishuConnector

    return cluster.connector(FeishuConnector, cfg, manager, service)


async def test_one_of_three_daemons_holds_the_connection_and_reconnects_after_a_drop(tmp_path, redis_server,
                                                                                        manager):
    fake = FakeFeishu()
    async with fake_server(fake), cluster.three_connectors(
            connector, partial(feishu_config, tmp_path, redis_server.url, fake), manager, fake) as (c1, one, two):
        assert fake.connected() == 1 and fake.endpoints == 1  # exactly one of three holds the connection
        await fake.drop_connections()
        await wait_for(lambda: _true(fake.connected() == 1 and fake.endpoints == 2), timeout=10)
        mid = await fake.push(fake.message_event("a", "hi"))
        await wait_for(lambda: _true(mid in fake.answers and len(one.got) == 1), timeout=5)
        assert two.got == []
        await cluster.lease_taken_then_freed(redis_server, "botd:lease:feishu:ws:" + fake.app_id, fake,
                                             lambda: c1.apps["assistant"].displaced)
    assert fake.errors == []


async def test_events_become_inbound_messages(tmp_path, redis_server, manager):
    fake = FakeFeishu()
    async with fake_server(fake):
        rec = Recorder()
        async with connector(feishu_config(tmp_path, redis_server.url, fake, group_history="member"), manager, rec):
            await wait_for(lambda: _true(fake.connected() == 1), timeout=10)
            # u4's sticker, not a picture: pictures are attachments now.
            await cluster.push_each(fake, [fake.message_event("u1", "一对一"),
                                           fake.message_event("u2", "群里 @ 我", chat="oc_g"),
                                           fake.message_event("u3", "not for the bot", chat="oc_g", at_bot=False),
                                           fake.message_event("u4", "", message_type="sticker")],
                                    fake.answers)
    got = [(m.chat, m.thread, m.user, m.text, m.readable) for m, _ in rec.got]
    assert got == [("ou_u1", "", "ou_u1", "一对一", True), ("oc_g", "ou_u2", "ou_u2", "群里 @ 我", True),
                   ("ou_u4", "", "ou_u4", "(sticker)", False)]
    assert all(isinstance(t, CardKitReply) for _, t in rec.got)


# -- the daemon and the model over the long connection --------------------------------------------------------


async def test_answers_stream_into_cards_once_each_also_in_a_retry_storm(tmp_path, redis_server):
    fake = FakeFeishu()
    async with fake_server(fake):
        # 48 tokens: long enough for several updates also where the model is fast.
        async with running_daemon(feishu_config(tmp_path, redis_server.url, fake, max_tokens=48)):
            await wait_for(lambda: _true(fake.connected() == 1), timeout=10)
            storm = fake.message_event("zhang", "Write three sentences about rivers.")
            for _ in range(10):  # Feishu pushing the same event again (no answer within 3 s, say)
                await fake.push(storm)

            def done(n: int):
                return _true(len(fake.cards) >= n and all(not c.streaming for c in fake.cards.values()))

            await wait_for(lambda: done(1), timeout=60)
            await asyncio.sleep(1.0)
            [card] = fake.cards.values()
            grown = [card.card["body"]["elements"][0]["content"], *card.contents]
            assert len(card.contents) >= 2, grown  # the card grew in at least two updates
            assert all(b.startswith(a) for a, b in itertools.pairwise(grown))
            [reply] = fake.replies
            assert reply["reply_to"] == storm["event"]["message"]["message_id"]
            await fake.push(fake.message_event("li", "What is a lake?", chat="oc_group"))
            await fake.push(fake.message_event("wang", "ignored", chat="oc_group", at_bot=False))
            image = fake.message_event("zhao", "", message_type="sticker", content={"file_key": "sticker_1"})
            await fake.push(image)
            await wait_for(lambda: done(3), timeout=60)
            await asyncio.sleep(0.5)
            assert len(fake.replies) == 3  # not the group message that did not @ the bot
            [pic] = [r for r in fake.replies if r["reply_to"] == image["event"]["message"]["message_id"]]
            said = fake.cards[pic["content"]["data"]["card_id"]].content
            assert NOT_TEXT_EN in said and "只能阅读文字" in said  # both languages: nothing to tell from
            await cluster.kept_in_history(redis_server, "feishu", "oc_group")
    assert fake.errors == []


# -- callback mode and department routing, through the daemon's HTTP server -------------------------------------


def callback_app(fake: FakeFeishu) -> dict[str, Any]:
    return app_keys(fake, mode="callback", encrypt_key="env:FEISHU_ENCRYPT_KEY",
                    verification_token="env:FEISHU_VERIFICATION_TOKEN", streaming="off")


async def test_callbacks_are_checked_before_decrypting_and_departments_route(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("FEISHU_ENCRYPT_KEY", KEY)
    monkeypatch.setenv("FEISHU_VERIFICATION_TOKEN", TOKEN)
    fake = FakeFeishu()
    fake.departments = {"ou_boss": ["od_1", "od_42"], "ou_clerk": ["od_7"]}
    async with fake_server(fake), running_daemon(cluster.callback_config(
            tmp_path, redis_server.url, "feishu", callback_app(fake), ["od_42"])) as api:
        url = "/feishu/assistant"
        # The URL check (unsigned, encrypted): answered with the challenge.
        check = json.dumps({"encrypt": encrypt(json.dumps({"challenge": "ch-1", "token": TOKEN, "type":
                                                           "url_verification"}).encode(), KEY, b"3" * 16)})
        status, data, _ = await api.post(url, raw=check.encode())
        assert status == 200 and data == {"challenge": "ch-1"}
        # Forged: a wrong signature, a replayed (stale) one, another app's key: refused, nothing recorded.
        headers, body = _signed(fake.message_event("mallory", "forged"))
        for bad in (dict(headers, **{"X-Lark-Signature": "f" * 64}),
                    dict(headers, **{"X-Lark-Request-Timestamp": str(int(time.time()) - 900)})):
            status, _, _ = await api.post(url, raw=body, headers=bad)
            assert status == 403
        status, _, _ = await api.post(url, raw=_signed(fake.message_event("mallory", "x"), key="other key")[1],
                                      headers=headers)
        assert status == 403
        for user in ("boss", "clerk"):
            h, b = _signed(fake.message_event(user, "hello"))
            status, _, _ = await api.post(url, raw=b, headers=h)
            assert status == 200
        await cluster.routed_by_department(redis_server, "feishu", "ou_boss", "ou_clerk", lambda: len(fake.replies))
        assert all(x["msg_type"] == "text" for x in fake.replies)  # streaming = "off"
        assert sorted(fake.user_lookups) == ["ou_boss", "ou_clerk"]
        # The commands work as on the other platforms.
        h, b = _signed(fake.message_event("clerk", "/help"))
        status, _, _ = await api.post(url, raw=b, headers=h)
        assert status == 200
        await wait_for(lambda: _true(len(fake.replies) == 3), timeout=20)
        assert "/reset" in fake.replies[2]["content"]["text"]
        assert "@mention me" in fake.replies[2]["content"]["text"]  # the platform's own hint
    assert fake.errors == []


async def test_no_secret_or_token_reaches_the_log(tmp_path, redis_server, manager):
    fake = FakeFeishu()
    async with fake_server(fake):
        with captured() as log:
            rec = Recorder()
            async with connector(feishu_config(tmp_path, redis_server.url, fake), manager, rec):
                fake.throttle_reset_s = 0
                target = await cluster.answered_through_refusals(fake, rec, fake.message_event("u1", "hello"),
                                                                 lambda: fake.throttle("card_content", 1))
                await target.failed(RuntimeError("x"), "t")
    text = log.getvalue()
    assert "feishu tenant token refused" in text and "platform rate limit" in text  # the log did see it all
    assert len(fake.issued) == 2
    for canary in (SECRET, *fake.issued):
        assert canary not in text, canary


# -- kill -9 in the middle of answering ------------------------------------------------------------------------


def daemon_side(fake: FakeFeishu) -> cluster.Platform:
    async def ask(user: str, text: str) -> str:
        event = fake.message_event(user, text)
        await fake.push(event)
        return event["event"]["message"]["message_id"]

    return cluster.Platform("feishu", app_keys(fake), ask, "feishu long connection up", lambda: fake.endpoints,
                    lambda n: len(fake.replies) >= n and not any(c.streaming for c in fake.cards.values()))


async def test_kill_9_and_restart_answer_each_message_once(tmp_path, redis_server):
    fake = FakeFeishu()
    async with fake_server(fake):
        asked = await cluster.kill_9_and_restart(tmp_path, redis_server, fake, daemon_side(fake))
    replies = {u: [x for x in fake.replies if x["reply_to"] == mid] for u, mid in asked.items()}
    assert {u: len(xs) for u, xs in replies.items()} == dict.fromkeys(asked, 1), replies  # once each
    for xs in replies.values():
        card = fake.cards[xs[0]["content"]["data"]["card_id"]]
        assert not card.streaming and card.content.strip()
    assert fake.errors == []  # sequences kept increasing across the restart


def test_config_errors_name_the_key(tmp_path):
    from connectors.config import config_from_dict
    from core.config import ConfigError

    def load(app):
        return config_from_dict({"feishu": {"assistant": app}}, tmp_path / "config.toml")

    ok = {"app_id": "cli_x", "app_secret": "env:FEISHU_SECRET"}
    with pytest.raises(ConfigError, match=r"feishu\.assistant\.app_id"):
        load({"app_secret": "env:FEISHU_SECRET"})
    with pytest.raises(ConfigError, match=r"feishu\.assistant\.domain"):
        load({**ok, "domain": "larksuite"})
    with pytest.raises(ConfigError, match="encrypt_key"):
        load({**ok, "mode": "callback", "verification_token": "env:FEISHU_SECRET"})
    with pytest.raises(ConfigError, match="verification_token"):
        load({**ok, "mode": "callback", "encrypt_key": "env:FEISHU_SECRET"})
    with pytest.raises(ConfigError, match=r"feishu\.assistant\.streaming"):
        load({**ok, "streaming": "typewriter"})
    assert FeishuConfig.sections(load({**ok, "domain": "lark"}))["assistant"].base == "https://open.larksuite.com"


async def test_three_daemons_one_connection_moved_on_kill_9_each_message_once(tmp_path, redis_server):
    """Three real ``botd run`` on one Redis: one holds the long connection; killed mid-answer,
    another takes the connection and the unfinished answers; every message is answered once."""
    fake = FakeFeishu()
    async with fake_server(fake):
        asked = await cluster.three_daemons_holder_killed(tmp_path, redis_server, fake, daemon_side(fake))
    per_message = [sum(x["reply_to"] == mid for x in fake.replies) for mid in asked.values()]
    assert per_message == [1, 1, 1, 1], fake.replies
    assert fake.errors == []


async def test_a_refused_card_entity_becomes_a_patched_card(manager):
    """The app lacks CardKit's permission: the answer streams into a patched card instead, and
    so do the app's later answers."""
    fake = FakeFeishu()
    fake.cardkit_forbidden = True
    async with fake_server(fake), aiohttp.ClientSession() as http:
        target = await _target(CardKitReply, fake, http, manager)
        with captured() as log:
            await target.show("one")
            await target.show("one two")
            await target.closed("one two")
        assert target.api.cardkit_refused and "99991672" in log.getvalue()
    [reply] = fake.replies
    assert reply["msg_type"] == "interactive" and reply["content"]["config"]["update_multi"]
    assert [p[1]["body"]["elements"][0]["content"] for p in fake.patches] == ["one two"]
    assert fake.cards == {} and fake.errors == []
