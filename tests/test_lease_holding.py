"""core.lease.Holding on a real redis-server alone (no daemon): the loop of a "one daemon at a
time" edge (Telegram polling, the WeCom AI bot's long connection, DingTalk/Feishu streams) runs
its work only in the daemon holding the lease, stops when the lease is lost and runs again once
it is taken back; another daemon takes over when the holder leaves."""

from __future__ import annotations

import asyncio
import time

from core.lease import Holding, Lease

PREFIX = "hld"
TTL = 0.3


async def _work(holding: Holding, host: str, turns: list[tuple[str, float]], stop: asyncio.Event) -> None:
    async for _ in holding.while_held(stop.is_set, "test work", host=host):
        turns.append((host, time.monotonic()))
        # The work of one turn (a getUpdates, a connection's session) ends when the lease is lost.
        for _ in range(4):
            if not holding.held or stop.is_set():
                break
            await asyncio.sleep(0.02)


async def _daemon(holding: Holding, host: str, turns: list[tuple[str, float]], stop: asyncio.Event) -> None:
    async with holding:
        await _work(holding, host, turns, stop)


async def test_only_the_holder_works_and_another_takes_over_when_it_leaves(manager):
    turns: list[tuple[str, float]] = []
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a = Holding(Lease(manager, PREFIX, "poll:bot", TTL, "host-a"), "lease-a")
    b = Holding(Lease(manager, PREFIX, "poll:bot", TTL, "host-b"), "lease-b")
    daemon_a = asyncio.create_task(_daemon(a, "host-a", turns, stop_a))
    await asyncio.sleep(0.3)  # host-a has the lease (it was free) before host-b starts
    daemon_b = asyncio.create_task(_daemon(b, "host-b", turns, stop_b))
    await asyncio.sleep(0.6)
    assert turns and {h for h, _ in turns} == {"host-a"}  # never both
    stop_a.set()
    await daemon_a  # host-a leaves: its lease is released, and host-b's keeper takes it
    left = time.monotonic()
    for _ in range(60):
        if any(h == "host-b" for h, _ in turns):
            break
        await asyncio.sleep(0.05)
    stop_b.set()
    await daemon_b
    first_b = [t for h, t in turns if h == "host-b"]
    assert first_b and first_b[0] - left < TTL * 2
    assert not a.held and not b.held  # both released on the way out


async def test_work_stops_when_the_lease_is_lost_and_runs_again_once_taken_back(manager, redis_server):
    turns: list[tuple[str, float]] = []
    stop = asyncio.Event()
    holding = Holding(Lease(manager, PREFIX, "ws:bot", TTL, "host-a"), "lease-a")
    async with holding:
        work = asyncio.create_task(_work(holding, "host-a", turns, stop))
        for _ in range(40):
            if turns:
                break
            await asyncio.sleep(0.05)
        assert turns and holding.held
        # The key expires behind host-a's back (a long pause) and host-b takes the lease.
        redis_server.client().delete(f"{PREFIX}:lease:ws:bot")
        other = Holding(Lease(manager, PREFIX, "ws:bot", TTL, "host-b"), "lease-b")
        assert await other.lease.acquire()
        async with other:  # host-b's keeper renews it from here on
            await asyncio.sleep(TTL)  # host-a's renewal finds it moved
            assert not holding.held
            lost_at, count = time.monotonic(), len(turns)
            await asyncio.sleep(0.5)
            assert len(turns) == count  # no work while host-b holds it (and renews it)
        # host-b leaves: host-a takes the lease back
        for _ in range(40):
            if len(turns) > count:
                break
            await asyncio.sleep(0.05)
        assert len(turns) > count and turns[-1][1] > lost_at and holding.held  # taken back, working again
        stop.set()
        await work
