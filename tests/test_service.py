"""botd as a service: the real daemon process, killed and restarted, reloaded with SIGHUP.

Platform messages go in through the Telegram webhook (python-telegram-bot in the daemon,
a fake Bot API on 127.0.0.1 here); Redis is a real redis-server that outlives the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakeTelegram, serve
from tests.helpers import BOTD, free_port, until_healthy, wait_for

SECRET = "wh-secret_123"
N_MESSAGES = 20


def write_config(tmp_path: Path, port: int, redis_url: str, *, tg_base: str = "",
                 system_prompt: str = "You are a helpful assistant.", extra: str = "") -> Path:
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{tmp_path / 'state'}"
log_format = "json"
shutdown_grace_s = 20

[model]
n_ctx = 2048
max_tokens = 24
temperature = 0.0
seed = 42
n_threads = 2

[queue]
max_size = 64

[redis]
url = "{redis_url}"

[bots.assistant]
system_prompt = {json.dumps(system_prompt)}
"""
    if tg_base:
        text += f"""
[telegram.assistant]
token = "env:TG_TOKEN"
mode = "webhook"
webhook_secret = "env:TG_SECRET"
api_base = "{tg_base}/bot"
edit_interval_private_s = 0.2
"""
    path = tmp_path / "config.toml"
    path.write_text(text + extra)
    return path


class DaemonProcess:
    """``botd run`` as a child process, its log in a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        env = {**os.environ, "TG_TOKEN": "123:abc", "TG_SECRET": SECRET}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([BOTD, "run", "--config", str(self.config)], env=env,
                                         stdout=log, stderr=log)
        await until_healthy(self.proc, self.port, self.log)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def update(n: int) -> dict:
    chat = 5000 + n
    return {"update_id": 7000 + n, "message": {
        "message_id": 100 + n, "date": int(time.time()), "text": f"Say hello to person number {n}.",
        "chat": {"id": chat, "type": "private", "first_name": f"U{n}"},
        "from": {"id": chat, "is_bot": False, "first_name": f"U{n}"}}}


async def post_update(session: aiohttp.ClientSession, port: int, body: dict) -> int:
    async with session.post(f"http://127.0.0.1:{port}/telegram/assistant", json=body,
                            headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as r:
        return r.status


@pytest.mark.parametrize("kill_point,sig", [
    ("all-queued", signal.SIGKILL),      # every message accepted, at most one started
    ("first-streaming", signal.SIGKILL),  # an answer is half-shown in Telegram (its id recorded)
    ("half-answered", signal.SIGKILL),    # about half delivered, one generating, the rest queued
    ("first-streaming", signal.SIGTERM),  # graceful: the running answer finishes, the queue is kept
])
async def test_no_message_lost_or_answered_twice_across_a_kill(tmp_path, redis_server, kill_point, sig):
    fake = FakeTelegram()
    r = redis_server.client()
    async with serve(fake.app()) as base:
        port = free_port()
        config = write_config(tmp_path, port, f"redis://127.0.0.1:{redis_server.port}/0", tg_base=base)
        daemon = DaemonProcess(config, port, tmp_path / "botd.log")
        await daemon.start()
        try:
            async with aiohttp.ClientSession() as s:
                statuses = await asyncio.gather(*(post_update(s, port, update(n)) for n in range(N_MESSAGES)))
                assert statuses == [200] * N_MESSAGES  # each one acknowledged to "Telegram"
                assert r.hlen("botd:inbox") >= N_MESSAGES - 1  # recorded before the acknowledgement

                def delivered() -> int:
                    return N_MESSAGES - r.hlen("botd:inbox")

                if kill_point == "first-streaming":
                    # An answer is on screen and botd has recorded its message id. (Between Telegram
                    # taking a sendMessage and that record lies the one window where a kill can
                    # still show an answer twice: the Bot API has no idempotent send.)
                    await wait_for(lambda: _async(r.hlen("botd:inbox:progress") > 0), timeout=30, interval=0.01)
                elif kill_point == "half-answered":
                    await wait_for(lambda: _async(delivered() >= N_MESSAGES // 2), timeout=60, interval=0.01)
                daemon.signal(sig)
                rc = await daemon.wait()
                if sig == signal.SIGTERM:
                    assert rc == 0
                    # Graceful: what was queued is still recorded for the next start.
                    assert 0 < r.hlen("botd:inbox") < N_MESSAGES
                else:
                    assert rc == -signal.SIGKILL
                left = r.hlen("botd:inbox")
                assert left > 0

                await daemon.start()
                # Telegram redelivering the same updates changes nothing.
                again = await asyncio.gather(*(post_update(s, port, update(n)) for n in range(0, N_MESSAGES, 3)))
                assert set(again) == {200}
                await wait_for(lambda: _async(r.hlen("botd:inbox") == 0), timeout=120, interval=0.1)
                await asyncio.sleep(1.0)  # anything still to come would be a duplicate
        finally:
            daemon.ensure_dead()

    sends = fake.of("sendMessage")
    chats = [int(p["chat_id"]) for p in sends]
    # Exactly one message per question: none lost, none posted twice.
    assert sorted(chats) == [5000 + n for n in range(N_MESSAGES)], sorted(chats)
    for mid, msg in fake.messages.items():
        assert msg["text"].strip() and msg["text"] != "…", (mid, msg)
        assert "error on my side" not in msg["text"] and "busy" not in msg["text"], (mid, msg)
    # Each conversation holds its question and answer once.
    for n in range(N_MESSAGES):
        hist = r.lrange(f"botd:hist:telegram:assistant:{5000 + n}:", 0, -1)
        assert [json.loads(h)["role"] for h in hist] == ["user", "assistant"], (n, hist)
        assert json.loads(hist[1])["content"].strip()


async def _async(value: bool) -> bool:
    return value


async def _chat(session: aiohttp.ClientSession, port: int, text: str, max_tokens: int = 8) -> dict:
    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}) as r:
        body = await r.json()
        assert r.status == 200, body
        return body


async def test_sighup_applies_a_new_config_without_dropping_the_running_answer(tmp_path, redis_server):
    port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
    config = write_config(tmp_path, port, redis_url, system_prompt="You are helpful.")
    log = tmp_path / "botd.log"
    daemon = DaemonProcess(config, port, log)
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as s:
            before = (await _chat(s, port, "Hi"))["usage"]["prompt_tokens"]
            # A long answer is generating while the config changes under it.
            running = asyncio.create_task(_chat(s, port, "Write a long story about a ship.", max_tokens=300))
            await asyncio.sleep(0.5)
            longer = "You are Captain Zed, the assistant of the harbour office. " * 4
            write_config(tmp_path, port, redis_url, system_prompt=longer)
            daemon.signal(signal.SIGHUP)
            await wait_for(lambda: _async("config reloaded" in log.read_text()), timeout=30)
            after = (await _chat(s, port, "Hi"))["usage"]["prompt_tokens"]
            assert after > before + 30  # the next answer was built with the new system prompt
            story = await running
            assert story["choices"][0]["finish_reason"] == "length"  # it ran to its full budget
            assert story["usage"]["completion_tokens"] == 300

            # A broken file is refused, named, and the old config keeps answering.
            config.write_text(config.read_text() + "\n[bots.assistant.oops]\nbogus = 1\n")
            daemon.signal(signal.SIGHUP)
            await wait_for(lambda: _async("reload refused" in log.read_text()), timeout=30)
            refused = [json.loads(line) for line in log.read_text().splitlines()
                       if line.startswith("{") and "reload refused" in line][-1]
            assert "config.toml" in refused["error"] and "bots.assistant.oops" in refused["error"]
            again = (await _chat(s, port, "Hi"))["usage"]["prompt_tokens"]
            assert again == after

            # A changed model setting reloads the model once idle; answers go on.
            write_config(tmp_path, port, redis_url, system_prompt=longer)
            config.write_text(config.read_text().replace("n_ctx = 2048", "n_ctx = 1024"))
            daemon.signal(signal.SIGHUP)
            await wait_for(lambda: _async(log.read_text().count("config reloaded") >= 2), timeout=60)
            async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
                assert r.status == 200
            assert (await _chat(s, port, "Hi"))["usage"]["prompt_tokens"] == after
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        daemon.ensure_dead()
