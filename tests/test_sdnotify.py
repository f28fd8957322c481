"""The daemon speaks systemd's notify protocol to a real NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from tests.helpers import BOTD, REPO, free_port


def test_ready_after_the_api_answers_then_watchdog_then_stopping(tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(60)
    port = free_port()
    cfg = (REPO / "config.toml").read_text().replace("port = 8080", f"port = {port}").replace(
        'state_dir = "state"', f'state_dir = "{tmp_path / "state"}"')
    (tmp_path / "config.toml").write_text(cfg)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([BOTD, "run", "--config", str(tmp_path / "config.toml")], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        first = listener.recv(4096).decode()
        assert first.startswith("READY=1")
        # READY came only once the API answers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            assert json.loads(r.read())["status"] == "ok"  # the model loaded (details need a key)
        pings = [listener.recv(4096).decode() for _ in range(3)]
        assert pings == ["WATCHDOG=1"] * 3
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            msg = listener.recv(4096).decode()
            seen.append(msg)
            if msg == "STOPPING=1":
                break
        assert seen[-1] == "STOPPING=1"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_systemd_analyze_verifies_the_unit(tmp_path):
    """The shipped unit passes `systemd-analyze verify` (with its ExecStart pointed at this install)."""
    import shutil

    import pytest

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd); .ci/run installs it")
    unit = (REPO / "systemd" / "botd.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit and "WatchdogSec=" in unit
    # The unit expects the README's install under /opt/botd; here botd lives in this venv.
    local = tmp_path / "botd.service"
    local.write_text(unit.replace("/opt/botd/.venv/bin/botd", BOTD))
    done = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
