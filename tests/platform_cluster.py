"""The scaffolding the tests of the platforms botd reaches over a long connection (DingTalk's
Stream, Feishu's WebSocket: tests/test_dingtalk.py, tests/test_feishu.py) share: a fake platform
served on a real port, the platform's SDK as a child process, a link's session, the connector
alone (three of them sharing the connection's lease), configs, and real ``botd run`` daemons on
the fake killed with -9 mid-answer.

What differs between the platforms is handed in: the fake (one of tests/fake_*.py), the config
section, how a message is pushed and how an answer is seen to have ended (:class:`Platform`). The
assertions on what the platform finally shows stay in each platform's test file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
from aiohttp import web

from core.config import Config, Settings
from core.kv import KeyValueCache
from tests.fakes import serve
from tests.helpers import Recorder, RedisServer, free_port, make_config, wait_for
from tests.test_service import DaemonProcess


class FakePlatform(Protocol):
    """What the shared scaffolding asks of a fake platform (tests/fake_dingtalk.py, fake_feishu.py)."""

    url: str
    cards: dict[str, Any]
    errors: list[str]

    def app(self) -> web.Application: ...

    def connected(self) -> int: ...


F = TypeVar("F", bound=FakePlatform)
T = TypeVar("T")


async def now(value: T) -> T:
    """``value`` as the coroutine :func:`tests.helpers.wait_for` polls: ``wait_for(lambda: now(x == 1))``."""
    return value


def secret_in_env(name: str, value: str) -> Any:
    """An autouse fixture putting the app's secret in the environment variable ``name``
    (configs say ``env:NAME``); assigned to a module-level name in the test file."""

    @pytest.fixture(autouse=True)
    def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(name, value)

    return secret_env


@contextlib.asynccontextmanager
async def fake_server(fake: F) -> AsyncIterator[F]:
    """``fake`` served on 127.0.0.1 for the block, its ``url`` set."""
    async with serve(fake.app()) as base:
        fake.url = base
        yield fake


# -- the platform's own SDK, and botd's link alone ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def sdk_process(script: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[Any]:
    """``script`` (the platform's official SDK against the fake) run by this Python; yields its
    stdout; killed at the end."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        yield proc.stdout
    finally:
        proc.kill()
        await proc.wait()


async def printed(stdout: Any, timeout: float = 10) -> list[str]:
    """The words of the next line the SDK's script prints."""
    line = await asyncio.wait_for(stdout.readline(), timeout)
    return line.decode().split()


Received = Callable[[dict[str, Any]], Awaitable[None]]


@contextlib.asynccontextmanager
async def linked(make_link: Callable[[Received], Any],
                 holding: Callable[[], bool] = lambda: True) -> AsyncIterator[tuple[Any, asyncio.Task[Any], list[Any]]]:
    """The link ``make_link(on_message)`` builds (a StreamLink, a FeishuLink) in session until the
    block ends; yields it, its session's task once connected, and the list of what it handed up."""
    got: list[dict[str, Any]] = []

    async def on_message(data: dict[str, Any]) -> None:
        got.append(data)

    link = make_link(on_message)
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(link.session(http, holding))
        await asyncio.wait_for(link.connected.wait(), 5)
        try:
            yield link, task, got
        finally:
            await link.close()
            await asyncio.gather(task, return_exceptions=True)


# -- the connector alone (a recording service, no model) ----------------------------------------------------------


def connector_config(tmp_path: Path, redis_url: str, section: str, app: dict[str, Any], instance: str = "",
                     max_tokens: int = 32) -> Config:
    """An in-process config with one app ``[section.assistant]`` (updates every 0.2 s, a 2 s lease)."""
    return make_config(tmp_path, redis_url, **{section: {"assistant": {"update_interval_s": 0.2, **app}}},
                       model={"max_tokens": max_tokens}, redis={"lease_s": 2},
                       server={"instance": instance} if instance else {})


@contextlib.asynccontextmanager
async def connector(kind: type, cfg: Config, manager: Any, service: Any = None) -> AsyncIterator[Any]:
    """A started connector of class ``kind`` handing its messages to ``service`` (a Recorder by default)."""
    conn = kind(service or Recorder(), Settings(cfg), KeyValueCache(manager, "botd"))
    async with conn:
        yield conn


@contextlib.asynccontextmanager
async def three_connectors(start: Callable[[Config, Any, Recorder], contextlib.AbstractAsyncContextManager[Any]],
                           config: Callable[[str], Config], manager: Any,
                           fake: FakePlatform) -> AsyncIterator[tuple[Any, Recorder, Recorder]]:
    """Three connectors (``start(config(box), manager, recorder)``: the platform's
    :func:`connector`) on one Redis, box-1 started first (it holds the connection): yields
    (box-1's connector, box-1's recorder, the other two's recorder) 1.5 s after the others
    started; after the block, with box-2 and box-3 gone, box-1 keeps or takes the connection."""
    one, two = Recorder(), Recorder()
    async with start(config("box-1"), manager, one) as c1:
        await wait_for(lambda: now(fake.connected() == 1), timeout=10)
        async with start(config("box-2"), manager, two), start(config("box-3"), manager, two):
            await asyncio.sleep(1.5)
            yield c1, one, two
        await wait_for(lambda: now(fake.connected() == 1), timeout=10)


async def lease_taken_then_freed(redis_server: RedisServer, lease_key: str, fake: FakePlatform,
                                 displaced: Callable[[], bool]) -> None:
    """Another daemon takes the connection's lease (the holder paused past it): the holder's
    connection stops, is not reopened against the new holder; once that one dies, the connection
    is taken over again, one only."""
    redis_server.client().set(lease_key, "999999|box-9/other", px=60_000)
    await wait_for(lambda: now(fake.connected() == 0), timeout=5)
    await wait_for(lambda: now(displaced()), timeout=5)  # set just after the close
    await asyncio.sleep(1.0)
    assert fake.connected() == 0 and displaced()  # stopped: not reopened against the lease's new holder
    redis_server.client().delete(lease_key)  # the new holder died
    await wait_for(lambda: now(fake.connected() == 1), timeout=10)  # taken over again
    await asyncio.sleep(1.0)
    assert fake.connected() == 1


async def push_each(fake: Any, messages: list[dict[str, Any]], acked: dict[str, Any]) -> None:
    """Push ``messages`` one by one, each once the platform has the previous one's answer in ``acked``."""
    for message in messages:
        mid = await fake.push(message)

        async def answered(mid: str = mid) -> bool:
            return mid in acked

        await wait_for(answered, timeout=5)


async def answered_through_refusals(fake: Any, rec: Recorder, message: dict[str, Any],
                                    throttle: Callable[[], None]) -> Any:
    """``message`` pushed to a started connector, then answered by hand in two updates while the
    platform refuses the token once and rate-limits (``throttle``); returns the reply target."""
    await wait_for(lambda: now(fake.connected() == 1), timeout=10)
    await fake.push(message)
    await wait_for(lambda: now(len(rec.got) == 1), timeout=5)
    target = rec.got[0][1]
    await target.show("first words")
    fake.expire_tokens()
    throttle()
    await target.show("first words and more")
    await target.closed("first words and more")
    return target


def callback_config(tmp_path: Path, redis_url: str, section: str, app: dict[str, Any],
                    department: list[Any]) -> Config:
    """Callback mode: app ``[section.assistant]``, the members of ``department`` routed to an hr bot."""
    from connectors.config import config_from_dict

    return config_from_dict({
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "state")},
        "model": {"n_ctx": 1024, "max_tokens": 8, "temperature": 0.0, "seed": 42, "n_threads": 2, "parallel": 1},
        "redis": {"url": redis_url},
        # As make_config: each message answered at once, no waiting notice (the tests count the answers).
        "queue": {"debounce_s": 0, "notice_after_s": 0},
        "bots": {"assistant": {}, "hr": {"system_prompt": "You are the HR assistant."}},
        "routes": [{"bot": "hr", "platform": section, "department": department}],
        section: {"assistant": app}}, tmp_path / "config.toml")


async def routed_by_department(redis_server: RedisServer, section: str, boss: str, clerk: str,
                               answers: Callable[[], int]) -> None:
    """Signed "hello"s from ``boss`` (in the routed department) and ``clerk`` (not) are answered by
    the hr bot and the assistant each, and the forged one from mallory by none (``answers``: how
    many the platform got)."""
    await wait_for(lambda: now(answers() >= 2), timeout=60)
    r = redis_server.client()
    await wait_for(lambda: now(r.llen(f"botd:hist:{section}:hr:{boss}:") == 2
                               and r.llen(f"botd:hist:{section}:assistant:{clerk}:") == 2), timeout=10)
    assert not r.keys("botd:hist:*mallory*") and answers() == 2


# -- the daemon and the model over the long connection ---------------------------------------------------------


async def kept_in_history(redis_server: RedisServer, section: str, chat: str) -> None:
    """The group's question "What is a lake?" and its answer are the chat's history."""
    r = redis_server.client()
    key = f"botd:hist:{section}:assistant:{chat}:"
    await wait_for(lambda: now(r.llen(key) == 2), timeout=10)
    assert json.loads(str(r.lindex(key, 0)))["content"] == "What is a lake?"


# -- real ``botd run`` daemons killed with -9 mid-answer ---------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """How the daemon tests drive one platform's fake."""

    section: str  # the config section ("dingtalk", "feishu")
    app: dict[str, Any]  # the app's keys in ``[section.assistant]``
    ask: Callable[[str, str], Awaitable[str]]  # push (user, text); returns what the answer is found by
    holder_line: str  # what the log of the daemon holding the connection says
    opened: Callable[[], int]  # how many connections the fake has handed out
    answered: Callable[[int], bool]  # at least n answers, each one ended


def write_config(folder: Path, port: int, redis_url: str, platform: Platform, instance: str) -> Path:
    """``folder/config.toml`` for ``botd run``: a small model, a 3 s lease, the platform's app."""
    folder.mkdir(parents=True, exist_ok=True)
    app = "\n".join(f"{key} = {json.dumps(value)}" for key, value in platform.app.items())
    path = folder / "config.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{folder / 'state'}"
log_format = "json"
instance = "{instance}"

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

[{platform.section}.assistant]
{app}
update_interval_s = 0.2
""")
    return path


async def started(fake: FakePlatform) -> None:
    """Until some card has had content streamed into it."""
    await wait_for(lambda: now(any(c.contents for c in fake.cards.values())), timeout=60, interval=0.01)


async def kill_9_and_restart(tmp_path: Path, redis_server: RedisServer, fake: FakePlatform,
                             platform: Platform) -> dict[str, str]:
    """One daemon asked by user0..user2, killed with -9 once an answer streams, started again;
    returns when the inbox is empty: user -> what ``platform.ask`` returned."""
    users = [f"user{i}" for i in range(3)]
    r = redis_server.client()
    port = free_port()
    config = write_config(tmp_path, port, redis_server.url, platform, f"{platform.section}-box")
    daemon = DaemonProcess(config, port, tmp_path / "botd.log")
    await daemon.start()
    asked = {}
    try:
        await wait_for(lambda: now(fake.connected() == 1), timeout=20)
        for i, user in enumerate(users):
            asked[user] = await platform.ask(user, f"Say hello to person number {i}.")
        await started(fake)
        daemon.signal(signal.SIGKILL)
        assert await daemon.wait() == -signal.SIGKILL
        assert r.hlen("botd:inbox") >= 1  # accepted, not answered yet
        daemon = DaemonProcess(config, port, tmp_path / "botd.log")
        await daemon.start()
        await wait_for(lambda: now(r.hlen("botd:inbox") == 0), timeout=90)
        await asyncio.sleep(0.5)
    finally:
        daemon.ensure_dead()
    return asked


async def three_daemons_holder_killed(tmp_path: Path, redis_server: RedisServer, fake: FakePlatform,
                                      platform: Platform) -> dict[str, str]:
    """Three ``botd run`` on one Redis: exactly one holds the connection; u0..u2 ask, the holder
    is killed with -9 mid-answer, another takes the connection within the lease, u3 asks; returns
    once every answer ended: user -> what ``platform.ask`` returned."""
    r = redis_server.client()
    daemons = []
    for i in range(3):
        port = free_port()
        cfg = write_config(tmp_path / f"botd{i}", port, redis_server.url, platform, instance=f"box{i}")
        daemons.append(DaemonProcess(cfg, port, tmp_path / f"botd{i}" / "botd.log"))
    asked = {}
    try:
        await asyncio.gather(*(d.start() for d in daemons))
        await wait_for(lambda: now(fake.connected() == 1), timeout=20)
        await asyncio.sleep(2.0)
        assert fake.connected() == 1 and platform.opened() == 1  # exactly one of three
        holder = next(i for i, d in enumerate(daemons) if platform.holder_line in d.log.read_text())
        for i in range(3):
            asked[f"u{i}"] = await platform.ask(f"u{i}", f"Say hello to person number {i}.")
        await started(fake)
        daemons[holder].signal(signal.SIGKILL)
        await daemons[holder].wait()
        await wait_for(lambda: now(fake.connected() == 1), timeout=20)  # moved within the lease
        assert platform.opened() == 2
        asked["u3"] = await platform.ask("u3", "Say hello to person number 3.")
        await wait_for(lambda: now(r.hlen("botd:inbox") == 0 and platform.answered(4)), timeout=120)
        await asyncio.sleep(1.0)
    finally:
        for d in daemons:
            d.ensure_dead()
    return asked
