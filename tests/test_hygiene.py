"""Process and log hygiene: a stopped daemon leaves no process behind (its embedded redis-server
included), and with ``log_format = "json"`` every line it writes is JSON, Python warnings too.

A real ``botd run`` with the embedded Redis, stopped by SIGTERM; the RedisManager alone for the
embedded server's stop and for redis-py's asyncio retry; botd's logging for warnings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
import warnings
from pathlib import Path

from core.redis_store import RedisManager
from tests.helpers import BOTD, captured, free_port, make_config, marked_processes, until_healthy, wait_gone


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


async def test_botd_run_stopped_by_sigterm_leaves_no_process_and_logs_only_json(tmp_path, monkeypatch):
    mark = uuid.uuid4().hex
    monkeypatch.setenv("BOTD_T_HYGIENE", mark)  # inherited by botd and by the redis-server it starts
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{tmp_path / 'state'}"
log_format = "json"

[model]
n_ctx = 512
max_tokens = 8
n_threads = 1
""")
    log = tmp_path / "botd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([BOTD, "run", "--config", str(config)], stdout=out, stderr=out)
    try:
        await until_healthy(proc, port, log)
        ours = marked_processes("BOTD_T_HYGIENE", mark, under=tmp_path)
        assert any("redis-server" in cmd for cmd in ours.values()), ours  # the embedded Redis runs
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = await asyncio.to_thread(wait_gone, "BOTD_T_HYGIENE", mark, tmp_path, 5.0)
        for pid in left:  # never leave one behind, even when the check fails
            os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after botd stopped: {left}"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    plain = [line for line in lines if not line.startswith("{")]
    assert not plain, f"not JSON: {plain[:5]}"
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert not [line for line in lines if "Warning" in line], "a Python warning was logged"


async def test_the_embedded_redis_stops_with_its_manager(tmp_path):
    cfg = make_config(tmp_path, "")
    manager = RedisManager(cfg.redis, tmp_path / "state")
    await manager.start()
    await manager.client.set("k", "v")  # its pool holds connections now
    pid = manager._embedded.pid
    assert _alive(pid)
    await manager.close()
    for _ in range(100):
        if not _alive(pid):
            break
        await asyncio.sleep(0.02)
    alive = _alive(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the embedded redis-server outlived its manager"


async def test_the_redis_client_retries_the_asyncio_way_without_a_warning(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url)
    manager = RedisManager(cfg.redis, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # redis-py warns when it has to convert a synchronous Retry
        await manager.start()
        try:
            assert await manager.client.ping()
        finally:
            await manager.close()


def test_python_warnings_go_into_the_json_log(tmp_path: Path):
    with captured(level="info", fmt="json") as out:
        warnings.warn("a library is dropping this form token=s3cr3t", DeprecationWarning, stacklevel=1)
        warnings.warn("something odd", UserWarning, stacklevel=1)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    joined = " ".join(str(r) for r in records)
    assert "DeprecationWarning" in joined and "UserWarning: something odd" in joined
    assert all(r.get("level") == "warning" for r in records), records
    assert "s3cr3t" not in out.getvalue()  # masked like every other line
