"""DingTalk (钉钉): botd's Stream client, API client and reply targets against the local fake
(tests/fake_dingtalk.py, written from docs/protocols/dingtalk.md), the official dingtalk-stream
SDK against the same fake, the connector with a recording service, and the real daemon and
model answering over the long connection."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from functools import partial
from typing import Any

import aiohttp
import pytest

from connectors.dingtalk.api import DingtalkApi, DingtalkApiError
from connectors.dingtalk.callback import check_signature, sign
from connectors.dingtalk.config import DingtalkConfig
from connectors.dingtalk.reply import CardReply, MarkdownReply
from connectors.dingtalk.stream import StreamLink
from core.kv import KeyValueCache
from core.messages import Account
from tests import platform_cluster as cluster
from tests.fake_dingtalk import FakeDingtalk
from tests.helpers import Recorder, captured, running_daemon, wait_for
from tests.platform_cluster import fake_server
from tests.platform_cluster import now as _true

SECRET = "dingtalk-app-secret"
TEMPLATE = "tpl-ai-card.schema"


dingtalk_env = cluster.secret_in_env("DINGTALK_SECRET", SECRET)


def robot_cfg(fake: FakeDingtalk, **extra: Any) -> DingtalkConfig:
    return DingtalkConfig(client_id=fake.client_id, client_secret="env:DINGTALK_SECRET", api_base=fake.url,
                          oapi_base=fake.url, **extra)


# -- the Stream client ---------------------------------------------------------------------------------


async def test_stream_acks_every_frame_answers_pings_and_leaves_on_disconnect():
    fake = FakeDingtalk()
    async with fake_server(fake), cluster.linked(
            lambda on: StreamLink("assistant", fake.url, fake.client_id, SECRET, on)) as (link, task, got):
        [opened] = fake.opens
        assert {"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"} in opened["subscriptions"]
        mid = await fake.push(fake.robot_message("zhangsan", "你好"))
        opaque = await fake.ping()
        await wait_for(lambda: _true(mid in fake.acks and opaque in fake.pongs), timeout=5)
        assert got[0]["text"]["content"] == "你好"
        assert json.loads(fake.acks[mid]["data"]) == {"response": None}
        # The gateway says it goes away: the session ends (the connector reconnects with a new ticket).
        closing = asyncio.create_task(fake.disconnect(close_after_s=3))
        await asyncio.wait_for(task, 2)  # ended before the gateway closed it
        closing.cancel()
    assert fake.errors == []


async def test_the_official_sdk_speaks_with_the_fake(tmp_path):
    """The fake is checked against dingtalk-stream 0.24.3 itself: it registers, receives a robot
    message through its ChatbotHandler and ACKs it."""
    fake = FakeDingtalk()
    script = tmp_path / "sdk.py"
    script.write_text(
        "import asyncio, sys\n"
        "import dingtalk_stream\n"
        "from dingtalk_stream import AckMessage, ChatbotMessage\n"
        "class H(dingtalk_stream.ChatbotHandler):\n"
        "    async def process(self, cb):\n"
        "        m = ChatbotMessage.from_dict(cb.data)\n"
        "        print('GOT', m.conversation_type, m.text.content.strip(), m.sender_staff_id, flush=True)\n"
        "        return AckMessage.STATUS_OK, 'OK'\n"
        "c = dingtalk_stream.DingTalkStreamClient(dingtalk_stream.Credential(sys.argv[1], sys.argv[2]))\n"
        "c.register_callback_handler(ChatbotMessage.TOPIC, H())\n"
        "asyncio.run(c.start())\n")
    async with fake_server(fake):
        env = {**os.environ, "DINGTALK_OPENAPI_ENDPOINT": fake.url}
        async with cluster.sdk_process(script, fake.client_id, SECRET, env=env) as stdout:
            await wait_for(lambda: _true(fake.connected() == 1), timeout=20)
            mid = await fake.push(fake.robot_message("lisi", "hello sdk", group="cidGroup1"))
            assert await cluster.printed(stdout) == ["GOT", "2", "hello", "sdk", "lisi"]
            await wait_for(lambda: _true(mid in fake.acks), timeout=5)
    assert fake.errors == []


# -- the API client --------------------------------------------------------------------------------------


async def test_the_token_is_shared_cached_and_refreshed_once_when_refused(manager):
    fake = FakeDingtalk()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        cache = KeyValueCache(manager, "botd")
        one = DingtalkApi(robot_cfg(fake), SECRET, http, cache)
        two = DingtalkApi(robot_cfg(fake), SECRET, http, cache)  # another daemon of the cluster
        assert await one.token() == await two.token()
        assert fake.token_requests == 1
        # Shared through Redis, and dropped 300 s before DingTalk's expireIn (7,200 s): refreshed before expiry.
        assert 6850 <= await manager.client.ttl("botd:cache:dingtalk:token:" + fake.client_id) <= 6900
        fake.departments["wangwu"] = [1, 42]
        fake.expire_tokens()  # mid-answer, DingTalk stops taking the token
        assert await two.departments("wangwu") == ["1", "42"]
        assert fake.token_requests == 2
        assert await one.departments("wangwu") == ["1", "42"] and fake.user_lookups == ["wangwu"]  # cached


async def test_a_wrong_secret_is_a_clear_error(manager):
    fake = FakeDingtalk()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        api = DingtalkApi(robot_cfg(fake), "wrong", http, KeyValueCache(manager, "botd"))
        with pytest.raises(DingtalkApiError, match="invalidClientIdOrSecret"):
            await api.token()


# -- the reply targets alone ------------------------------------------------------------------------------


def _route(fake: FakeDingtalk, user: str, group: str = "", webhook_life_s: float = 5400) -> dict[str, Any]:
    data = fake.robot_message(user, "q", group=group, webhook_life_s=webhook_life_s)
    return {"group": bool(group), "conversation": data["conversationId"], "staff_id": user,
            "webhook": data["sessionWebhook"], "webhook_until_ms": data["sessionWebhookExpiredTime"]}


async def test_a_card_grows_in_updates_is_finalised_and_obeys_throttling(manager):
    fake = FakeDingtalk()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        cfg = robot_cfg(fake, card_template_id=TEMPLATE)
        api = DingtalkApi(cfg, SECRET, http, KeyValueCache(manager, "botd"))
        target = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                           _route(fake, "zhaoliu", group="cidG"), 0.1)
        await target.show("钉钉")
        fake.throttle("/v1.0/card/streaming", 2)
        t0 = time.monotonic()
        await target.show("钉钉的 AI 卡片")
        assert time.monotonic() - t0 >= 1.9  # waited about a second after each 403
        fake.expire_tokens()
        await target.show("钉钉的 AI 卡片流式更新")
        await target.closed("钉钉的 AI 卡片流式更新。")
    [card] = fake.cards.values()
    assert card.template == TEMPLATE and card.open_space_id == "dtv1.card//IM_GROUP.cidG"
    assert card.params["content"] == "钉钉的 AI 卡片流式更新。" and card.params["flowStatus"] == "3"
    assert card.contents == ["钉钉的 AI 卡片", "钉钉的 AI 卡片流式更新", "钉钉的 AI 卡片流式更新。"]
    assert card.finalised and len(fake.throttle_hits) == 2 and fake.token_requests == 2
    assert fake.errors == []


async def test_a_card_finalised_by_a_daemon_that_died_before_its_ack_is_not_streamed_again(manager):
    # The answering daemon finalised the card and was killed before the inbox entry was acked: the
    # daemon that takes the message over answers again into the same card id (the inbox kept it).
    fake = FakeDingtalk()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        api = DingtalkApi(robot_cfg(fake, card_template_id=TEMPLATE), SECRET, http, KeyValueCache(manager, "botd"))
        first = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                          _route(fake, "zhouba"), 0.1)
        await first.show("完整的回答")
        await first.closed("完整的回答。")
        refs = [ref for ref, _ in first.sent]
        again = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                          _route(fake, "zhouba"), 0.1, sent=refs)
        await again.show("完整的回答")
        await again.closed("完整的回答。")
        # Killed between the mark and the finalising call: the card is set finished, not streamed into.
        cut = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                        _route(fake, "wujiu"), 0.1)
        await cut.show("半截")
        [ref] = [r for r, _ in cut.sent]
        await KeyValueCache(manager, "botd").set(f"dingtalk:card:final:{ref}", "1", 60)
        taken = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                          _route(fake, "wujiu"), 0.1, sent=[ref])
        await taken.show("半截的回答")
        await taken.closed("半截的回答。")
    card = fake.cards[refs[0]]
    assert card.finalised and card.contents == ["完整的回答。"]
    assert fake.cards[ref].params["content"] == "半截的回答。" and fake.cards[ref].params["flowStatus"] == "3"
    assert fake.errors == []


async def test_a_long_answer_continues_in_a_second_card(manager):
    fake = FakeDingtalk()
    text = "长回答。" * 2000  # 8,000 characters: past one card
    async with fake_server(fake), aiohttp.ClientSession() as http:
        api = DingtalkApi(robot_cfg(fake, card_template_id=TEMPLATE), SECRET, http, KeyValueCache(manager, "botd"))
        target = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                           _route(fake, "sunqi"), 0.1)
        for n in (100, 5000, len(text)):
            await target.show(text[:n])
        await target.closed(text)
    cards = sorted(fake.cards.values(), key=lambda c: c.created_at)
    assert len(cards) == 2 and all(c.finalised for c in cards)
    assert cards[0].open_space_id == "dtv1.card//IM_ROBOT.sunqi"
    assert "".join(c.params["content"] for c in cards) == text  # nothing lost, nothing twice
    assert fake.errors == []


async def test_markdown_goes_by_session_webhook_then_by_openapi_once_it_expired(manager):
    fake = FakeDingtalk()
    async with fake_server(fake), aiohttp.ClientSession() as http:
        api = DingtalkApi(robot_cfg(fake), SECRET, http, KeyValueCache(manager, "botd"))
        cache = KeyValueCache(manager, "botd")
        fresh = MarkdownReply(Account("dingtalk", "assistant"), api, cache, _route(fake, "zhouba"), 0)
        await fresh.show("**Hello** there")
        stale = MarkdownReply(Account("dingtalk", "assistant"), api, cache,
                              _route(fake, "wujiu", group="cidG2", webhook_life_s=30), 0)
        await stale.show("# Title\nbody")
        one = MarkdownReply(Account("dingtalk", "assistant"), api, cache, _route(fake, "zheng", webhook_life_s=0), 0)
        await one.show("one to one")
    assert [p["markdown"]["text"] for p in fake.webhook_posts] == ["**Hello** there"]
    assert fake.webhook_posts[0]["markdown"]["title"] == "Hello there"
    group, single = fake.sends
    assert group["kind"] == "group" and group["openConversationId"] == "cidG2" and group["param"]["title"] == "Title"
    assert single["kind"] == "1to1" and single["userIds"] == ["zheng"] and single["robotCode"] == fake.client_id


# -- callback mode's signature -------------------------------------------------------------------------------


def test_callback_signature():
    now = int(time.time() * 1000)
    good = sign(str(now), SECRET)
    assert check_signature(str(now), good, SECRET, 3600) == ""
    assert check_signature(str(now), sign(str(now), "other"), SECRET, 3600) == "wrong signature"
    old = str(now - 3_700_000)
    assert "window" in check_signature(old, sign(old, SECRET), SECRET, 3600)
    assert "malformed" in check_signature("x", good, SECRET, 3600)


# -- the connector in a cluster (a recording service, no model) ---------------------------------------------


def robot_app(fake: FakeDingtalk, **extra: Any) -> dict[str, Any]:
    return {"client_id": fake.client_id, "client_secret": "env:DINGTALK_SECRET", "api_base": fake.url,
            "oapi_base": fake.url, **extra}


def dingtalk_config(tmp_path, redis_url: str, fake: FakeDingtalk, instance: str = "", max_tokens: int = 32,
                    **extra: Any):
    return cluster.connector_config(tmp_path, redis_url, "dingtalk", robot_app(fake, **extra), instance, max_tokens)


def connector(cfg, manager, service=None):
    from connectors.dingtalk.connector import DingtalkConnector

    return cluster.connector(DingtalkConnector, cfg, manager, service)


async def test_one_of_three_daemons_holds_the_stream_and_another_takes_over(tmp_path, redis_server, manager):
    fake = FakeDingtalk()
    async with fake_server(fake), cluster.three_connectors(
            connector, partial(dingtalk_config, tmp_path, redis_server.url, fake), manager, fake) as (c1, one, two):
        assert fake.connected() == 1 and len(fake.opens) == 1  # exactly one of three holds the connection
        await fake.push(fake.robot_message("a", "hi"))
        await wait_for(lambda: _true(len(one.got) == 1), timeout=5)
        assert two.got == []
        await cluster.lease_taken_then_freed(redis_server, "botd:lease:dingtalk:stream:" + fake.client_id, fake,
                                             lambda: c1.robots["assistant"].displaced)
    assert fake.errors == []


async def test_the_stream_reconnects_after_a_drop_and_after_disconnect(tmp_path, redis_server, manager):
    fake = FakeDingtalk()
    async with fake_server(fake):
        rec = Recorder()
        async with connector(dingtalk_config(tmp_path, redis_server.url, fake), manager, rec):
            await wait_for(lambda: _true(fake.connected() == 1), timeout=10)
            await fake.drop_connections()
            await wait_for(lambda: _true(fake.connected() == 1 and len(fake.opens) == 2), timeout=10)
            await fake.disconnect(close_after_s=0.2)
            await wait_for(lambda: _true(fake.connected() == 1 and len(fake.opens) == 3), timeout=10)
            await fake.push(fake.robot_message("b", "still here"))
            await wait_for(lambda: _true(len(rec.got) == 1), timeout=5)
    assert fake.errors == []  # a new ticket for each connection


async def test_messages_become_inbound_messages(tmp_path, redis_server, manager):
    fake = FakeDingtalk()
    async with fake_server(fake):
        rec = Recorder()
        async with connector(dingtalk_config(tmp_path, redis_server.url, fake, group_history="member"),
                             manager, rec):
            await wait_for(lambda: _true(fake.connected() == 1), timeout=10)
            # u4's video, not a picture: pictures are attachments now.
            await cluster.push_each(fake, [fake.robot_message("u1", "一对一"),
                                           fake.robot_message("u2", "群里 @ 我", group="cidG"),
                                           fake.robot_message("u3", "not for the bot", group="cidG", at=False),
                                           fake.robot_message("u4", "", msgtype="video")],
                                    fake.acks)
    msgs = [m for m, _ in rec.got]
    assert [(m.chat, m.thread, m.user, m.text, m.readable) for m in msgs] == [
        ("u1", "", "u1", "一对一", True), ("cidG", "u2", "u2", "群里 @ 我", True),
        ("u4", "", "u4", "(video)", False)]
    assert all(isinstance(t, MarkdownReply) for _, t in rec.got)


# -- the daemon and the model over the long connection --------------------------------------------------------


async def test_answers_stream_into_a_card_once_each_also_in_a_retry_storm(tmp_path, redis_server):
    fake = FakeDingtalk()
    async with fake_server(fake):
        # 48 tokens: long enough for several updates also where the model is fast.
        cfg = dingtalk_config(tmp_path, redis_server.url, fake, max_tokens=48, card_template_id=TEMPLATE)
        async with running_daemon(cfg):
            await wait_for(lambda: _true(fake.connected() == 1), timeout=10)
            storm = fake.robot_message("zhangsan", "Write three sentences about rivers.")
            for _ in range(10):  # DingTalk delivering the same message again and again
                await fake.push(storm)

            def cards_done(n: int):
                return _true(len(fake.cards) >= n and all(c.finalised and c.params.get("flowStatus") == "3"
                                                          for c in fake.cards.values()))

            await wait_for(lambda: cards_done(1), timeout=60)
            await asyncio.sleep(1.0)
            [card] = fake.cards.values()
            assert card.open_space_id == "dtv1.card//IM_ROBOT.zhangsan"
            grown = [c for c in card.contents if c]
            assert len(grown) >= 3, card.contents  # at least two updates, then the final one
            assert all(b.startswith(a) for a, b in itertools.pairwise(grown))
            assert card.params["content"] == card.contents[-1]
            # In a group: @ answered (the mention is not the question), not @ ignored; a video (not read
            # here: a picture is an attachment now, read or answered NOT_IMAGE) gets the text.
            await fake.push(fake.robot_message("lisi", "What is a lake?", group="cidGroup"))
            await fake.push(fake.robot_message("wangwu", "ignored", group="cidGroup", at=False))
            await fake.push(fake.robot_message("zhaoliu", "", msgtype="video"))
            await wait_for(lambda: cards_done(3), timeout=60)
            await asyncio.sleep(0.5)
            spaces = sorted(c.open_space_id for c in fake.cards.values())
            assert spaces == ["dtv1.card//IM_GROUP.cidGroup", "dtv1.card//IM_ROBOT.zhangsan",
                              "dtv1.card//IM_ROBOT.zhaoliu"]
            [pic] = [c for c in fake.cards.values() if c.open_space_id.endswith("zhaoliu")]
            said = pic.params["content"]
            assert "Sorry, I read text only." in said and "只能阅读文字" in said  # both: nothing to tell from
            await cluster.kept_in_history(redis_server, "dingtalk", "cidGroup")
    assert fake.errors == []


# -- callback mode and department routing, through the daemon's HTTP server -------------------------------------


async def test_callbacks_are_checked_before_parsing_and_departments_route(tmp_path, redis_server):
    fake = FakeDingtalk()
    fake.departments = {"boss": [1, 42], "clerk": [7]}
    async with fake_server(fake), running_daemon(cluster.callback_config(
            tmp_path, redis_server.url, "dingtalk", robot_app(fake, mode="callback"), [42])) as api:
        url = "/dingtalk/assistant"

        def signed(secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
            stamp = str(ts if ts is not None else int(time.time() * 1000))
            return {"timestamp": stamp, "sign": sign(stamp, secret), "Content-Type": "application/json"}

        # A forged sign, a stale timestamp, no headers: refused before the body is read, nothing recorded.
        body = json.dumps(fake.robot_message("mallory", "forged")).encode()
        for headers in (signed("another-apps-secret"), signed(ts=int(time.time() * 1000) - 7_200_000), {}):
            status, _, _ = await api.post(url, raw=body, headers=headers)
            assert status == 403
        status, _, _ = await api.post(url, raw=b"{not json", headers=signed("wrong"))
        assert status == 403  # the signature is checked first: not a 400 for the bad body
        status, _, _ = await api.post(url, raw=b"{not json", headers=signed())
        assert status == 400
        # Signed messages: the boss (department 42) is answered by the hr bot, the clerk by the assistant.
        for user in ("boss", "clerk"):
            status, _, _ = await api.post(url, raw=json.dumps(fake.robot_message(user, "hello")).encode(),
                                          headers=signed())
            assert status == 200
        await cluster.routed_by_department(redis_server, "dingtalk", "boss", "clerk", lambda: len(fake.webhook_posts))
        # The commands work as on the other platforms.
        for command in ("/help", "/reset"):
            status, _, _ = await api.post(url, raw=json.dumps(fake.robot_message("clerk", command)).encode(),
                                          headers=signed())
            assert status == 200
        await wait_for(lambda: _true(len(fake.webhook_posts) == 4), timeout=20)
        assert "/reset" in fake.webhook_posts[2]["markdown"]["text"]
        assert "@mention me" in fake.webhook_posts[2]["markdown"]["text"]  # the platform's own hint
        r = redis_server.client()
        await wait_for(lambda: _true(r.llen("botd:hist:dingtalk:assistant:clerk:") == 0), timeout=5)
        assert sorted(fake.user_lookups) == ["boss", "clerk"]  # asked once each (a rule needed them)
    assert fake.errors == []


async def test_no_secret_token_or_webhook_reaches_the_log(tmp_path, redis_server, manager):
    fake = FakeDingtalk()
    async with fake_server(fake):
        with captured() as log:
            rec = Recorder()
            async with connector(dingtalk_config(tmp_path, redis_server.url, fake, card_template_id=TEMPLATE),
                                 manager, rec) as conn:
                await cluster.answered_through_refusals(
                    fake, rec, fake.robot_message("u1", "hello", webhook_life_s=0),
                    lambda: fake.throttle("/v1.0/card/streaming", 1))
                token = await conn.robots["assistant"].api.token()
                bad = CardReply(Account("dingtalk", "assistant"), conn.robots["assistant"].api, conn.cache,
                                {**rec.got[0][0].route, "conversation": ""}, 0.1)
                await bad.failed(RuntimeError("x"), "t")
    text = log.getvalue()
    assert "dingtalk access token refused" in text and "platform rate limit" in text  # the log did see it all
    assert len(fake.issued) == 2 and token == fake.issued[-1]
    for canary in (SECRET, *fake.issued, *fake.tickets, "sendBySession"):
        assert canary not in text, canary


# -- kill -9 in the middle of answering ------------------------------------------------------------------------


def daemon_side(fake: FakeDingtalk) -> cluster.Platform:
    async def ask(user: str, text: str) -> str:
        return await fake.push(fake.robot_message(user, text))

    return cluster.Platform("dingtalk", robot_app(fake, card_template_id=TEMPLATE), ask, "dingtalk stream connected",
                    lambda: len(fake.opens),
                    lambda n: len(fake.cards) >= n and all(_finished(c) for c in fake.cards.values()))


async def test_kill_9_and_restart_answer_each_message_once(tmp_path, redis_server):
    fake = FakeDingtalk()
    async with fake_server(fake):
        users = list(await cluster.kill_9_and_restart(tmp_path, redis_server, fake, daemon_side(fake)))
    per_user = {u: [c for c in fake.cards.values() if c.open_space_id.endswith(f".{u}")] for u in users}
    assert {u: len(cs) for u, cs in per_user.items()} == dict.fromkeys(users, 1), per_user  # once each
    assert all(cs[0].finalised and cs[0].params["content"].strip() for cs in per_user.values())
    assert fake.errors == []


def test_config_errors_name_the_key(tmp_path):
    from connectors.config import config_from_dict
    from core.config import ConfigError

    def load(robot):
        return config_from_dict({"dingtalk": {"assistant": robot}}, tmp_path / "config.toml")

    with pytest.raises(ConfigError, match=r"dingtalk\.assistant\.client_id"):
        load({"client_secret": "env:DINGTALK_SECRET"})
    with pytest.raises(ConfigError, match=r"dingtalk\.assistant\.client_secret"):
        load({"client_id": "x"})
    with pytest.raises(ConfigError, match=r"dingtalk\.assistant\.mode"):
        load({"client_id": "x", "client_secret": "env:DINGTALK_SECRET", "mode": "webhook"})
    with pytest.raises(ConfigError, match=r"dingtalk\.assistant\.api_base"):
        load({"client_id": "x", "client_secret": "env:DINGTALK_SECRET", "api_base": "api.dingtalk.com"})
    with pytest.raises(ConfigError, match=r"dingtalk\.assistant\.client_secret"):  # a pasted secret
        load({"client_id": "x", "client_secret": "s3cr3t-value"})
    with pytest.raises(ConfigError, match=r"dingtalk\.nobody"):
        config_from_dict({"dingtalk": {"nobody": {"client_id": "x", "client_secret": "env:DINGTALK_SECRET"}}},
                         tmp_path / "config.toml")
    cfg = load({"client_id": "x", "client_secret": "env:DINGTALK_SECRET"})
    assert DingtalkConfig.sections(cfg)["assistant"].robot == "x"


def _finished(card) -> bool:
    # Streamed to its end, or (the holder killed between marking the card final and finalising
    # the stream) set finished by the daemon that took the message over: the user sees the whole
    # answer either way. Which of the two happens depends on where the kill lands.
    return card.finalised or card.params.get("flowStatus") == "3"


async def test_three_daemons_one_stream_moved_on_kill_9_each_message_once(tmp_path, redis_server):
    """Three real ``botd run`` on one Redis: one holds the stream; killed mid-answer, another takes
    the stream and the unfinished answers; every message is answered once."""
    fake = FakeDingtalk()
    async with fake_server(fake):
        users = list(await cluster.three_daemons_holder_killed(tmp_path, redis_server, fake, daemon_side(fake)))
    per_user = {u: sum(c.open_space_id.endswith(f".{u}") for c in fake.cards.values()) for u in users}
    assert per_user == dict.fromkeys(users, 1), per_user
    assert fake.errors == []


async def test_a_refused_card_becomes_markdown_at_the_end_and_for_later_answers(manager):
    """The app lacks the card permissions: the answer still arrives (markdown, complete, once),
    and the robot's next answers skip the card."""
    fake = FakeDingtalk()
    fake.cards_forbidden = True
    async with fake_server(fake), aiohttp.ClientSession() as http:
        api = DingtalkApi(robot_cfg(fake, card_template_id=TEMPLATE), SECRET, http, KeyValueCache(manager, "botd"))
        target = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                           _route(fake, "qianshi"), 0.1)
        with captured() as log:
            await target.show("partial")
            assert not target.edits  # the bots layer now shows the final text only
            await target.closed("partial, then the whole answer.")
        assert api.cards_refused and "AccessTokenPermissionDenied" in log.getvalue()
        # Replayed after a restart with its part still pending: sent once at the end.
        replay = CardReply(Account("dingtalk", "assistant"), api, KeyValueCache(manager, "botd"),
                           _route(fake, "qianshi"), 0.1, sent=["pending"])
        await replay.show("again")
        await replay.closed("again, whole.")
    assert [p["markdown"]["text"] for p in fake.webhook_posts] == ["partial, then the whole answer.", "again, whole."]
    assert fake.cards == {} and fake.errors == []
