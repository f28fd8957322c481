"""The waiting notice ([queue] notice_after_s): a user whose answer has not started is told
their place in line and the expected wait, once, and the answer then replaces the notice (a
platform that edits) or follows it (one that cannot).

Each platform's real reply target against its fake platform API, under the real delivery
policy (a slow answer and a fixed place in line); then the whole daemon with the real model
and the real fair queue: the place told is the queue's own order, no notice for an answer that
starts in time, and the console's chat streams the notice before the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from slack_sdk.web.async_client import AsyncWebClient
from telegram import Bot

from bots.delivery import Delivery
from bots.notice import Standing, notice_text, wait_words
from connectors.dingtalk.api import DingtalkApi
from connectors.dingtalk.reply import CardReply, MarkdownReply
from connectors.feishu.api import FeishuApi
from connectors.feishu.reply import CardKitReply, TextReply
from connectors.slack.connector import THINKING, SlackReply, markdown_to_mrkdwn
from connectors.telegram.connector import TelegramReply
from connectors.wecom.api import WeComApi
from connectors.wecom.config import WecomConfig
from connectors.wecom.connector import WeComReply
from connectors.wecom_aibot import AibotReply, Slots
from connectors.wecom_aibot.config import WecomAibotConfig
from connectors.wecom_aibot.connector import SocketChannel
from core.jobs import FairQueue, Job
from core.kv import KeyValueCache
from core.messages import Account, Finish, InboundMessage, ReplyEvent, Usage
from tests.fake_dingtalk import FakeDingtalk
from tests.fake_feishu import FakeFeishu
from tests.fake_wecom_aibot import FakeAibot
from tests.fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from tests.helpers import busy_model, make_config, running_daemon, wait_for

ANSWER = "The office opens at nine."
PLACE = Standing(3, 18.0)
NOTICE = "⏳ 3 ahead of you, about 20 s"


class SlowAnswer:
    """An answer whose first words come after ``delay_s`` (it waited for the model)."""

    def __init__(self, delay_s: float, text: str = ANSWER) -> None:
        self.id = "r-slow"
        self.delay_s = delay_s
        self.text = text

    async def events(self) -> AsyncIterator[ReplyEvent]:
        await asyncio.sleep(self.delay_s)
        yield ReplyEvent(delta=self.text)
        yield ReplyEvent(finish_reason=Finish.STOP, text=self.text, usage=Usage())

    def cancel(self) -> None:
        pass


async def deliver(platform: str, target: Any, delay_s: float = 0.8, after_s: float = 0.2) -> Delivery:
    msg = InboundMessage(platform=platform, bot="assistant", chat="C1", user="U1", text="When does it open?")
    delivery = Delivery(msg, target, None, "en")
    delivery.notice_after_s = after_s
    delivery.standing = lambda answer: PLACE
    await delivery.stream(SlowAnswer(delay_s))
    await target.closed(delivery.text)
    return delivery


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def served(fake: Any) -> AsyncIterator[str]:
    async with serve(fake.app()) as base:
        fake.url = base
        yield base


def test_the_notice_reads_in_both_languages():
    assert notice_text(PLACE, "en") == NOTICE
    assert notice_text(PLACE, "zh") == "⏳ 前面还有 3 位，预计 20 秒"
    assert notice_text(PLACE, "both") == "⏳ 前面还有 3 位，预计 20 秒\n" + NOTICE
    assert notice_text(Standing(0, 2.0), "en") == "⏳ You are next, about 5 s"
    assert wait_words(200, "zh") == "4 分钟" and wait_words(200, "en") == "4 min"


def test_the_place_in_line_is_the_fair_queues_own_order():
    async def run() -> None:
        q = FairQueue(max_size=20, per_user=5)

        def job(user: str) -> Job:
            return Job(user=user, request=None)  # type: ignore[arg-type]

        a1, a2, a3, b1, c1 = job("a"), job("a"), job("a"), job("b"), job("c")
        for j in (a1, a2, a3, b1, c1):
            q.put_nowait(j)
        # Users take turns: a1, b1, c1, a2, a3 -- c's one job is not behind a's three.
        assert [q.ahead_of(j) for j in (a1, b1, c1, a2, a3)] == [0, 1, 2, 3, 4]
        order = [await q.get() for _ in range(5)]
        assert order == [a1, b1, c1, a2, a3]
        assert q.ahead_of(a1) is None

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


# -- each platform: the notice, then the answer in its place (or after it) ------------------------------


async def test_telegram_notice_is_edited_into_the_answer():
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        bot = Bot("123:abc", base_url=base + "/bot")
        target = TelegramReply(Account("telegram", "assistant"), bot, {"chat_id": 42}, 0.05)
        await deliver("telegram", target)
    [sent] = fake.of("sendMessage")
    assert sent["text"] == NOTICE
    [msg] = fake.messages.values()
    assert msg["text"] == ANSWER


async def test_slack_placeholder_becomes_the_notice_then_the_answer(http):
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        client = AsyncWebClient(token="xoxb-test", base_url=base + "/api/", retry_handlers=[])
        target = SlackReply(Account("slack", "assistant"), client, None, {"channel": "C1", "root": "1.0"},  # type: ignore[arg-type]
                            interval=0.05, follow=False)
        await deliver("slack", target)
    assert [p["text"] for p in fake.of("chat.postMessage")] == [THINKING]
    shown = [u["text"] for u in fake.of("chat.update")]
    assert shown[0] == markdown_to_mrkdwn(NOTICE) and shown[-1] == markdown_to_mrkdwn(ANSWER)


async def test_wecom_app_notice_is_followed_by_the_answer(manager, http):
    fake = FakeWeCom()
    async with serve(fake.app()) as base:
        cfg = WecomConfig(corp_id="ww1436e0e65a779aee", agent_id=1000002, token="env:X", encoding_aes_key="env:Y",
                          secret="env:Z", api_base=base)
        cache = KeyValueCache(manager, "botd")
        api = WeComApi(cfg, "app-secret-value", cache, http, backoff_s=0.01)
        await deliver("wecom", WeComReply(Account("wecom", "assistant"), api, cache, "wangwu"))
    assert [s["text"]["content"] for s in fake.sent] == [NOTICE, ANSWER]


async def test_wecom_aibot_stream_opens_with_the_notice_and_ends_with_the_answer(manager, monkeypatch):
    monkeypatch.setenv("WECOM_AIBOT_SECRET", "aibot-long-secret")
    from tests.test_wecom_aibot import linked

    fake = FakeAibot()
    async with served(fake), linked(fake) as link:
        req_id = await fake.send_message("sunba", "question")
        cfg = WecomAibotConfig(bot_id="aib-test-bot", secret="env:WECOM_AIBOT_SECRET", update_interval_s=0.1)
        target = AibotReply(Account("wecom_aibot", "assistant"), cfg, SocketChannel(link, req_id, "sunba", live=True),
                            KeyValueCache(manager, "botd"), stream_id=f"s-{req_id}", user="sunba", slots=Slots())
        await deliver("wecom_aibot", target)
    [st] = fake.streams.values()
    assert st.contents[0] == NOTICE and st.content == ANSWER and st.finished
    assert fake.pushes == [] and fake.errors == []


def _dingtalk_route(fake: FakeDingtalk, user: str) -> dict[str, Any]:
    data = fake.robot_message(user, "q")
    return {"group": False, "conversation": data["conversationId"], "staff_id": user,
            "webhook": data["sessionWebhook"], "webhook_until_ms": data["sessionWebhookExpiredTime"]}


async def test_dingtalk_card_opens_with_the_notice_and_markdown_follows_it(manager, http):
    from connectors.dingtalk.config import DingtalkConfig

    fake = FakeDingtalk()
    async with served(fake):
        cache = KeyValueCache(manager, "botd")
        cfg = DingtalkConfig(client_id=fake.client_id, client_secret="env:DINGTALK_SECRET", api_base=fake.url,
                             oapi_base=fake.url, card_template_id="tpl-ai-card.schema")
        api = DingtalkApi(cfg, "dingtalk-app-secret", http, cache)
        created: list[str] = []
        create = api.card_create

        async def spy(ref: str, params: dict[str, str], **kw: Any) -> Any:
            created.append(params[cfg.card_content_key])
            return await create(ref, params, **kw)

        api.card_create = spy  # type: ignore[method-assign]
        await deliver("dingtalk", CardReply(Account("dingtalk", "assistant"), api, cache,
                                            _dingtalk_route(fake, "zhaoliu"), 0.05))
        plain = DingtalkApi(cfg.model_copy(update={"card_template_id": ""}), "dingtalk-app-secret", http, cache)
        await deliver("dingtalk", MarkdownReply(Account("dingtalk", "assistant"), plain, cache,
                                                _dingtalk_route(fake, "zhouba"), 0))
    [card] = fake.cards.values()
    assert created == [NOTICE] and card.content == ANSWER and card.finalised
    assert [p["markdown"]["text"] for p in fake.webhook_posts] == [NOTICE, ANSWER]
    assert fake.errors == []


async def test_feishu_card_opens_with_the_notice_and_a_text_reply_follows_it(manager, http):
    from connectors.feishu.config import FeishuConfig

    fake = FakeFeishu()
    async with served(fake):
        cache = KeyValueCache(manager, "botd")
        cfg = FeishuConfig(app_id=fake.app_id, app_secret="env:FEISHU_SECRET", api_base=fake.url)
        api = FeishuApi(cfg, "feishu-app-secret", http, cache)

        def route(mid: str) -> dict[str, Any]:
            return {"message_id": mid, "open_id": "ou_zhao", "chat_id": "oc_1", "group": False}

        await deliver("feishu", CardKitReply(Account("feishu", "assistant"), api, cache, route("om_1"), 0.05))
        await deliver("feishu", TextReply(Account("feishu", "assistant"), api, cache, route("om_2"), 0.05))
    [card] = fake.cards.values()
    assert card.card["body"]["elements"][0]["content"] == NOTICE and card.content == ANSWER
    texts = [r["content"]["text"] for r in fake.replies if r["msg_type"] == "text"]
    assert texts == [NOTICE, ANSWER] and fake.errors == []


async def test_no_notice_for_an_answer_that_starts_in_time():
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        bot = Bot("123:abc", base_url=base + "/bot")
        target = TelegramReply(Account("telegram", "assistant"), bot, {"chat_id": 42}, 0.05)
        await deliver("telegram", target, delay_s=0.05, after_s=0.5)
    assert [p["text"] for p in fake.of("sendMessage")] == [ANSWER]


# -- the whole daemon: the real model, the real fair queue ---------------------------------------------------


async def test_a_queued_telegram_user_is_told_their_real_place_and_a_quick_answer_gets_none(
        tmp_path, redis_server, monkeypatch):
    from connectors.telegram.connector import markdown_to_html
    from tests.test_telegram import SECRET, post_update, private_update, stored

    monkeypatch.setenv("TG_TOKEN", "123456:TEST-token")
    monkeypatch.setenv("TG_SECRET", SECRET)
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        section = {"token": "env:TG_TOKEN", "mode": "webhook", "api_base": base + "/bot",
                   "webhook_secret": "env:TG_SECRET", "edit_interval_private_s": 0.3}
        cfg = make_config(tmp_path, redis_server.url, telegram={"assistant": section}, model={"max_tokens": 16},
                          queue={"notice_after_s": 1.0, "debounce_s": 0})
        async with running_daemon(cfg) as api:
            # The model is free: the answer starts at once, nothing but the answer is shown.
            assert await post_update(api, private_update("Say hello.", chat_id=501)) == 200
            await wait_for(lambda: _true(len(stored(redis_server, 501)) == 2), timeout=60)
            await asyncio.sleep(0.5)
            quick = [p for p in fake.of("sendMessage") if int(p["chat_id"]) == 501]
            assert len(quick) == 1 and "ahead" not in quick[0]["text"] and "next" not in quick[0]["text"]

            # One answer generating, two more waiting (two other users): this user is third in line.
            async with busy_model(api, jobs=3):
                assert await post_update(api, private_update("When does the office open?", chat_id=502)) == 200

                def noticed() -> list[dict[str, Any]]:
                    return [p for p in fake.of("sendMessage") if int(p["chat_id"]) == 502]

                await wait_for(lambda: _true(bool(noticed())), timeout=30)
                [first] = noticed()
                assert re.fullmatch(r"⏳ 2 ahead of you, about \d+ (s|min)", first["text"]), first["text"]
            await wait_for(lambda: _true(len(stored(redis_server, 502)) == 2), timeout=120)
            answer = stored(redis_server, 502)[1]["content"]

            def shown() -> str:
                return next(m["text"] for m in fake.messages.values() if m["chat"]["id"] == 502)

            await wait_for(lambda: _true(shown() == markdown_to_html(answer)), timeout=10)
    assert len([p for p in fake.of("sendMessage") if int(p["chat_id"]) == 502]) == 1  # the notice became the answer


async def test_the_console_chat_streams_the_notice_before_the_answer(tmp_path, redis_server, monkeypatch):
    from tests.test_console import KEY, browsers, console_config

    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", KEY)
    cfg = console_config(tmp_path, redis_server.url, queue={"notice_after_s": 0.5})
    events: list[dict[str, Any]] = []
    async with running_daemon(cfg) as api, browsers(api, "alice") as (alice,):
        # One answer generating, one waiting (another user): alice is second in line.
        load: Any = busy_model(api, jobs=2)
        await load.__aenter__()
        try:
            async with alice.http.post(alice.base + "/api/chat", headers={"X-CSRF-Token": alice.csrf},
                                       json={"bot": "hr", "text": "When does the office open?",
                                             "max_tokens": 8}) as r:
                assert r.status == 200
                events.append(json.loads(await r.content.readline()))
                # The load goes away (its callers hang up): alice's answer starts, after the notice.
                await load.__aexit__(None, None, None)
                load = None
                async for line in r.content:
                    if line.strip():
                        events.append(json.loads(line))
        finally:
            if load is not None:
                await load.__aexit__(None, None, None)
    assert "notice" in events[0], events
    assert re.fullmatch(r"⏳ 1 ahead of you, about \d+ (s|min)", events[0]["notice"]), events
    assert any("delta" in e for e in events) and events[-1]["done"], events
    assert [e for e in events if "notice" in e] == events[:1]  # one notice, before any word of the answer


async def _true(value: bool) -> bool:
    return value
