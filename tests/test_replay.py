"""Slack and WeCom messages accepted while the model is busy survive a shutdown: the next
daemon on the same Redis answers each of them once (Slack: in the message it had posted)."""

from __future__ import annotations

import pytest

from core.config import Config
from tests.fakes import FakeSlack, FakeWeCom, serve
from tests.helpers import busy_model, running_daemon, wait_for
from tests.test_slack import SIGNING, event, post_event, slack_config
from tests.test_wecom import post_callback, text_xml, wechatpy_encrypt, wecom_config


async def stop_while_busy(cfg: Config, send) -> None:
    """Start a daemon, send platform messages while the model is busy, stop it before they are answered."""
    async with running_daemon(cfg) as api:
        async with busy_model(api, jobs=2):
            await send(api)
            await api.daemon.stop(grace_s=0)


async def restart_until_answered(cfg: Config, redis_server) -> None:
    """A new daemon on the same Redis, until it has answered everything left in the inbox."""
    async with running_daemon(cfg):
        async def done() -> bool:
            return redis_server.client().hlen("botd:inbox") == 0

        await wait_for(done, timeout=60)


@pytest.fixture
def slack_env(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING)


async def test_slack_messages_queued_at_shutdown_are_answered_once_after_the_restart(
        tmp_path, redis_server, slack_env):
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        cfg = slack_config(tmp_path, redis_server.url, base)

        async def send(api) -> None:
            for text in ("<@UBOT> What is a river?", "<@UBOT> What is a lake?"):
                status, _, _ = await post_event(api, event("app_mention", text, channel="C9"))
                assert status == 200

        await stop_while_busy(cfg, send)
        assert redis_server.client().hlen("botd:inbox") == 2  # kept for the next start
        posts_before = len(fake.of("chat.postMessage"))

        await restart_until_answered(cfg, redis_server)

    posts = fake.of("chat.postMessage")
    # One message per question in all: a placeholder posted before the shutdown is updated, not reposted.
    assert len(posts) == 2, posts
    assert posts_before in (0, 1, 2)
    final_by_ts: dict[str, str] = {}
    for p in fake.of("chat.update"):
        final_by_ts[p["ts"]] = p["text"]
    assert len(final_by_ts) == 2 and all(t.strip() and t != "_…_" for t in final_by_ts.values()), final_by_ts


@pytest.fixture
def wecom_env(monkeypatch):
    from tests.test_wecom import AES_KEY, TOKEN

    monkeypatch.setenv("WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")


async def test_wecom_messages_queued_at_shutdown_are_answered_once_after_the_restart(
        tmp_path, redis_server, wecom_env):
    fake = FakeWeCom()
    async with serve(fake.app()) as base:
        cfg = wecom_config(tmp_path, redis_server.url, base)

        async def send(api) -> None:
            for n, user in enumerate(("lisi", "wangwu")):
                status, _ = await post_callback(api, wechatpy_encrypt(text_xml(user, "你好", 7700 + n)))
                assert status == 200

        await stop_while_busy(cfg, send)
        assert redis_server.client().hlen("botd:inbox") == 2
        assert not [s for s in fake.sent if s["touser"] in ("lisi", "wangwu")]

        await restart_until_answered(cfg, redis_server)

    to = sorted(s["touser"] for s in fake.sent)
    assert to == ["lisi", "wangwu"], fake.sent


async def test_daemons_sharing_redis_replay_only_their_own_messages(tmp_path, redis_server):
    from core.inbox import Inbox
    from core.messages import InboundMessage
    from core.redis_store import RedisManager
    from tests.helpers import make_config

    manager = RedisManager(make_config(tmp_path, redis_server.url).redis, tmp_path)
    await manager.start()
    try:
        a, b = Inbox(manager, "botd", "host-a"), Inbox(manager, "botd", "host-b")
        msg = InboundMessage(platform="slack", bot="assistant", chat="C1", user="U1", text="hi", event_id="Ev1",
                             route={"channel": "C1"})
        assert await a.accept(msg, "slack")
        # The same event delivered to the other daemon is a duplicate there too.
        assert not await b.accept(InboundMessage(platform="slack", bot="assistant", chat="C1", user="U1",
                                                 text="hi", event_id="Ev1"), "slack")
        assert await b.pending() == []
        # host-a restarts: its new run finds the message its earlier run accepted.
        a = Inbox(manager, "botd", "host-a")
        [(connector, again)] = await a.pending()
        assert connector == "slack" and again.request_id == msg.request_id and again.route == {"channel": "C1"}
        assert again.resumed and again.durable
        await a.done(again)
        assert await a.pending() == []
    finally:
        await manager.close()
