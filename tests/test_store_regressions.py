"""Regressions found by the module tests: a damaged inbox record leaves nothing behind, a
command Redis refuses is not an outage, and every job that ends reaches the worker's hook.
"""

from __future__ import annotations

import asyncio

from core.engines import create_engine
from core.engines.base import GenerationRequest
from core.history import HistoryStore
from core.inbox import Inbox
from core.jobs import FairQueue, Job
from core.messages import Finish, InboundMessage, ThreadKey
from core.redis_store import RedisManager, StoreUnavailable
from tests.helpers import make_config


async def test_a_damaged_record_is_dropped_with_its_progress_and_answer(tmp_path, redis_server):
    mgr = RedisManager(make_config(tmp_path, redis_server.url).redis, tmp_path)
    await mgr.start()
    try:
        inbox = Inbox(mgr, "botd", "h")
        msg = InboundMessage(platform="slack", bot="b", chat="c", user="u", text="t", event_id="E1")
        assert await inbox.accept(msg, "slack")
        await inbox.note_progress(msg, {"ts": "1"})
        async with mgr.client.pipeline(transaction=True) as pipe:
            inbox.add_answer(pipe, msg, "answer")
            await pipe.execute()
        redis_server.client().hset("botd:inbox", msg.request_id, "{damaged")
        assert await Inbox(mgr, "botd", "h").pending() == []
        c = redis_server.client()
        assert not c.hexists("botd:inbox:progress", msg.request_id), "orphan progress left"
        assert not c.hexists("botd:inbox:answer", msg.request_id), "orphan answer left"
    finally:
        await mgr.close()


async def test_a_refused_command_does_not_mark_redis_down(tmp_path, redis_server):
    mgr = RedisManager(make_config(tmp_path, redis_server.url).redis, tmp_path)
    await mgr.start()
    try:
        h = HistoryStore(mgr, "botd", 60, 10)
        thread = ThreadKey("slack", "b", "c")
        redis_server.client().set(h.key(thread), "a string, not a list")  # WRONGTYPE for LRANGE
        try:
            await h.load(thread)
        except StoreUnavailable:
            pass
        # Redis answered (with WRONGTYPE): it is up.
        assert mgr.healthy, f"marked unreachable: {mgr.last_error}"
    finally:
        await mgr.close()


async def test_on_finished_is_called_for_jobs_that_never_start(tmp_path):
    from core.worker import InferenceWorker

    cfg = make_config(tmp_path, model={"n_ctx": 1024})
    queue = FairQueue(64, 8)
    depth_seen: list[int] = []
    finished: list[Job] = []

    def observe(job: Job) -> None:  # what Runtime._observe does with the gauge
        finished.append(job)
        depth_seen.append(len(queue))

    worker = InferenceWorker(create_engine(cfg.model), queue, max_wait_s=0.2, on_finished=observe)
    await worker.start()
    try:
        def job(user: str, n: int) -> Job:
            return Job(user=user, request=GenerationRequest(
                ThreadKey("t", "b", user), [{"role": "user", "content": "Write a long essay about the sea."}], n,
                temperature=0.0))
        a, b = job("a", 400), job("b", 4)
        worker.submit(a)
        async for _ in a.events():  # the first token: A is running
            break
        worker.submit(b)
        await asyncio.sleep(0.4)
        worker.cancel(a)
        assert await b.wait() == Finish.EXPIRED
        await asyncio.sleep(0.1)
        # The last value a Runtime puts in botd_queue_depth: 0, the queue being empty and idle.
        assert len(queue) == 0
        assert depth_seen[-1] == 0, f"queue depth last reported as {depth_seen[-1]}"
        assert b in finished, "on_finished never called for the BUSY job"
    finally:
        await worker.stop(0)
