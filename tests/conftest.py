"""Shared fixtures (a real redis-server process, a started RedisManager) and the session's hooks.

Nothing of botd's is mocked: the daemon runs the embedded SmolLM2 model through
llama-cpp-python and talks to a real redis-server over TCP.

Process hygiene: every process the tests start inherits :data:`tests.helpers.SESSION_MARK` in its
environment, and every redis-server they start (the fixture's, the one a daemon embeds) works
in a folder under the session's temporary root (redis-server overwrites its environment with
its title, so it is known by its working folder). When the session ends, any such process
still alive is named, killed, and the run fails.

The helpers the tests import (configs, the daemon, a client, waiting) live in tests/helpers.py:
a conftest is pytest's to import, never a test's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.redis_store import RedisManager
from tests.helpers import RedisServer, make_config, wait_gone

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A finished test run leaves no process of its own: name any, kill them, fail the run."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)  # None: no test asked for a temporary folder
    left = wait_gone(under=basetemp, timeout=5.0)
    if not left:
        return
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    report = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
    tw = session.config.get_terminal_writer()
    tw.line(f"\nprocess hygiene: {len(left)} process(es) started by the tests outlived them (killed now):\n"
            f"{report}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def manager(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[RedisManager]:
    """A started RedisManager on the test's redis-server: a store tested alone, no daemon."""
    cfg = make_config(tmp_path, redis_server.url, redis={"socket_timeout_s": 0.5})
    mgr = RedisManager(cfg.redis, tmp_path)
    await mgr.start()
    assert mgr.healthy
    try:
        yield mgr
    finally:
        await mgr.close()
