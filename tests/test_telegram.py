"""Telegram with python-telegram-bot for real, against a fake Bot API on 127.0.0.1,
the real daemon and the real model."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from telegram import Bot

from bots.answers import TextAnswer
from bots.commands import KNOWN
from bots.delivery import Delivery
from connectors.telegram.connector import TelegramReply, command_of, markdown_to_html
from core.messages import Account, InboundMessage, ThreadKey
from tests.fakes import FakeTelegram, serve
from tests.helpers import make_config, running_daemon, wait_for

SECRET = "wh-secret_123"
USER = {"id": 4242, "is_bot": False, "first_name": "Ada"}
_ids = iter(range(1000, 100000))


def private_update(text: str, update_id: int | None = None, chat_id: int = 4242) -> dict:
    uid = update_id if update_id is not None else next(_ids)
    return {"update_id": uid, "message": {
        "message_id": uid, "date": int(time.time()), "text": text,
        "chat": {"id": chat_id, "type": "private", "first_name": "Ada"}, "from": USER}}


def group_update(text: str, *, entities=None, topic: int | None = None, chat_id: int = -100777, user=USER) -> dict:
    uid = next(_ids)
    msg = {"message_id": uid, "date": int(time.time()), "text": text, "from": user,
           "chat": {"id": chat_id, "type": "supergroup", "title": "Team", "is_forum": topic is not None}}
    if entities:
        msg["entities"] = entities
    if topic is not None:
        msg["message_thread_id"] = topic
        msg["is_topic_message"] = True
    return {"update_id": uid, "message": msg}


def tg_config(tmp_path, redis_url, api_base, mode="webhook", **extra):
    section = {"token": "env:TG_TOKEN", "mode": mode, "api_base": api_base + "/bot",
               "edit_interval_private_s": 0.5, "edit_interval_group_s": 0.5, "poll_timeout_s": 1, **extra}
    if mode == "webhook":
        section["webhook_secret"] = "env:TG_SECRET"
    return make_config(tmp_path, redis_url, telegram={"assistant": section}, model={"max_tokens": 48})


@pytest.fixture(autouse=True)
def tg_env(monkeypatch):
    monkeypatch.setenv("TG_TOKEN", "123456:TEST-token")
    monkeypatch.setenv("TG_SECRET", SECRET)


async def post_update(api, update, secret: str | None = SECRET, raw: bytes | None = None):
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    body = raw if raw is not None else json.dumps(update).encode()
    async with api.session.post(f"{api.base}/telegram/assistant", data=body, headers=headers) as r:
        return r.status


def stored(redis_server, chat, thread=""):
    key = "botd:hist:" + ThreadKey("telegram", "assistant", str(chat), thread).redis_suffix()
    return [json.loads(x) for x in redis_server.client().lrange(key, 0, -1)]


async def until(pred, timeout=60):
    async def check() -> bool:
        return pred()
    await wait_for(check, timeout=timeout)


async def _streamed_private_answer(fake, redis_server, api, deliver) -> None:
    start = len(fake.calls)
    t0 = time.monotonic()
    await deliver(private_update("Tell me a long story about a brave knight."))
    await until(lambda: len(stored(redis_server, 4242)) == 2)
    answer = stored(redis_server, 4242)[1]["content"]

    def shown() -> str:
        texts = [p["text"] for m, p, _ in fake.calls[start:] if m in ("sendMessage", "editMessageText")]
        return texts[-1] if texts else ""

    # the last edit keeps the interval too: wait for it
    await until(lambda: shown() == markdown_to_html(answer), timeout=5)
    duration = time.monotonic() - t0
    calls = fake.calls[start:]
    sends = [p for m, p, _ in calls if m == "sendMessage"]
    edits = [p for m, p, _ in calls if m == "editMessageText"]
    assert len(sends) == 1
    assert len(edits) <= duration / 0.5 + 2
    final = (edits or sends)[-1]
    assert final["text"] == markdown_to_html(answer)
    assert final.get("parse_mode") == "HTML"
    assert any(m == "sendChatAction" and p["action"] == "typing" for m, p, _ in calls)


async def test_private_message_streams_over_webhook(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base, running_daemon(tg_config(tmp_path, redis_server.url, base)) as api:
        async def deliver(update):
            assert await post_update(api, update) == 200
        await _streamed_private_answer(fake, redis_server, api, deliver)


async def test_private_message_streams_over_polling(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base, mode="polling")
        async with running_daemon(cfg) as api:
            async def deliver(update):
                fake.push_update(update)
            await _streamed_private_answer(fake, redis_server, api, deliver)
            assert fake.of("getUpdates")


async def test_webhook_secret_body_and_redelivery(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base, running_daemon(tg_config(tmp_path, redis_server.url, base)) as api:
        before = len(fake.calls)
        assert await post_update(api, private_update("hi"), secret=None) == 401
        assert await post_update(api, private_update("hi"), secret="wrong") == 401
        assert await post_update(api, None, raw=b"{broken") == 400
        assert await post_update(api, None, raw=b'{"message": {}}') == 400
        await asyncio.sleep(0.5)
        assert len(fake.calls) == before  # nothing was processed
        update = private_update("Hello!")
        for _ in range(3):
            assert await post_update(api, update) == 200
        await until(lambda: len(stored(redis_server, 4242)) == 2)
        await asyncio.sleep(1.0)
        assert len(fake.of("sendMessage")) == 1
        assert len(stored(redis_server, 4242)) == 2


async def test_group_mentions_topics_and_reset(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base, running_daemon(tg_config(tmp_path, redis_server.url, base)) as api:
        assert await post_update(api, group_update("just chatting among humans")) == 200
        await asyncio.sleep(1.0)
        assert fake.of("sendMessage") == []
        # a mention after an emoji: entity offsets count UTF-16 units (the emoji is 2)
        text = "😀 @botd_test_bot what is two plus two?"
        mention = {"type": "mention", "offset": 3, "length": len("@botd_test_bot")}
        assert await post_update(api, group_update(text, entities=[mention], topic=11)) == 200
        await until(lambda: len(stored(redis_server, -100777, "11")) == 2)
        asked = stored(redis_server, -100777, "11")[0]["content"]
        assert "@botd_test_bot" not in asked and "two plus two" in asked
        mention2 = {"type": "mention", "offset": 0, "length": len("@botd_test_bot")}
        await post_update(api, group_update("@botd_test_bot tell me about the sea", entities=[mention2], topic=22))
        await until(lambda: len(stored(redis_server, -100777, "22")) == 2)
        # separate histories per topic, and answers in the right topic
        assert stored(redis_server, -100777, "11") != stored(redis_server, -100777, "22")
        threads = {p.get("message_thread_id") for p in fake.of("sendMessage")}
        assert threads == {"11", "22"}
        # a command for this bot; /reset clears that topic only
        await post_update(api, group_update("/reset@botd_test_bot", topic=11))
        await until(lambda: not stored(redis_server, -100777, "11"))
        await asyncio.sleep(0.3)
        assert len(stored(redis_server, -100777, "22")) == 2
        # a command for another bot is not ours
        n = len(fake.of("sendMessage"))
        await post_update(api, group_update("/reset@other_bot", topic=22))
        await asyncio.sleep(0.8)
        assert len(fake.of("sendMessage")) == n and len(stored(redis_server, -100777, "22")) == 2


async def test_per_member_history_and_non_text(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base, group_history="member", allow_users=[4242, 5151])
        async with running_daemon(cfg) as api:
            m = {"type": "mention", "offset": 0, "length": 14}
            await post_update(api, group_update("@botd_test_bot hello", entities=[m]))
            other = {"id": 5151, "is_bot": False, "first_name": "Bo"}
            await post_update(api, group_update("@botd_test_bot hi there", entities=[m], user=other))
            await until(lambda: len(stored(redis_server, -100777, "/4242")) == 2
                        and len(stored(redis_server, -100777, "/5151")) == 2)
            stranger = {"id": 6000, "is_bot": False, "first_name": "X"}
            n = len(fake.of("sendMessage"))
            await post_update(api, group_update("@botd_test_bot hey", entities=[m], user=stranger))
            photo = private_update("x")
            del photo["message"]["text"]
            # A sticker: nothing botd reads (a photo is an attachment now).
            photo["message"]["sticker"] = {"file_id": "f", "file_unique_id": "u", "width": 1, "height": 1,
                                           "is_animated": False, "is_video": False, "type": "regular"}
            await post_update(api, photo)
            await until(lambda: len(fake.of("sendMessage")) == n + 1)
            await asyncio.sleep(0.5)
            assert len(fake.of("sendMessage")) == n + 1  # the stranger got nothing
            assert "text only" in fake.of("sendMessage")[-1]["text"]


async def test_rate_limit_and_entity_fallback(tmp_path, redis_server):
    fake = FakeTelegram()
    fake.fail_next["sendMessage"] = [{"ok": False, "error_code": 400,
                                      "description": "Bad Request: can't parse entities: unexpected end tag"}]
    fake.fail_next["editMessageText"] = [{"ok": False, "error_code": 429, "description": "Too Many Requests: retry "
                                          "after 2", "parameters": {"retry_after": 2}}]
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_tokens": 200})})
        async with running_daemon(cfg) as api:
            await post_update(api, private_update("Write a long essay about the history of ships."))
            await until(lambda: len(stored(redis_server, 4242)) == 2)
            answer = stored(redis_server, 4242)[1]["content"]
            await until(lambda: fake.of("editMessageText")[-1]["text"] == answer, timeout=5)
    sends = [(p, t) for m, p, t in fake.calls if m == "sendMessage"]
    assert sends[0][0].get("parse_mode") == "HTML" and "parse_mode" not in sends[1][0]  # fell back to plain
    edits = [(p, t) for m, p, t in fake.calls if m == "editMessageText"]
    assert len(edits) >= 2
    assert edits[1][1] - edits[0][1] >= 1.95  # the 429's retry_after was obeyed
    assert all("parse_mode" not in p for p, _ in edits)
    assert edits[-1][0]["text"] == answer


async def test_5000_character_answer_arrives_as_two_messages():
    fake = FakeTelegram()
    paragraph = "This paragraph is one of several that make up a very long answer. " * 6
    text = "\n\n".join(f"{i}. {paragraph}" for i in range(13))
    assert 4096 < len(text) < 6000
    async with serve(fake.app()) as base:
        async with Bot("123456:TEST-token", base_url=base + "/bot") as bot:
            # The reply target alone, with the bots layer's streaming policy and no model.
            target = TelegramReply(Account("telegram", "assistant"), bot, {"chat_id": 4242}, interval=0.1)
            msg = InboundMessage(platform="telegram", bot="assistant", chat="4242", user="1", text="q")
            await Delivery(msg, target).stream(TextAnswer(text, "r1"))
    sends = fake.of("sendMessage")
    assert len(sends) == 2
    assert all(len(p["text"]) <= 4096 for p in sends)
    assert sends[0]["text"].endswith(paragraph.strip()) or sends[0]["text"].endswith("\n\n")
    assert sends[1]["text"].lstrip().startswith(tuple(f"{i}." for i in range(13)))


def test_command_parsing():
    assert command_of("/reset", "botd_test_bot", KNOWN) == "reset"
    assert command_of("/reset@Botd_Test_Bot", "botd_test_bot", KNOWN) == "reset"
    assert command_of("/reset@other_bot", "botd_test_bot", KNOWN) is None
    assert command_of("/weather", "botd_test_bot", KNOWN) is None
    assert command_of("/reset", "", KNOWN) == "reset"  # our username not known yet: only an unaddressed one
    assert command_of("/reset@botd_test_bot", "", KNOWN) is None


async def test_set_and_delete_webhook_cli(tmp_path, redis_server):
    import subprocess
    import sys
    from pathlib import Path

    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\n[telegram.assistant]\ntoken = "env:TG_TOKEN"\n'
                       f'mode = "webhook"\nwebhook_url = "https://bot.example.com/telegram/assistant"\n'
                       f'webhook_secret = "env:TG_SECRET"\napi_base = "{base}/bot"\n')
        botd = str(Path(sys.executable).parent / "botd")
        res = await asyncio.to_thread(subprocess.run, [botd, "telegram", "set-webhook", "assistant", "--config",
                                                        str(cfg)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert fake.webhook["url"] == "https://bot.example.com/telegram/assistant"
        assert fake.webhook["secret_token"] == SECRET
        assert json.loads(fake.webhook["allowed_updates"]) == ["message", "callback_query"]  # + the 👍 / 👎 buttons
        res = await asyncio.to_thread(subprocess.run, [botd, "telegram", "delete-webhook", "assistant", "--config",
                                                        str(cfg)], capture_output=True, text=True)
        assert res.returncode == 0 and fake.webhook is None


def test_markdown_to_telegram_html():
    md = ("# Title\n**bold** and *it* and _it2_ and snake_case_var and a<b & c\n- item\n"
          "```py\nx = 1 < 2\n```\nsee [site](https://x.org/a?b=1&c=2) and `co*de*` ~~gone~~")
    assert markdown_to_html(md) == (
        "<b>Title</b>\n<b>bold</b> and <i>it</i> and <i>it2</i> and snake_case_var and a&lt;b &amp; c\n• item\n"
        '<pre><code class="language-py">x = 1 &lt; 2</code></pre>\n'
        'see <a href="https://x.org/a?b=1&amp;c=2">site</a> and <code>co*de*</code> <s>gone</s>')


def test_a_link_cannot_break_out_of_its_telegram_tag():
    """Model or tool output whose link URL or label carries markup: one <a> with a quoted href,
    nothing else becomes a tag."""
    import re

    out = markdown_to_html('[d<b>x</b>](https://x.io"><i>pwn</i>) [ok](https://y.io/a|b) <b>raw</b>')
    assert re.findall(r"<[^>]*>", out) == ['<a href="https://x.io%22%3E%3Ci%3Epwn%3C/i%3E">', "</a>",
                                           '<a href="https://y.io/a%7Cb">', "</a>"], out
    assert "d&lt;b&gt;x&lt;/b&gt;" in out and "&lt;b&gt;raw&lt;/b&gt;" in out  # shown as text, never tags
