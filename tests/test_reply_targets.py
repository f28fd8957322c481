"""Reply targets alone, each against its fake platform API: no model, no daemon, no Redis.

What a target owns is tested here: splitting, post-or-edit, remembering what it posted
(a target rebuilt after a restart edits, never posts again), obeying 429s, never
repeating a post that may have landed, and the bots layer's streaming policy on top.
"""

from __future__ import annotations

import time

import pytest
from slack_sdk.web.async_client import AsyncWebClient
from telegram import Bot

from bots.answers import TextAnswer
from bots.delivery import Delivery
from connectors.slack.connector import THINKING, SlackReply, markdown_to_mrkdwn
from connectors.telegram.connector import TelegramReply
from core.messages import Account, InboundMessage
from tests.fakes import FakeSlack, FakeTelegram, serve

SLACK = Account("slack", "assistant")
TELEGRAM = Account("telegram", "assistant")


def _msg(platform: str) -> InboundMessage:
    return InboundMessage(platform=platform, bot="assistant", chat="C1", user="U1", text="q")


def _slack(base: str, timeout: int = 30) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-test", base_url=base + "/api/", retry_handlers=[], timeout=timeout)


async def test_slack_target_posts_a_placeholder_then_updates_it_in_place():
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        target = SlackReply(SLACK, _slack(base), None, {"channel": "C1", "root": "1.0"},  # type: ignore[arg-type]
                            interval=0.05, follow=False)
        text = "**Ships** sail on the sea."
        final = await Delivery(_msg("slack"), target).stream(TextAnswer(text, "r1"))
    assert final == text
    posts, updates = fake.of("chat.postMessage"), fake.of("chat.update")
    assert [p["text"] for p in posts] == [THINKING]  # one post: the placeholder
    assert posts[0]["thread_ts"] == "1.0"
    assert updates and updates[-1]["text"] == markdown_to_mrkdwn(text)
    assert all(u["ts"] == target.sent[0][0] for u in updates)


async def test_slack_target_obeys_retry_after_on_update():
    fake = FakeSlack()
    fake.fail_next["chat.update"] = [(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"})]
    async with serve(fake.app()) as base:
        target = SlackReply(SLACK, _slack(base), None, {"channel": "C1"}, interval=0.05,  # type: ignore[arg-type]
                            follow=False)
        await target.show("first")
        t0 = time.monotonic()
        await target.show("second")
    updates = [(p, t) for m, p, t in fake.calls if m == "chat.update"]
    assert len(updates) == 2  # the refused update, then the one after the wait
    assert updates[1][1] - updates[0][1] >= 0.95
    assert updates[1][0]["text"] == "second" and time.monotonic() - t0 >= 0.95


async def test_slack_target_never_repeats_a_post_that_may_have_landed():
    fake = FakeSlack()
    fake.delay_next["chat.postMessage"] = 2.5  # longer than the client's timeout
    async with serve(fake.app()) as base:
        target = SlackReply(SLACK, _slack(base, timeout=1), None, {"channel": "C1"},  # type: ignore[arg-type]
                            interval=0.05, follow=False)
        with pytest.raises(TimeoutError):
            await target.show("hello")
    assert len(fake.of("chat.postMessage")) == 1


async def test_slack_target_rebuilt_after_a_restart_edits_what_it_posted():
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        target = SlackReply(SLACK, _slack(base), None, {"channel": "C1"}, interval=0.05,  # type: ignore[arg-type]
                            follow=False, sent=["1700000000.000200"])
        await target.show("the whole answer")
    assert not fake.of("chat.postMessage")
    assert [(u["ts"], u["text"]) for u in fake.of("chat.update")] == [("1700000000.000200", "the whole answer")]


async def test_telegram_target_records_each_post_before_the_next_and_edits_after_a_restart():
    fake = FakeTelegram()
    long = "\n\n".join(f"{i}. " + "A sentence of a long answer. " * 30 for i in range(8))
    assert len(long) > 4096
    async with serve(fake.app()) as base:
        async with Bot("123456:TEST-token", base_url=base + "/bot") as bot:
            target = TelegramReply(TELEGRAM, bot, {"chat_id": 4242}, interval=0.1)
            progress = [ids async for ids in target.updates(long)]
            # A restart: a new target knows the posted ids and edits them with the final text.
            again = TelegramReply(TELEGRAM, bot, {"chat_id": 4242}, interval=0.1, sent=progress[-1])
            await again.show(long.replace("long answer", "longer answer"))
    assert len(progress) == 2 and progress[0] == progress[1][:1]  # one record per new message
    assert len(fake.of("sendMessage")) == 2  # nothing posted again after the restart
    assert len(fake.of("editMessageText")) == 2
    assert all("longer answer" in m["text"] for m in fake.messages.values())


def test_unclosed_emphasis_in_a_long_answer_renders_in_linear_time():
    from connectors.slack.connector import _Mrkdwn
    from connectors.telegram.connector import _TelegramHtml

    for markup in (_Mrkdwn(), _TelegramHtml()):
        for text in ("*a " * 5400, "__a " * 4000, "**a " * 4000, "~~a " * 4000, "_a " * 5400):
            t0 = time.process_time()
            markup.render(text)
            # Quadratic scanning took 0.6-0.9 s a pattern here; linear takes a few ms.
            assert time.process_time() - t0 < 0.25, (type(markup).__name__, text[:4])
    # Emphasis still renders.
    assert _Mrkdwn().render("**bold** and *it* and ~~gone~~") == "*bold* and _it_ and ~gone~"
