"""The daemon's lifecycle: a failed start leaves nothing running, a second SIGTERM stops at once.

The start enters the runtime, the connectors and the HTTP runner in one exit stack, so a
start that fails half-way (here: the port is taken) leaves exactly what it entered; the
stop drains the running answers within the grace period, unless the admin signals again.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from bots.daemon import Daemon, StartupError
from tests.fakes import FakeTelegram, serve
from tests.helpers import free_port, make_config
from tests.test_service import DaemonProcess


async def test_a_failed_start_leaves_nothing_running(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("TG_TOKEN", "123456:TEST-token")
    fake = FakeTelegram()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with serve(fake.app()) as base:
            cfg = make_config(tmp_path, redis_server.url, server={"port": port},
                              telegram={"assistant": {"token": "env:TG_TOKEN", "api_base": base + "/bot",
                                                      "poll_timeout_s": 1}})
            before = asyncio.all_tasks()
            daemon = Daemon(cfg)
            with pytest.raises(StartupError, match=r"server\.port"):
                await daemon.start()
            # It got as far as the connectors (Telegram answered getMe) before the port failed.
            assert fake.of("getMe")
            polls = len(fake.of("getUpdates"))
            await asyncio.sleep(1.5)
    assert len(fake.of("getUpdates")) == polls  # no polling after the failed start
    assert not daemon.runtime.worker.loaded
    thread = daemon.runtime.worker._thread
    assert thread is None or not thread.is_alive()  # the model thread is gone
    left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
    assert not left, left  # no task of the daemon's is still running


def _config(tmp_path: Path, port: int, redis_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{tmp_path / 'state'}"
log_format = "json"
shutdown_grace_s = 120

[model]
n_ctx = 4096
max_tokens = 3000
temperature = 0.0
seed = 42
n_threads = 2

[redis]
url = "{redis_url}"
""")
    return path


async def test_a_second_sigterm_stops_at_once(tmp_path, redis_server):
    import signal

    port = free_port()
    log = tmp_path / "botd.log"
    daemon = DaemonProcess(_config(tmp_path, port, redis_server.url), port, log)
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as s:
            # At temperature 2 the small model rambles on without ending: a generation that runs
            # for its whole budget (3000 tokens, far past the few seconds this test takes).
            body = {"messages": [{"role": "user", "content": "Write a long essay about the sea."}],
                    "stream": True, "temperature": 2.0}
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()  # the answer has begun
                daemon.signal(signal.SIGTERM)
                await asyncio.sleep(2.0)
                # Graceful: the running answer goes on within the 120 s grace period.
                assert daemon.proc is not None and daemon.proc.poll() is None
                t0 = time.monotonic()
                daemon.signal(signal.SIGTERM)
                rc = await daemon.wait(timeout=30)
                took = time.monotonic() - t0
    finally:
        daemon.ensure_dead()
    assert rc == 0
    assert took < 15, f"the second SIGTERM took {took:.1f} s"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(x.get("event") == "second stop signal: stopping the running answers now" for x in lines)
    assert any(x.get("event") == "stopped" for x in lines)
