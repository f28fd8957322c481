"""Several daemons on one Redis: every platform message answered exactly once, whichever daemon
the platform reached, also when one of them dies; one answer at a time per thread, in order;
Telegram polling in exactly one daemon, moving when it dies; a scheduled ingest run once.

Three real ``botd run`` processes (127.0.0.1, their own ports), one real redis-server, the
fake Telegram, Slack and WeCom APIs; ``[redis] lease_s = 3`` so that take-overs are quick.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import Client, free_port, make_config, wait_for
from fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from test_service import DaemonProcess, post_update
from test_slack import SIGNING, event, post_event
from test_wecom import AES_KEY, CORP, TOKEN, post_callback, text_xml, wechatpy_encrypt

from bots.daemon import Daemon

LEASE_S = 3


@pytest.fixture(autouse=True)
def platform_env(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING)
    monkeypatch.setenv("WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")


def cluster_config(folder: Path, port: int, redis_url: str, name: str, *, tg: str, slack: str = "",
                   wecom: str = "", telegram_mode: str = "webhook", max_tokens: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{folder / 'state'}"
log_format = "json"
shutdown_grace_s = 5
instance = "{name}"

[model]
n_ctx = 1024
max_tokens = {max_tokens}
temperature = 0.0
seed = 42
n_threads = 1
parallel = 2

[redis]
url = "{redis_url}"
lease_s = {LEASE_S}

[bots.assistant]
system_prompt = "You are a helpful assistant. Answer in one short sentence."

[telegram.assistant]
token = "env:TG_TOKEN"
mode = "{telegram_mode}"
api_base = "{tg}/bot"
edit_interval_private_s = 0.2
poll_timeout_s = 1
"""
    if telegram_mode == "webhook":
        text += 'webhook_secret = "env:TG_SECRET"\n'
    if slack:
        text += f"""
[slack.assistant]
bot_token = "env:SLACK_BOT_TOKEN"
signing_secret = "env:SLACK_SIGNING_SECRET"
api_base = "{slack}/api/"
update_interval_s = 0.3
"""
    if wecom:
        text += f"""
[wecom.assistant]
corp_id = "{CORP}"
agent_id = 1000002
token = "env:WECOM_TOKEN"
encoding_aes_key = "env:WECOM_AES_KEY"
secret = "env:WECOM_SECRET"
api_base = "{wecom}"
"""
    path = folder / "config.toml"
    path.write_text(text)
    return path


class Cluster:
    def __init__(self, tmp_path: Path, redis_url: str, n: int, **platforms: str) -> None:
        self.daemons: list[DaemonProcess] = []
        for i in range(n):
            port = free_port()
            folder = tmp_path / f"botd{i}"
            cfg = cluster_config(folder, port, redis_url, f"box{i}", **platforms)
            self.daemons.append(DaemonProcess(cfg, port, folder / "botd.log"))

    async def __aenter__(self) -> Cluster:
        await asyncio.gather(*(d.start() for d in self.daemons))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for d in self.daemons:
            d.ensure_dead()

    async def stop(self) -> None:
        """SIGTERM to every daemon still running; their logs are complete afterwards."""
        live = [d for d in self.daemons if d.proc is not None and d.proc.poll() is None]
        for d in live:
            d.signal(signal.SIGTERM)
        assert await asyncio.gather(*(d.wait() for d in live)) == [0] * len(live)

    def logs(self, i: int) -> list[dict]:
        text = self.daemons[i].log.read_text()
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def telegram_update(n: int, text: str | None = None, chat: int | None = None) -> dict:
    chat = chat if chat is not None else 9000 + n
    return {"update_id": 50_000 + n, "message": {
        "message_id": 300 + n, "date": int(time.time()), "text": text or f"Say hello to number {n}.",
        "chat": {"id": chat, "type": "private", "first_name": "U"},
        "from": {"id": chat, "is_bot": False, "first_name": "U"}}}


async def inbox_empty(r) -> bool:
    return r.hlen("botd:inbox") == 0


async def test_a_retry_storm_across_three_daemons_is_answered_exactly_once(tmp_path, redis_server):
    tg, sl, wc = FakeTelegram(), FakeSlack(), FakeWeCom()
    n = 20
    r = redis_server.client()
    async with serve(tg.app()) as tgb, serve(sl.app()) as slb, serve(wc.app()) as wcb:
        async with Cluster(tmp_path, redis_server.url, 3, tg=tgb, slack=slb, wecom=wcb) as cluster, \
                aiohttp.ClientSession() as s:
            clients = [Client(f"http://127.0.0.1:{d.port}", s, None) for d in cluster.daemons]  # type: ignore[arg-type]
            slack_events = [event("app_mention", f"<@UBOT> Say hello to number {i}.", channel=f"C{i}", user=f"U{i}")
                            for i in range(n)]
            wecom_bodies = [wechatpy_encrypt(text_xml(f"user{i}", f"Say hello to number {i}.", 80_000 + i))
                            for i in range(n)]
            deliveries = []
            for i in range(n):
                for k in range(3):  # every platform delivers every message to every daemon
                    c = clients[(i + k) % 3]
                    deliveries.append(post_update(s, int(c.base.rsplit(":", 1)[1]), telegram_update(i)))
                    deliveries.append(post_event(c, slack_events[i]))
                    deliveries.append(post_callback(c, wecom_bodies[i]))
            results = await asyncio.gather(*deliveries)
            statuses = [x if isinstance(x, int) else x[0] for x in results]
            assert set(statuses) == {200}, statuses
            try:
                await wait_for(lambda: inbox_empty(r), timeout=240, interval=0.2)
            except AssertionError:
                print("left in the inbox:", r.hgetall("botd:inbox"), r.xpending("botd:inbox:stream", "botd"),
                      {k: r.get(k) for k in r.keys("botd:lease:*")})
                raise
            await asyncio.sleep(1.0)  # anything still to come would be a duplicate
            await cluster.stop()
            answered_by = [sum(1 for x in cluster.logs(i) if x.get("event") == "answered") for i in range(3)]
    assert sorted(int(p["chat_id"]) for p in tg.of("sendMessage")) == [9000 + i for i in range(n)]
    assert sorted(p["channel"] for p in sl.of("chat.postMessage")) == sorted(f"C{i}" for i in range(n))
    assert sorted(m["touser"] for m in wc.sent) == sorted(f"user{i}" for i in range(n))
    assert sum(answered_by) == 3 * n
    assert sum(1 for a in answered_by if a) >= 2, answered_by  # the work was shared


async def test_a_killed_daemons_messages_are_finished_by_another_once(tmp_path, redis_server):
    tg = FakeTelegram()
    r = redis_server.client()
    n = 6
    async with serve(tg.app()) as tgb:
        async with Cluster(tmp_path, redis_server.url, 2, tg=tgb) as cluster, aiohttp.ClientSession() as s:
            victim, other = cluster.daemons
            statuses = await asyncio.gather(*(post_update(s, victim.port, telegram_update(i)) for i in range(n)))
            assert statuses == [200] * n
            # Mid-answer: one answer is on screen (its message id recorded), the rest still to come.
            await wait_for(lambda: _async(r.hlen("botd:inbox:progress") > 0), timeout=60, interval=0.01)
            victim.signal(signal.SIGKILL)
            await victim.wait()
            t0 = time.monotonic()
            assert r.hlen("botd:inbox") > 0
            await wait_for(lambda: inbox_empty(r), timeout=120, interval=0.1)
            took = time.monotonic() - t0
            await asyncio.sleep(1.0)
            await cluster.stop()
            took_over = [x for x in cluster.logs(1) if x.get("event") == "answering messages another daemon left"]
    assert took_over, "the surviving daemon did not take over"
    chats = sorted(int(p["chat_id"]) for p in tg.of("sendMessage"))
    assert chats == [9000 + i for i in range(n)], chats  # each answer posted once: edited, not re-posted
    for msg in tg.messages.values():
        assert msg["text"].strip() and "error on my side" not in msg["text"]
    print(f"taken over and finished {took:.1f} s after the kill (lease {LEASE_S} s)")


async def test_two_messages_of_one_thread_at_two_daemons_are_answered_in_order(tmp_path, redis_server):
    tg = FakeTelegram()
    r = redis_server.client()
    async with serve(tg.app()) as tgb:
        async with Cluster(tmp_path, redis_server.url, 2, tg=tgb) as cluster, aiohttp.ClientSession() as s:
            first = telegram_update(1, "My name is Ada.", chat=777)
            second = telegram_update(2, "What is my name?", chat=777)
            statuses = await asyncio.gather(post_update(s, cluster.daemons[0].port, first),
                                            post_update(s, cluster.daemons[1].port, second))
            assert statuses == [200, 200]
            await wait_for(lambda: inbox_empty(r), timeout=120, interval=0.1)
            await cluster.stop()
            lines = [x for i in range(2) for x in cluster.logs(i)
                     if x.get("event") == "answered" and x.get("chat") == "777"]
    hist = [json.loads(h) for h in r.lrange("botd:hist:telegram:assistant:777:", 0, -1)]
    assert [h["role"] for h in hist] == ["user", "assistant", "user", "assistant"]
    # One after the other: the second answer was written with the first exchange in its prompt.
    assert sorted(x["history_used"] for x in lines) == [0, 2], lines
    later = next(x for x in lines if x["history_used"] == 2)
    assert later["request_id"] != next(x for x in lines if x["history_used"] == 0)["request_id"]


async def test_telegram_polling_runs_in_one_daemon_and_moves_when_it_dies(tmp_path, redis_server):
    tg = FakeTelegram()
    r = redis_server.client()
    async with serve(tg.app()) as tgb:
        async with Cluster(tmp_path, redis_server.url, 3, tg=tgb, telegram_mode="polling") as cluster:
            def pollers() -> list[int]:
                return [i for i in range(3) if cluster.daemons[i].proc.poll() is None and any(
                    x.get("event") == "telegram polling runs in this daemon" for x in cluster.logs(i))]

            await wait_for(lambda: _async(len(pollers()) == 1), timeout=30)
            await asyncio.sleep(LEASE_S)  # renewed: still one
            [holder] = pollers()
            tg.push_update(telegram_update(1))
            await wait_for(lambda: _async(len(tg.of("sendMessage")) == 1 and r.hlen("botd:inbox") == 0), timeout=60)
            cluster.daemons[holder].signal(signal.SIGKILL)
            await cluster.daemons[holder].wait()
            t0 = time.monotonic()
            await wait_for(lambda: _async(len(pollers()) == 1), timeout=LEASE_S * 4)
            moved = time.monotonic() - t0
            assert pollers()[0] != holder
            tg.push_update(telegram_update(2))
            await wait_for(lambda: _async(len(tg.of("sendMessage")) == 2 and r.hlen("botd:inbox") == 0), timeout=60)
            await asyncio.sleep(1.0)
    assert sorted(int(p["chat_id"]) for p in tg.of("sendMessage")) == [9001, 9002]  # each once
    print(f"polling moved {moved:.1f} s after the kill (lease {LEASE_S} s)")


async def test_a_scheduled_ingest_runs_once_across_daemons(tmp_path, redis_server):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text("# Leave\n\nEmployees get 25 days of paid leave a year.\n")
    shared = {"server": {"state_dir": str(tmp_path / "shared-state")},
              "knowledge": {"hr": {"paths": [str(docs)], "schedule": "0 3 * * *"}},
              "bots": {"assistant": {"knowledge": ["hr"]}}}
    one = Daemon(make_config(tmp_path, redis_server.url, **shared))
    two = Daemon(make_config(tmp_path, redis_server.url, **shared, api={"enabled": False}))
    await one.start()
    await two.start()
    try:
        await wait_for(lambda: _async(all(d.runtime.knowledge_state.get("hr") == "ready" for d in (one, two))),
                       timeout=120, interval=0.2)
        reports = await asyncio.gather(one.knowledge.scheduled_ingest("hr"), two.knowledge.scheduled_ingest("hr"))
        assert sum(rep is not None for rep in reports) == 1, reports  # the 03:00 run, once
        await two.knowledge.watch()
        await one.knowledge.watch()
        assert one.runtime.retriever.search(["hr"], "How many days of paid leave?")
        assert two.runtime.retriever.search(["hr"], "How many days of paid leave?")
    finally:
        await two.stop(grace_s=1)
        await one.stop(grace_s=1)


async def _async(value: object) -> bool:
    return bool(value)
