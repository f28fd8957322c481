"""bots/tasks.py alone: the one registry of the top floor's background tasks (no daemon)."""

from __future__ import annotations

import asyncio

from bots.tasks import TaskRegistry


async def test_a_finished_task_leaves_the_registry():
    tasks = TaskRegistry()
    task = tasks.spawn(asyncio.sleep(0))
    assert len(tasks) == 1
    await task
    await asyncio.sleep(0)  # the done callback runs on the next turn of the loop
    assert len(tasks) == 0


async def test_drain_waits_for_what_is_under_way_and_cancels_what_outlives_the_bound():
    tasks = TaskRegistry()
    done: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        done.append("quick")

    stuck = tasks.spawn(asyncio.sleep(60))
    tasks.spawn(quick())
    await tasks.drain(timeout_s=0.3)
    assert done == ["quick"]
    await asyncio.gather(stuck, return_exceptions=True)
    await asyncio.sleep(0)
    assert stuck.cancelled() and len(tasks) == 0


async def test_drain_connector_waits_for_that_connectors_answers_only():
    tasks = TaskRegistry()
    release = asyncio.Event()
    slack = tasks.spawn(release.wait(), "slack")
    telegram = tasks.spawn(asyncio.sleep(0.01), "telegram")
    untagged = tasks.spawn(asyncio.sleep(0.01))
    await tasks.drain_connector("telegram", timeout_s=5)
    assert telegram.done() and not slack.done()
    await tasks.drain_connector("slack", timeout_s=0.05)  # past its bound: cancelled
    await asyncio.gather(slack, return_exceptions=True)
    assert slack.cancelled()
    await untagged
    await tasks.drain()  # nothing left: returns at once
