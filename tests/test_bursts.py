"""Bursts ([queue] debounce_s): a question sent in three quick lines is answered once, as one turn,
also across a kill -9 of the daemon before or after the lines were merged; commands never wait.

The real daemon (in process, then as a ``botd run`` child killed with SIGKILL), the real model,
a real redis-server, python-telegram-bot against the fake Bot API.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from bots.bursts import merged
from core.inbox import Inbox
from core.messages import Attachment, InboundMessage
from tests.fakes import FakeTelegram, serve
from tests.helpers import free_port, make_config, running_daemon, wait_for
from tests.test_service import DaemonProcess, write_config
from tests.test_service import post_update as post_to_port
from tests.test_telegram import SECRET, post_update, private_update, stored

LINES = ["Hi", "my VPN keeps dropping", "since this morning, what should I try?"]


@pytest.fixture(autouse=True)
def tg_env(monkeypatch):
    monkeypatch.setenv("TG_TOKEN", "123456:TEST-token")
    monkeypatch.setenv("TG_SECRET", SECRET)


def _cfg(tmp_path, redis_url: str, base: str, debounce_s: float):
    section = {"token": "env:TG_TOKEN", "mode": "webhook", "api_base": base + "/bot",
               "webhook_secret": "env:TG_SECRET", "edit_interval_private_s": 0.3}
    return make_config(tmp_path, redis_url, telegram={"assistant": section}, model={"max_tokens": 16},
                       queue={"debounce_s": debounce_s, "notice_after_s": 0})


async def _true(value: bool) -> bool:
    return value


def sends_to(fake: FakeTelegram, chat: int) -> list[dict]:
    return [p for p in fake.of("sendMessage") if int(p["chat_id"]) == chat]


async def test_three_quick_lines_are_answered_once_as_one_turn(tmp_path, redis_server):
    fake = FakeTelegram()
    r = redis_server.client()
    async with serve(fake.app()) as base, running_daemon(_cfg(tmp_path, redis_server.url, base, 1.0)) as api:
        for line in LINES:
            assert await post_update(api, private_update(line, chat_id=601)) == 200
            await asyncio.sleep(0.2)
        await wait_for(lambda: _true(len(stored(redis_server, 601)) >= 2), timeout=90)
        await wait_for(lambda: _true(r.hlen("botd:inbox") == 0), timeout=30)
        await asyncio.sleep(1.5)  # a second or third answer would come now
    hist = stored(redis_server, 601)
    assert [h["role"] for h in hist] == ["user", "assistant"], hist
    assert hist[0]["content"] == "\n".join(LINES)
    assert len(sends_to(fake, 601)) == 1


async def test_commands_never_wait_and_close_the_burst_before_them(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base, running_daemon(_cfg(tmp_path, redis_server.url, base, 5.0)) as api:
        t0 = time.monotonic()
        assert await post_update(api, private_update("/help", chat_id=602)) == 200
        await wait_for(lambda: _true(bool(sends_to(fake, 602))), timeout=30)
        assert time.monotonic() - t0 < 4.0  # not held back for debounce_s (5 s)
        assert "/reset" in sends_to(fake, 602)[0]["text"]

        # A line, then a command: the command does not join the line (it closes the line's burst).
        assert await post_update(api, private_update("What is a VPN?", chat_id=603)) == 200
        assert await post_update(api, private_update("/help", chat_id=603)) == 200
        await wait_for(lambda: _true(len(stored(redis_server, 603)) == 2), timeout=60)
        await asyncio.sleep(0.5)
    assert stored(redis_server, 603)[0]["content"] == "What is a VPN?"
    assert len(sends_to(fake, 603)) == 2  # the help, and the answer


def _daemon_config(tmp_path, port: int, redis_url: str, base: str, debounce_s: float):
    path = write_config(tmp_path, port, redis_url, tg_base=base)
    text = path.read_text().replace("[queue]\nmax_size = 64\n",
                                    f"[queue]\nmax_size = 64\ndebounce_s = {debounce_s}\nnotice_after_s = 0\n")
    assert f"debounce_s = {debounce_s}" in text
    path.write_text(text)
    return path


def tg(n: int, text: str, chat: int) -> dict:
    return {"update_id": 91_000 + n, "message": {
        "message_id": 700 + n, "date": int(time.time()), "text": text,
        "chat": {"id": chat, "type": "private", "first_name": "U"},
        "from": {"id": chat, "is_bot": False, "first_name": "U"}}}


@pytest.mark.parametrize("kill_point", ["mid-burst", "merged"])
async def test_a_burst_is_answered_once_across_kill_9(tmp_path, redis_server, kill_point):
    fake = FakeTelegram()
    r = redis_server.client()
    chat = 604
    async with serve(fake.app()) as base:
        port = free_port()
        debounce = 4.0 if kill_point == "mid-burst" else 0.3
        daemon = DaemonProcess(_daemon_config(tmp_path, port, redis_server.url, base, debounce), port,
                               tmp_path / "botd.log")
        await daemon.start()
        try:
            async with aiohttp.ClientSession() as s:
                for i, line in enumerate(LINES):
                    assert await post_to_port(s, port, tg(i, line, chat)) == 200
                if kill_point == "mid-burst":
                    # Every line recorded on its own; the sender has not been quiet long enough yet.
                    assert r.hlen("botd:inbox") == 3
                else:
                    # The lines merged into the first one's record; killed before (or while) answering.
                    await wait_for(lambda: _true(r.hlen("botd:inbox") == 1), timeout=30, interval=0.005)
                daemon.signal(signal.SIGKILL)
                assert await daemon.wait() == -signal.SIGKILL
                assert r.hlen("botd:inbox") >= 1

                await daemon.start()
                # Telegram redelivering a line changes nothing.
                assert await post_to_port(s, port, tg(1, LINES[1], chat)) == 200
                await wait_for(lambda: _true(r.hlen("botd:inbox") == 0), timeout=120, interval=0.1)
                await asyncio.sleep(1.0)  # anything still to come would be a duplicate
        finally:
            daemon.ensure_dead()
    hist = [json.loads(h) for h in r.lrange(f"botd:hist:telegram:assistant:{chat}:", 0, -1)]
    assert [h["role"] for h in hist] == ["user", "assistant"], hist
    assert hist[0]["content"] == "\n".join(LINES)
    assert len(sends_to(fake, chat)) == 1


# -- the inbox's merge, on a real Redis -------------------------------------------------------------------


def piece(n: int, text: str, attachments: list[Attachment] | None = None) -> InboundMessage:
    return InboundMessage(platform="telegram", bot="assistant", chat="77", user="77", text=text,
                          event_id=f"ev{n}", attachments=attachments or [], route={"chat_id": 77, "reply_to": n})


async def test_the_inbox_merges_a_burst_in_one_step_with_every_pieces_words_and_files(manager):
    report = Attachment(kind="file", name="report.pdf", mime="application/pdf", size=1234, ref={"file_id": "F1"})
    shot = Attachment(kind="image", name="", ref={"file_id": "P2"})
    box = Inbox(manager, "botd", "box1")
    pieces = [piece(1, "Hi"), piece(2, "", [report]), piece(3, "what does page 2 say?", [shot])]
    for p in pieces:
        assert await box.accept(p, "telegram")
    lead = merged(pieces)
    assert lead.text == "Hi\nwhat does page 2 say?" and lead.attachments == [report, shot]
    assert lead.request_id == pieces[0].request_id and lead.route == pieces[0].route
    assert await box.merge(lead, pieces[1:], "telegram")
    r = manager.client
    assert await r.hlen("botd:inbox") == 1 and await r.xlen("botd:inbox:stream") == 1
    # Each piece was recorded (and deduplicated) on its own: a platform retry of one is still dropped.
    assert not await box.accept(piece(2, "", [report]), "telegram")
    # A restart finds the one merged turn, with every piece's words and files.
    [(connector, again)] = await Inbox(manager, "botd", "box1").pending()
    assert connector == "telegram" and again.text == lead.text and again.attachments == [report, shot]
    assert again.request_id == lead.request_id and again.route == lead.route


async def test_a_burst_is_not_merged_once_a_piece_is_another_daemons(manager):
    one = Inbox(manager, "botd", "box1", lease_s=0.05)
    pieces = [piece(11, "first"), piece(12, "second")]
    for p in pieces:
        assert await one.accept(p, "telegram")
    await asyncio.sleep(0.1)  # box1 stalled past its lease: box2 takes its messages over
    taken = await Inbox(manager, "botd", "box2", lease_s=0.05).claim()
    assert len(taken) == 2
    assert not await one.merge(merged(pieces), pieces[1:], "telegram")
    raw = await manager.client.hgetall("botd:inbox")
    assert sorted(json.loads(v)["msg"]["text"] for v in raw.values()) == ["first", "second"]  # unchanged


async def test_a_wecom_aibot_burst_in_callback_mode_closes_the_merged_messages_streams(tmp_path, redis_server,
                                                                                       monkeypatch):
    """WeCom opens a stream for each message (and counts it among the user's 3 places): the merged
    pieces' streams are finished at once, the first piece's stream carries the answer."""
    from tests.fake_wecom_aibot import CallbackSender, FakeAibot
    from tests.test_wecom_aibot import AES_KEY, TOKEN

    monkeypatch.setenv("WECOM_AIBOT_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AIBOT_AES_KEY", AES_KEY)
    fake = FakeAibot()
    async with serve(fake.app()) as base:
        fake.url = base
        bot = {"mode": "callback", "token": "env:WECOM_AIBOT_TOKEN", "encoding_aes_key": "env:WECOM_AIBOT_AES_KEY",
               "update_interval_s": 0.1}
        cfg = make_config(tmp_path, redis_server.url, wecom_aibot={"assistant": bot}, model={"max_tokens": 16},
                          queue={"debounce_s": 1.0, "notice_after_s": 0})
        async with running_daemon(cfg) as api, aiohttp.ClientSession() as session:
            sender = CallbackSender(fake, session, f"{api.base}/wecom_aibot/assistant", TOKEN, AES_KEY,
                                    refresh_every_s=0.1)
            talks = []
            for i, line in enumerate(LINES):
                talks.append(asyncio.create_task(sender.converse("qianqi", line, f"cb-burst{i}")))
                await asyncio.sleep(0.2)
            streams = await asyncio.wait_for(asyncio.gather(*talks), 90)
            # The user's places are free again: a next question opens its own stream.
            after = await sender.converse("qianqi", "Thanks!", "cb-after")
    hist = [json.loads(h) for h in redis_server.client().lrange("botd:hist:wecom_aibot:assistant:qianqi:", 0, -1)]
    assert [h["role"] for h in hist] == ["user", "assistant", "user", "assistant"]
    assert hist[0]["content"] == "\n".join(LINES)
    first, *merged_away = streams
    assert first is not None and first.finished and first.content.strip() not in ("", "…")
    assert all(st is not None and st.finished and st.content == "…" for st in merged_away)
    assert after is not None and after.finished and fake.errors == [] and fake.pushes == []
