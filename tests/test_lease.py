"""core/lease.py on a real redis-server alone: a thread's turn that moved to another daemon stays
lost for the daemon that held it (its guarded history write is refused), even once the lease is
free again; a singleton lease is taken again when free."""

from __future__ import annotations

import asyncio

import pytest

from core.lease import Fenced, Lease, turn

PREFIX = "lse"


async def test_a_lost_turn_is_not_taken_again_and_its_write_stays_fenced(manager, redis_server):
    client = redis_server.client()
    key = f"{PREFIX}:lease:thread:t1"
    async with turn(manager, PREFIX, "thread:t1", 0.3, "host-a") as lease:
        assert lease is not None and lease.held
        # host-a pauses past its lease: the key expires, host-b takes the turn, answers and leaves.
        client.delete(key)
        other = Lease(manager, PREFIX, "thread:t1", 0.3, "host-b")
        assert await other.acquire()
        await asyncio.sleep(0.25)  # host-a's renewal finds the lease moved
        await other.release()
        await asyncio.sleep(0.4)  # free again: host-a's keeper must not take it back
        assert not lease.held
        assert client.get(key) is None
        async with manager.client.pipeline(transaction=True) as pipe:
            with pytest.raises(Fenced):
                await lease.guard(pipe)


async def test_a_singleton_lease_is_taken_again_once_free(manager, redis_server):
    lease = Lease(manager, PREFIX, "telegram:poll", 0.3, "host-a")
    stop = asyncio.Event()
    keeper = asyncio.create_task(lease.keep(stop))
    try:
        for _ in range(40):
            if lease.held:
                break
            await asyncio.sleep(0.05)
        assert lease.held
        redis_server.client().delete(f"{PREFIX}:lease:telegram:poll")
        other = Lease(manager, PREFIX, "telegram:poll", 0.3, "host-b")
        assert await other.acquire()
        await asyncio.sleep(0.25)
        assert not lease.held
        await other.release()
        for _ in range(40):
            if lease.held:
                break
            await asyncio.sleep(0.05)
        assert lease.held
    finally:
        stop.set()
        await keeper
