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

from bots.daemon import Daemon
from tests.fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from tests.helpers import Client, free_port, make_config, wait_for
from tests.tcp_proxy import PausableProxy
from tests.test_notify import KEY as ROBOT_KEY
from tests.test_notify import FakeRobot
from tests.test_service import DaemonProcess, post_update
from tests.test_slack import SIGNING, event, post_event
from tests.test_wecom import AES_KEY, CORP, TOKEN, post_callback, text_xml, wechatpy_encrypt

LEASE_S = 3


@pytest.fixture(autouse=True)
def platform_env(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING)
    monkeypatch.setenv("WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")


def cluster_config(folder: Path, port: int, redis_url: str, name: str, *, tg: str, slack: str = "",
                   wecom: str = "", telegram_mode: str = "webhook", max_tokens: int = 12, lease_s: float = LEASE_S,
                   tg_token: str = "env:TG_TOKEN", redis_extra: str = "", extra: str = "") -> Path:
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
lease_s = {lease_s}
{redis_extra}

[bots.assistant]
system_prompt = "You are a helpful assistant. Answer in one short sentence."

[telegram.assistant]
token = "{tg_token}"
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
    path.write_text(text + extra)
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
        # Every message reaches all three boxes at the same instant, and the box that records it first
        # answers it: which box that is, is a race (answers per box measured: [25, 32, 3] answering each
        # at once, [1, 58, 1] with bursts, where one box records nearly all before the others run).
        # Answered at once ([queue] debounce_s = 0); how a load balancer's traffic is shared with
        # bursts on: tests/test_cluster_bursts.py.
        async with Cluster(tmp_path, redis_server.url, 3, tg=tgb, slack=slb, wecom=wcb,
                           extra="\n[queue]\ndebounce_s = 0\nnotice_after_s = 0\n") as cluster, \
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
    # WeCom app messages cannot be edited: a waiting notice ([queue] notice_after_s) is a message of its own.
    notices = [m["touser"] for m in wc.sent if m["text"]["content"].startswith("⏳")]
    assert len(notices) == len(set(notices))  # at most one per answer
    assert sorted(m["touser"] for m in wc.sent if not m["text"]["content"].startswith("⏳")) == sorted(
        f"user{i}" for i in range(n))
    assert sum(answered_by) == 3 * n


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


class TokenTelegram(FakeTelegram):
    """The fake Bot API, also recording which bot token made each call: two daemons configured
    with two tokens of one bot (same id) tell apart who posted and who edited."""

    def __init__(self) -> None:
        super().__init__()
        self.by_token: list[tuple[str, str, float]] = []  # (token, method, monotonic time)

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.by_token.append((request.match_info["token"], request.match_info["method"], time.monotonic()))
        return await super().handle(request)

    def shown_by(self, token: str) -> list[tuple[str, float]]:
        return [(m, t) for tok, m, t in self.by_token if tok == token and m in ("sendMessage", "editMessageText")]


async def test_a_daemon_cut_off_from_redis_stops_answering_and_the_message_is_answered_once(
        tmp_path, redis_server, monkeypatch):
    """Daemon A reaches Redis through a proxy; mid-answer the proxy stops forwarding for well over
    the lease. Daemon B takes the message over and finishes it, editing A's message. A must not
    post or edit once it lost the message: not while cut off (it cannot confirm it still owns
    it past half the lease), not after the partition heals (B owns it)."""
    lease = 2
    monkeypatch.setenv("TG_TOKEN_B", "123:bbb")  # the same bot (id 123), told apart by the fake
    tg = TokenTelegram()
    r = redis_server.client()
    fast_fail = "socket_timeout_s = 0.5"
    async with serve(tg.app()) as tgb, PausableProxy(redis_server.port) as proxy, aiohttp.ClientSession() as s:
        via_proxy = f"redis://127.0.0.1:{proxy.port}/0"
        port_a, port_b = free_port(), free_port()
        a = DaemonProcess(cluster_config(tmp_path / "a", port_a, via_proxy, "box-a", tg=tgb, max_tokens=400,
                                         lease_s=lease, redis_extra=fast_fail), port_a, tmp_path / "a.log")
        # B's own answer may be short: it only has to finish what A started (by editing A's post).
        b = DaemonProcess(cluster_config(tmp_path / "b", port_b, redis_server.url, "box-b", tg=tgb, max_tokens=60,
                                         lease_s=lease, redis_extra=fast_fail, tg_token="env:TG_TOKEN_B"),
                          port_b, tmp_path / "b.log")
        try:
            await asyncio.gather(a.start(), b.start())
            update = telegram_update(1, "Write a long essay about the sea, its storms and its sailors.")
            assert await post_update(s, port_a, update) == 200
            # A answers: its first words are on screen and recorded (so a take-over edits them).
            await wait_for(lambda: _async(tg.shown_by("123:abc") and r.hlen("botd:inbox:progress")), timeout=60,
                           interval=0.02)
            proxy.pause()
            cut_at = time.monotonic()
            await asyncio.sleep(lease * 2.5)  # cut off for well over the lease
            proxy.resume()
            await wait_for(lambda: _async(r.hlen("botd:inbox") == 0), timeout=90, interval=0.1)
            await asyncio.sleep(lease * 1.5)  # anything A still had to say would come now
        finally:
            for d in (a, b):
                if d.proc is not None and d.proc.poll() is None:
                    d.signal(signal.SIGTERM)
            for d in (a, b):
                if d.proc is not None:
                    await d.wait()
                d.ensure_dead()
    logs_b = [json.loads(x) for x in (tmp_path / "b.log").read_text().splitlines() if x.startswith("{")]
    assert any(x.get("event") == "answering messages another daemon left" for x in logs_b), "B did not take over"
    by_a, by_b = tg.shown_by("123:abc"), tg.shown_by("123:bbb")
    assert by_b, "B showed nothing"
    # The user sees one message: A posted it, B finished it by editing.
    assert [m for m, _ in by_a + by_b].count("sendMessage") == 1, (by_a, by_b)
    assert len(tg.messages) == 1
    # A stopped before B started, and never spoke again.
    assert max(t for _, t in by_a) < min(t for _, t in by_b), (
        f"A still posting {max(t for _, t in by_a) - min(t for _, t in by_b):.1f} s after B began")
    # Cut off, A stops within half the lease of its last confirmation (plus the transit of a call
    # already under way): well before the lease, when B could claim it.
    assert max(t for _, t in by_a) < cut_at + lease * 1.5, "A went on showing text while cut off"
    [shown] = tg.messages.values()
    assert shown["text"].strip() and "error on my side" not in shown["text"]


async def test_a_message_that_kills_every_daemon_goes_to_the_dead_letters(tmp_path, redis_server):
    """A message whose answer takes the process down (here: kill -9 while answering it) is not
    replayed at every start forever: handed out max_deliveries times, it goes to the dead-letter
    list with one error line and an admin alert, and the daemon runs on."""
    tg, robot = FakeTelegram(), FakeRobot()
    r = redis_server.client()
    async with serve(tg.app()) as tgb, serve(robot.app()) as robot_url, aiohttp.ClientSession() as s:
        port = free_port()
        notify = f'\n[notify]\nwecom_webhook = "env:BOTD_T_ROBOT"\nurl = "{robot_url}"\nlanguage = "en"\n'
        cfg = cluster_config(tmp_path / "d", port, redis_server.url, "box-d", tg=tgb, max_tokens=400,
                             redis_extra="max_deliveries = 2", extra=notify)
        env_robot = {"BOTD_T_ROBOT": ROBOT_KEY}
        update = telegram_update(7, "Write a long essay about the sea, its storms and its sailors.")
        log = tmp_path / "d.log"
        daemon = DaemonProcess(cfg, port, log)
        try:
            with pytest.MonkeyPatch.context() as mp:
                for k, v in env_robot.items():
                    mp.setenv(k, v)
                await daemon.start()
                assert await post_update(s, port, update) == 200  # delivery 1
                for _ in range(2):  # it kills the daemon; systemd restarts it; it kills it again
                    daemon.signal(signal.SIGKILL)
                    await daemon.wait()
                    assert r.hlen("botd:inbox") == 1
                    daemon = DaemonProcess(cfg, port, log)
                    await daemon.start()  # delivery 2, then 3: past max_deliveries
                await wait_for(lambda: _async(r.hlen("botd:inbox") == 0), timeout=30, interval=0.05)
                await wait_for(lambda: _async(robot.posts), timeout=15)
                await asyncio.sleep(1.0)
                assert await post_update(s, port, telegram_update(8, "/help")) == 200  # it runs on
                await wait_for(lambda: _async(any(int(p["chat_id"]) == 9008 for p in tg.of("sendMessage"))),
                               timeout=30)
                daemon.signal(signal.SIGTERM)
                assert await daemon.wait() == 0
        finally:
            daemon.ensure_dead()
    [letter] = [json.loads(x) for x in r.lrange("botd:inbox:dead", 0, -1)]
    assert letter["deliveries"] == 3 and letter["record"]["msg"]["chat"] == "9007"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    dead = [x for x in lines if x.get("event", "").startswith("message moved to the dead letters")]
    assert len(dead) == 1 and dead[0]["level"] == "error" and dead[0]["deliveries"] == 3
    [alert] = [c for c in robot.contents if "dead-letter" in c]
    assert "handed out 3 times" in alert and "botd:inbox:dead" in alert
    assert r.xlen("botd:inbox:stream") == 0


async def _async(value: object) -> bool:
    return bool(value)
