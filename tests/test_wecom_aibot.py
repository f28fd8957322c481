"""WeCom AI bot (智能机器人): the reply target alone against the fake WeCom long connection (no
model), the real daemon and model over the long connection and in callback mode, and a
``kill -9`` of a real ``botd run`` process in the middle of answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from connectors.config import config_from_dict
from connectors.textsplit import utf8_len
from connectors.wecom_aibot import AibotLink, AibotReply, Slots
from connectors.wecom_aibot.config import WecomAibotConfig
from connectors.wecom_aibot.connector import SocketChannel
from core.config import ConfigError
from core.kv import KeyValueCache
from core.messages import Account
from tests.fake_wecom_aibot import STREAM_BYTES, CallbackSender, FakeAibot
from tests.fakes import serve
from tests.helpers import free_port, make_config, running_daemon, wait_for
from tests.test_service import DaemonProcess

SECRET = "aibot-long-secret"
# Tencent's WXBizMsgCrypt sample Token and EncodingAESKey (the AI bot uses the same crypto).
TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"


@pytest.fixture(autouse=True)
def aibot_env(monkeypatch):
    monkeypatch.setenv("WECOM_AIBOT_SECRET", SECRET)
    monkeypatch.setenv("WECOM_AIBOT_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AIBOT_AES_KEY", AES_KEY)


def aibot_config(tmp_path, redis_url, fake: FakeAibot, max_tokens: int = 48, **extra):
    bot = {"mode": "websocket", "bot_id": fake.bot_id, "secret": "env:WECOM_AIBOT_SECRET", "ws_url": fake.ws_url,
           "update_interval_s": 0.1, "heartbeat_s": 1, **extra}
    return make_config(tmp_path, redis_url, wecom_aibot={"assistant": bot}, model={"max_tokens": max_tokens},
                       redis={"lease_s": 3})


@contextlib.asynccontextmanager
async def fake_server(fake: FakeAibot) -> AsyncIterator[FakeAibot]:
    async with serve(fake.app()) as base:
        fake.url = base
        yield fake


@contextlib.asynccontextmanager
async def linked(fake: FakeAibot) -> AsyncIterator[AibotLink]:
    """botd's long-connection client subscribed to the fake, with nobody handling messages."""
    async def ignore(frame) -> None:
        return None

    link = AibotLink("assistant", fake.ws_url, fake.bot_id, SECRET, 30, ignore)
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(link.session(http, lambda: True))
        await link.wait_ready(5)
        try:
            yield link
        finally:
            await link.close()
            await asyncio.gather(task, return_exceptions=True)


async def socket_target(fake, link, cache, cfg, user: str, slots: Slots | None = None) -> AibotReply:
    req_id = await fake.send_message(user, "question")
    return AibotReply(Account("wecom_aibot", "assistant"), cfg, SocketChannel(link, req_id, user, live=True), cache,
                      stream_id=f"s-{req_id}", user=user, slots=slots or Slots())


def unit_cfg(**extra) -> WecomAibotConfig:
    return WecomAibotConfig(bot_id="aib-test-bot", secret="env:WECOM_AIBOT_SECRET", **extra)


# -- configuration ---------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    def load(bot):
        return config_from_dict({"wecom_aibot": {"assistant": bot}}, tmp_path / "config.toml")

    with pytest.raises(ConfigError, match="bot_id"):
        load({"secret": "env:WECOM_AIBOT_SECRET"})
    with pytest.raises(ConfigError, match="encoding_aes_key"):
        load({"mode": "callback", "token": "env:WECOM_AIBOT_TOKEN"})
    with pytest.raises(ConfigError, match=r"wecom_aibot\.assistant\.group_history"):
        load({"bot_id": "b", "secret": "env:WECOM_AIBOT_SECRET", "group_history": "everyone"})
    with pytest.raises(ConfigError, match=r"wecom_aibot\.nobody"):
        config_from_dict({"wecom_aibot": {"nobody": {"bot_id": "b", "secret": "env:WECOM_AIBOT_SECRET"}}},
                         tmp_path / "config.toml")
    cfg = load({"bot_id": "b", "secret": "env:WECOM_AIBOT_SECRET"})
    assert cfg.wecom_aibot["assistant"].stream_window_s == 330 and cfg.wecom_aibot["assistant"].max_in_flight == 3


# -- the reply target alone, against the fake long connection (no model) ---------------------------


async def test_a_long_answer_fills_the_stream_then_continues_by_push(manager):
    fake = FakeAibot()
    text = "企业微信智能机器人的流式消息最多两万零四百八十个字节，超出的部分主动推送。" * 700
    assert utf8_len(text) > 3 * STREAM_BYTES
    async with fake_server(fake), linked(fake) as link:
        target = await socket_target(fake, link, KeyValueCache(manager, "botd"), unit_cfg(), "qianqi")
        for n in (200, 3000, 7000, 9000, len(text)):  # the answer growing, as Delivery shows it
            await target.show(text[:n])
        await target.closed(text)
    assert fake.errors == []
    [st] = fake.streams.values()
    assert st.finished and utf8_len(st.content) <= STREAM_BYTES and len(st.contents) >= 3
    pushes = [p["content"] for p in fake.pushes]
    assert len(pushes) >= 2 and all(utf8_len(p) <= STREAM_BYTES for p in pushes)
    assert st.content + "".join(pushes) == text  # nothing lost, nothing twice


async def test_the_stream_is_kept_alive_and_finished_within_the_window(manager):
    fake = FakeAibot(window_s=2.5)  # WeCom: 6 minutes
    async with fake_server(fake), linked(fake) as link:
        cfg = unit_cfg(stream_window_s=1.5, keepalive_s=1.0)
        target = await socket_target(fake, link, KeyValueCache(manager, "botd"), cfg, "sunba")
        await target.show("The first part.")
        await asyncio.sleep(2.0)  # the model is slow: a keepalive, then the window ends
        await target.show("The first part. The second part.")
        await target.closed("The first part. The second part. The end.")
    assert fake.errors == []
    [st] = fake.streams.values()
    assert st.finished and st.finished_at - st.opened_at < fake.window_s
    assert st.contents.count("The first part.") >= 3  # opened, kept alive, finished
    assert [p["content"] for p in fake.pushes] == [" The second part. The end."]


async def test_a_fourth_answer_for_one_user_waits_for_a_free_place(manager):
    fake = FakeAibot()
    async with fake_server(fake), linked(fake) as link:
        cache, slots = KeyValueCache(manager, "botd"), Slots()
        targets = [await socket_target(fake, link, cache, unit_cfg(), "zhouwu", slots) for _ in range(5)]
        shows = [asyncio.create_task(t.show(f"answer {i}")) for i, t in enumerate(targets)]
        await wait_for(lambda: _async(sum(s.done() for s in shows) == 3))
        await asyncio.sleep(0.3)  # the other two wait: no place is free
        assert sum(s.done() for s in shows) == 3 and len(fake.open_streams("zhouwu")) == 3
        await targets[0].closed("answer 0")
        await wait_for(lambda: _async(sum(s.done() for s in shows) == 4))
        for i, t in enumerate(targets[1:], 1):
            await wait_for(lambda t=t: _async(t.stream_open))
            await t.closed(f"answer {i}")
        assert fake.errors == []  # never more than 3 in flight, none refused
        assert sum(s.finished for s in fake.streams.values()) == 5
        # The fake does enforce it: a 4th stream beside 3 open ones is refused.
        reqs = [await fake.send_message("wuj", "q") for _ in range(4)]
        codes = []
        for i, req in enumerate(reqs):
            with contextlib.suppress(Exception):
                await link.request("aibot_respond_msg", req, {"msgtype": "stream",
                                                              "stream": {"id": f"x{i}", "finish": False,
                                                                         "content": "…"}})
                codes.append(0)
        assert codes == [0, 0, 0] and len(fake.errors) == 1


async def _async(value):
    return value


# -- the daemon over the long connection -------------------------------------------------------------


async def test_messages_are_streamed_in_updates_and_finished_once(tmp_path, redis_server):
    fake = FakeAibot()
    async with fake_server(fake):
        cfg = aibot_config(tmp_path, redis_server.url, fake, max_tokens=32, group_history="member")
        async with running_daemon(cfg):
            await wait_for(lambda: _async(fake.connected()), timeout=10)
            t0 = time.monotonic()
            await fake.send_message("zhangsan", "Write three sentences about rivers.", msgid="m-1")

            async def finished() -> bool:
                return any(s.finished for s in fake.streams.values() if s.user == "zhangsan")

            await wait_for(finished, timeout=60)
            print(f"answered in {time.monotonic() - t0:.2f} s")
            [st] = [s for s in fake.streams.values() if s.user == "zhangsan"]
            assert len(st.contents) >= 3, st.contents  # opened, updated, finished
            assert all(b.startswith(a) for a, b in zip(st.contents, st.contents[1:], strict=False))
            assert st.content.strip()
            # WeCom delivers the same message again (same msgid, new req_id): dropped.
            await fake.send_message("zhangsan", "Write three sentences about rivers.", msgid="m-1")
            # In a group the bot gets only messages that @mention it; the mention is not the question.
            await fake.send_message("lisi", "@assistant What is a lake?", chat="wrGroup1", msgid="m-2")

            async def group_answered() -> bool:
                return any(s.finished for s in fake.streams.values() if s.user == "lisi")

            await wait_for(group_answered, timeout=60)
            await asyncio.sleep(0.5)
            assert len([s for s in fake.streams.values() if s.user == "zhangsan"]) == 1
            [gs] = [s for s in fake.streams.values() if s.user == "lisi"]
            assert gs.chat == "wrGroup1"
            hist = redis_server.client().lrange("botd:hist:wecom_aibot:assistant:wrGroup1:lisi", 0, -1)
            assert len(hist) == 2 and json.loads(hist[0])["content"] == "What is a lake?"
            assert fake.pings >= 1  # heartbeat_s = 1
            assert fake.errors == [] and fake.pushes == []


async def test_reconnects_after_a_network_loss_but_not_after_being_displaced(tmp_path, redis_server):
    fake = FakeAibot()
    async with fake_server(fake):
        async with running_daemon(aibot_config(tmp_path, redis_server.url, fake)) as api:
            link = api.daemon.connectors["wecom_aibot"].bots["assistant"].link
            await wait_for(lambda: _async(fake.connected()), timeout=10)
            await fake.drop_connections()
            await wait_for(lambda: _async(len(fake.subscribes) == 2 and fake.connected()), timeout=10)
            # Another deployment of the same bot connects: WeCom tells the old connection and closes it.
            async with aiohttp.ClientSession() as s, s.ws_connect(fake.ws_url) as ws:
                await ws.send_str(json.dumps({"cmd": "aibot_subscribe", "headers": {"req_id": "other"},
                                              "body": {"bot_id": fake.bot_id, "secret": SECRET}}))
                ack = json.loads((await ws.receive(timeout=5)).data)
                assert ack["errcode"] == 0
                await asyncio.sleep(4.0)  # longer than botd's backoff: no reconnection fight
                assert fake.displaced == 1 and len(fake.subscribes) == 3
                assert link.displaced and fake.connected()  # the newcomer keeps the bot
            assert fake.errors == []


# -- kill -9 in the middle of answering -------------------------------------------------------------


def write_config(folder: Path, port: int, redis_url: str, fake: FakeAibot) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{folder / 'state'}"
log_format = "json"
instance = "aibot-box"

[model]
n_ctx = 1024
max_tokens = 24
temperature = 0.0
seed = 42
n_threads = 2
parallel = 1

[redis]
url = "{redis_url}"
lease_s = 3

[bots.assistant]
system_prompt = "You are a helpful assistant. Answer in one short sentence."

[wecom_aibot.assistant]
bot_id = "{fake.bot_id}"
secret = "env:WECOM_AIBOT_SECRET"
ws_url = "{fake.ws_url}"
update_interval_s = 0.1
""")
    return path


async def test_kill_9_and_restart_answer_each_message_once(tmp_path, redis_server):
    fake = FakeAibot()
    users = [f"user{i}" for i in range(3)]
    r = redis_server.client()
    async with fake_server(fake):
        port = free_port()
        config = write_config(tmp_path, port, redis_server.url, fake)
        daemon = DaemonProcess(config, port, tmp_path / "botd.log")
        await daemon.start()
        try:
            await wait_for(lambda: _async(fake.connected()), timeout=20)
            for i, user in enumerate(users):
                await fake.send_message(user, f"Say hello to person number {i}.")

            async def streaming() -> bool:
                return any(s.contents for s in fake.streams.values())

            await wait_for(streaming, timeout=60, interval=0.01)
            daemon.signal(signal.SIGKILL)
            assert await daemon.wait() == -signal.SIGKILL
            left = r.hlen("botd:inbox")
            assert left >= 1, left  # accepted, not answered yet
            shown_before = {u: fake.answers(u) for u in users}

            daemon = DaemonProcess(config, port, tmp_path / "botd.log")
            await daemon.start()

            async def done() -> bool:
                return r.hlen("botd:inbox") == 0

            await wait_for(done, timeout=90)
            await asyncio.sleep(0.5)
        finally:
            daemon.ensure_dead()
    counts = {u: fake.answers(u) for u in users}
    assert counts == dict.fromkeys(users, 1), (counts, shown_before, fake.pushes, fake.errors)
    assert all(fake.shown_to(u).strip() for u in users)
    assert fake.errors == []
    assert sum(1 for p in fake.pushes if p["via"] == "aibot_send_msg") >= 1  # the req_ids died with the daemon


# -- callback mode ---------------------------------------------------------------------------------


async def test_callback_mode_checks_the_signature_first_and_answers_through_refreshes(tmp_path, redis_server):
    fake = FakeAibot()
    async with fake_server(fake):
        bot = {"mode": "callback", "token": "env:WECOM_AIBOT_TOKEN", "encoding_aes_key": "env:WECOM_AIBOT_AES_KEY",
               "update_interval_s": 0.1}
        cfg = make_config(tmp_path, redis_server.url, wecom_aibot={"assistant": bot}, model={"max_tokens": 16})
        async with running_daemon(cfg) as api, aiohttp.ClientSession() as session:
            url = f"{api.base}/wecom_aibot/assistant"
            sender = CallbackSender(fake, session, url, TOKEN, AES_KEY, refresh_every_s=0.1)
            # URL verification, as for a self-built app (receive id "").
            echo = sender.encrypt({"echo": 1})
            from tests.fake_wecom_aibot import signature

            now = str(int(time.time()))
            q = (f"msg_signature={signature(TOKEN, now, '2', echo)}&timestamp={now}&nonce=2"
                 f"&echostr={quote(echo, safe='')}")
            async with session.get(f"{url}?{q}") as resp:
                assert resp.status == 200 and json.loads(await resp.text()) == {"echo": 1}
            # A bad signature is refused before anything is decrypted (this would be a 400 then).
            status, reply = await sender.post(encrypt="this is *not* base64!", msg_signature="f" * 40)
            assert status == 403 and reply is None
            status, reply = await sender.post(sender.message("mallory", "hi", "cb-bad"), msg_signature="0" * 40)
            assert status == 403
            assert r_keys(redis_server, "botd:hist:*") == [] and redis_server.client().hlen("botd:inbox") == 0

            st = await sender.converse("wangwu", "Say hello.", "cb-1")
            assert st is not None and st.finished and st.content.strip(), st
            assert len(st.contents) >= 2 and st.contents[0] == ""  # opened at once, then refreshed
            # Redelivered: the same stream as it is now, and no second answer.
            status, again = await sender.post(sender.message("wangwu", "Say hello.", "cb-1"))
            assert status == 200 and again["stream"]["id"] == st.id and again["stream"]["finish"] is True
            await asyncio.sleep(0.5)
            assert redis_server.client().llen("botd:hist:wecom_aibot:assistant:wangwu:") == 2
            assert fake.errors == [] and fake.pushes == []

            # One user in four groups at once: three streams open, the fourth message waits its turn
            # and is answered at its response_url.
            talks = [asyncio.create_task(sender.converse("zhaoliu", f"@assistant Name a color number {i}.",
                                                         f"cb-g{i}", chat=f"wrGroup{i}")) for i in range(3)]
            await wait_for(lambda: _async(len(fake.open_streams("zhaoliu")) == 3), timeout=10)
            assert await sender.converse("zhaoliu", "@assistant Name a fruit.", "cb-g3", chat="wrGroup3") is None
            await asyncio.gather(*talks)
            await wait_for(lambda: _async(fake.answers("zhaoliu") == 4), timeout=60)
            assert [p["via"] for p in fake.pushes] == ["response_url"] and fake.pushes[0]["content"].strip()
            assert fake.errors == []


def r_keys(redis_server, pattern: str) -> list[str]:
    return redis_server.client().keys(pattern)


async def test_callback_mode_refuses_a_correctly_signed_callback_two_hours_old(tmp_path, redis_server):
    """A captured callback replayed two hours later: correctly signed (wechatpy's crypto, the
    signature over its old timestamp), refused before any work; nothing is answered."""
    fake = FakeAibot()
    async with fake_server(fake):
        bot = {"mode": "callback", "token": "env:WECOM_AIBOT_TOKEN", "encoding_aes_key": "env:WECOM_AIBOT_AES_KEY",
               "update_interval_s": 0.1}
        cfg = make_config(tmp_path, redis_server.url, wecom_aibot={"assistant": bot}, model={"max_tokens": 8})
        async with running_daemon(cfg) as api, aiohttp.ClientSession() as session:
            sender = CallbackSender(fake, session, f"{api.base}/wecom_aibot/assistant", TOKEN, AES_KEY)
            old = int(time.time()) - 7200
            captured = {**sender.message("mallory", "Say hello.", "cb-old"), "create_time": old}
            status, reply = await sender.post(captured, ts=str(old))
            assert status == 403 and reply is None
            # A fresh URL timestamp does not make the message itself younger.
            status, reply = await sender.post({**captured, "msgid": "cb-old2"})
            assert status == 403 and reply is None
            # Nor is a verification request two hours old answered (it would decrypt what it is given).
            echo = sender.encrypt({"echo": 1})
            from tests.fake_wecom_aibot import signature

            q = (f"msg_signature={signature(TOKEN, str(old), '2', echo)}&timestamp={old}&nonce=2"
                 f"&echostr={quote(echo, safe='')}")
            async with session.get(f"{api.base}/wecom_aibot/assistant?{q}") as resp:
                assert resp.status == 403
            await asyncio.sleep(0.5)
            assert r_keys(redis_server, "botd:hist:*") == [] and redis_server.client().hlen("botd:inbox") == 0
            assert fake.pushes == [] and fake.answers("mallory") == 0
