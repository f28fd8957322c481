"""core/worker.py ``InferenceWorker`` driving the real ``LlamaCppEngine`` on the embedded SmolLM2
model, built the way core/runtime.py builds it (``create_engine``, ``FairQueue``), with no Redis
and no daemon.

Covers: a job streams its text as events and ends with STOP or LENGTH and its token counts;
``max_tokens`` ends it with LENGTH; ``cancel`` stops a running job (CANCELLED) and frees its
slot, or drops a queued one; with ``parallel=2`` two jobs generate at once (and with
``parallel=1`` they do not); ``stop`` ends queued jobs with SHUTDOWN, lets a running one finish
within the grace period and interrupts it (SHUTDOWN) after it; ``timeout_s`` ends a generation
with TIMEOUT; a prompt that does not fit the context ends with ERROR and the worker goes on; a
job that waited past ``max_wait_s`` ends BUSY without generating (a replayed one is still
answered); and a thread's next turn reuses the prompt tokens its previous turn left in the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from core.engines import create_engine
from core.engines.base import GenerationRequest
from core.jobs import FairQueue, Job, QueueFull
from core.messages import Finish, ReplyEvent, ThreadKey
from core.worker import InferenceWorker
from tests.helpers import make_config, wait_for

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# Prompts the model answers at length, so that a generation lasts until its max_tokens.
ESSAY = [SYSTEM, {"role": "user", "content": "Write a long essay about the history of the sea."}]


@contextlib.asynccontextmanager
async def started_worker(tmp_path, *, parallel: int = 1, max_wait_s: float = 120.0,
                         per_user: int = 8) -> AsyncIterator[tuple[InferenceWorker, list[Job]]]:
    """The worker as the runtime builds it; yields it and the jobs ``on_finished`` reported."""
    # One llama.cpp thread: with two on two shared cores, llama.cpp's threads wait on each other
    # whenever anything else runs, and a 16-token reply can take seconds instead of a fraction.
    cfg = make_config(tmp_path, model={"parallel": parallel, "n_ctx": 1024, "n_threads": 1})
    engine = create_engine(cfg.model)
    queue = FairQueue(cfg.queue.max_size, per_user, cfg.queue.retry_after_s)
    finished: list[Job] = []
    worker = InferenceWorker(engine, queue, max_wait_s=max_wait_s, on_finished=finished.append)
    await worker.start()
    assert worker.loaded
    try:
        yield worker, finished
    finally:
        await worker.stop(grace_s=0)


def job(messages: list[dict[str, str]] = ESSAY, max_tokens: int = 12, thread: str = "t1", user: str = "u1",
        **extra) -> Job:
    request = GenerationRequest(ThreadKey("test", "bot", thread), messages, max_tokens, temperature=0.0, seed=1)
    return Job(user=user, request=request, **extra)


async def collect(j: Job) -> list[ReplyEvent]:
    return [ev async for ev in j.events()]


async def generating(j: Job) -> None:
    """Until ``j`` has produced its first visible text."""
    async def started() -> bool:
        assert not j.done, f"the job ended before producing text: {j.finish_reason}"
        return j.first_token_at is not None

    await wait_for(started, timeout=30, interval=0.01)


async def _true(value: bool) -> bool:
    """A plain condition as a ``wait_for`` predicate."""
    return value


async def test_a_job_streams_its_text_and_ends_with_its_usage(tmp_path):
    async with started_worker(tmp_path) as (worker, finished):
        j = job([SYSTEM, {"role": "user", "content": "Say hello."}], max_tokens=16)
        worker.submit(j)
        events = await asyncio.wait_for(collect(j), 60)
        *deltas, last = events
        assert deltas and all(ev.delta and not ev.done for ev in deltas)
        assert last.done and last.finish_reason in (Finish.STOP, Finish.LENGTH) and last.error is None
        assert last.text == "".join(ev.delta for ev in deltas) == j.text and j.text.strip()
        assert await j.wait() == last.finish_reason == j.finish_reason
        usage = last.usage
        assert usage is not None and usage == j.usage
        assert usage.prompt_tokens > 10  # the system and user turns in the chat template
        assert 1 <= usage.completion_tokens <= 16
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert j.started_at is not None and j.first_token_at is not None and j.finished_at is not None
        assert j.enqueued_at <= j.started_at <= j.first_token_at <= j.finished_at
        # The hook ran once the job ended, and the slot and the user's share are free again.
        await wait_for(lambda: _true(finished == [j]))
        assert not worker.busy and worker.queue_depth == 0 and worker.jobs._active == {}


async def test_max_tokens_ends_the_reply_with_length(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        for budget in (3, 9):
            j = job(max_tokens=budget)
            worker.submit(j)
            assert await asyncio.wait_for(j.wait(), 60) == Finish.LENGTH
            assert j.usage.completion_tokens == budget
            assert j.text.strip()


async def test_cancel_stops_a_running_job_and_frees_its_slot(tmp_path):
    async with started_worker(tmp_path) as (worker, finished):
        long = job(max_tokens=400)
        worker.submit(long)
        await generating(long)
        assert worker.busy
        worker.cancel(long)
        assert await asyncio.wait_for(long.wait(), 30) == Finish.CANCELLED
        assert 0 < long.usage.completion_tokens < 400
        events = await asyncio.wait_for(collect(long), 5)
        assert events[-1].finish_reason == Finish.CANCELLED and events[-1].text == long.text
        # The worker goes on: the next job runs to its end.
        nxt = job(max_tokens=4, thread="t2")
        worker.submit(nxt)
        assert await asyncio.wait_for(nxt.wait(), 60) == Finish.LENGTH
        await wait_for(lambda: _true(len(finished) == 2))
        assert not worker.busy


async def test_cancel_of_a_queued_job_ends_it_without_generating(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        first, queued = job(max_tokens=400), job(max_tokens=8, thread="t2", user="u2")
        worker.submit(first)
        await generating(first)
        worker.submit(queued)
        assert worker.queue_depth == 1
        worker.cancel(queued)
        assert await asyncio.wait_for(queued.wait(), 5) == Finish.CANCELLED
        assert worker.queue_depth == 0 and queued.started_at is None and queued.text == ""
        assert queued.usage.completion_tokens == 0
        assert not first.done
        worker.cancel(first)
        assert await asyncio.wait_for(first.wait(), 30) == Finish.CANCELLED


@pytest.mark.parametrize("parallel", [1, 2])
async def test_jobs_overlap_only_when_there_are_slots_for_them(tmp_path, parallel):
    async with started_worker(tmp_path, parallel=parallel) as (worker, _):
        a = job(max_tokens=16, thread="a", user="ua")
        b = job([SYSTEM, {"role": "user", "content": "Write a long story about a lighthouse keeper."}],
                max_tokens=16, thread="b", user="ub")
        worker.submit(a)
        worker.submit(b)
        seen_running = 0

        async def both_done() -> bool:
            nonlocal seen_running
            seen_running = max(seen_running, worker.running)
            return a.done and b.done

        await wait_for(both_done, timeout=60, interval=0.005)
        assert a.finish_reason == b.finish_reason == Finish.LENGTH
        assert a.first_token_at is not None and b.first_token_at is not None
        if parallel == 2:
            # Both had started, and produced text, before either finished.
            assert max(a.started_at, b.started_at) < min(a.finished_at, b.finished_at)
            assert max(a.first_token_at, b.first_token_at) < min(a.finished_at, b.finished_at)
            assert seen_running == 2
        else:
            # The control: one slot, so the second starts only after the first has ended.
            first, second = sorted((a, b), key=lambda j: j.started_at)
            assert second.started_at >= first.finished_at
            assert seen_running == 1


async def test_stop_ends_queued_jobs_with_shutdown_and_lets_the_running_one_finish(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        running = job(max_tokens=12)
        queued = [job(max_tokens=12, thread=f"q{i}", user=f"q{i}") for i in range(3)]
        worker.submit(running)
        await generating(running)
        for q in queued:
            worker.submit(q)
        await asyncio.wait_for(worker.stop(grace_s=60), 90)
        assert running.finish_reason == Finish.LENGTH and running.usage.completion_tokens == 12
        for q in queued:
            assert q.finish_reason == Finish.SHUTDOWN
            assert q.started_at is None and q.text == "" and q.usage.completion_tokens == 0
            last = (await asyncio.wait_for(collect(q), 5))[-1]
            assert last.finish_reason == Finish.SHUTDOWN and last.error
        assert worker.queue_depth == 0 and not worker.accepting and not worker.loaded
        with pytest.raises(QueueFull):
            worker.submit(job())


async def test_stop_interrupts_a_running_job_after_the_grace_period(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        long, queued = job(max_tokens=400), job(max_tokens=8, thread="t2", user="u2")
        worker.submit(long)
        await generating(long)
        worker.submit(queued)
        t0 = time.monotonic()
        await asyncio.wait_for(worker.stop(grace_s=0.2), 30)
        assert time.monotonic() - t0 < 10
        assert long.finish_reason == Finish.SHUTDOWN
        assert 0 < long.usage.completion_tokens < 400 and long.text
        assert queued.finish_reason == Finish.SHUTDOWN and queued.started_at is None


async def test_a_job_that_waited_past_max_wait_ends_busy_without_generating(tmp_path):
    async with started_worker(tmp_path, max_wait_s=0.3, per_user=1) as (worker, _):
        engine = worker.engine
        blocker = job(max_tokens=400, user="other")
        worker.submit(blocker)
        await generating(blocker)
        late = job(max_tokens=8, thread="t2", user="u2")
        worker.submit(late)
        await asyncio.sleep(0.5)  # longer than max_wait_s, while the only slot is taken
        assert not late.done and not blocker.done
        steps_before = engine.stats.steps
        worker.cancel(blocker)
        assert await asyncio.wait_for(blocker.wait(), 30) == Finish.CANCELLED
        assert await asyncio.wait_for(late.wait(), 10) == Finish.EXPIRED
        last = (await asyncio.wait_for(collect(late), 5))[-1]
        assert last.finish_reason == Finish.EXPIRED and last.retry_after == worker.jobs.retry_after_s
        assert last.error and "waited" in last.error
        assert late.started_at is None and late.first_token_at is None and late.text == ""
        assert late.usage.prompt_tokens == late.usage.completion_tokens == 0
        assert engine.stats.steps - steps_before <= 1  # at most the blocker's last step: nothing for `late`
        # Its place in the user's share is free again (per_user=1), and a fresh job is answered.
        fresh = job(max_tokens=4, thread="t2", user="u2")
        worker.submit(fresh)
        assert await asyncio.wait_for(fresh.wait(), 60) == Finish.LENGTH


async def test_a_replayed_job_is_answered_however_long_it_waited(tmp_path):
    async with started_worker(tmp_path, max_wait_s=0.3) as (worker, _):
        old = time.monotonic() - 3600
        stale, replayed = job(max_tokens=4, enqueued_at=old), job(max_tokens=4, thread="t2", enqueued_at=old,
                                                                  replayed=True)
        worker.submit(stale)
        worker.submit(replayed, force=True)
        assert await asyncio.wait_for(stale.wait(), 10) == Finish.EXPIRED
        assert await asyncio.wait_for(replayed.wait(), 60) == Finish.LENGTH
        assert replayed.usage.completion_tokens == 4 and replayed.text


async def test_job_timeout_stops_a_generation_with_timeout(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        slow = job(max_tokens=400, timeout_s=0.3)
        worker.submit(slow)
        assert await asyncio.wait_for(slow.wait(), 30) == Finish.TIMEOUT
        last = (await asyncio.wait_for(collect(slow), 5))[-1]
        assert last.error and "0.3 s" in last.error
        assert 0 < slow.usage.completion_tokens < 400 and last.text == slow.text
        assert Finish.TIMEOUT.complete  # what it wrote is kept as the answer


async def test_a_prompt_longer_than_the_context_ends_with_an_error_and_the_worker_goes_on(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        huge = job([SYSTEM, {"role": "user", "content": "sea " * 3000}], max_tokens=8)
        worker.submit(huge)
        assert await asyncio.wait_for(huge.wait(), 30) == Finish.ERROR
        last = (await asyncio.wait_for(collect(huge), 5))[-1]
        assert last.error and "context" in last.error and huge.text == ""
        ok = job(max_tokens=4, thread="t2")
        worker.submit(ok)
        assert await asyncio.wait_for(ok.wait(), 60) == Finish.LENGTH


async def test_the_next_turn_of_a_thread_reuses_its_cached_prompt(tmp_path):
    async with started_worker(tmp_path) as (worker, _):
        turn1 = [SYSTEM, {"role": "user", "content": "Name a colour."}]
        first = job(turn1, max_tokens=8, thread="chat")
        worker.submit(first)
        assert await asyncio.wait_for(first.wait(), 60) in (Finish.STOP, Finish.LENGTH)
        assert first.cached_tokens == 0  # a fresh engine holds nothing
        turn2 = [*turn1, {"role": "assistant", "content": first.text},
                 {"role": "user", "content": "Name another one."}]
        second = job(turn2, max_tokens=8, thread="chat")
        worker.submit(second)
        assert await asyncio.wait_for(second.wait(), 60) in (Finish.STOP, Finish.LENGTH)
        # At least the whole first prompt was already read; the rest of the second was read now.
        assert second.cached_tokens >= first.usage.prompt_tokens
        assert second.cached_tokens < second.usage.prompt_tokens
        assert worker.engine.stats.prompt_tokens_reused == second.cached_tokens


# Sentences the model repeats word for word (as in test_batching.py): several streams at once
# give the same text whatever the batch.
SENTENCES = ["the blue fox sleeps under the old bridge", "seven green apples fell on the kitchen floor",
             "my uncle builds wooden boats in the summer", "a quiet train crossed the snowy valley at dawn"]


def echo(sentence: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You repeat the user's sentence exactly."},
            {"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
            {"role": "user", "content": sentence}]


async def test_each_step_wakes_the_loop_once_for_all_streams(tmp_path):
    """Four streams at once: the worker thread hands a step's text of every stream (and their
    endings) to the loop in one call_soon_threadsafe, not one per stream per token."""
    import threading

    async with started_worker(tmp_path, parallel=4) as (worker, _):
        loop = asyncio.get_running_loop()
        wakes = {"n": 0}
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            if threading.current_thread().name == "botd-inference":
                wakes["n"] += 1
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        try:
            steps = worker.engine.stats.steps
            jobs = [job(echo(s), max_tokens=40, thread=f"wake-{i}", user=f"wake-u{i}") for i, s in enumerate(SENTENCES)]
            for j in jobs:
                worker.submit(j)
            streams = await asyncio.wait_for(asyncio.gather(*(collect(j) for j in jobs)), 180)
            steps = worker.engine.stats.steps - steps
        finally:
            del loop.call_soon_threadsafe  # the loop's own method again
        assert ["".join(ev.delta or "" for ev in events) for events in streams] == SENTENCES
        assert all(events[-1].finish_reason == Finish.STOP for events in streams)
        assert steps > 0
        assert 0 < wakes["n"] <= steps, (wakes["n"], steps)


async def test_chinese_text_split_across_tokens_streams_whole(tmp_path):
    """Token bytes come from a table; a character whose bytes span tokens (SmolLM2 spells most
    Chinese characters and emoji byte by byte) reaches the stream whole, never as U+FFFD."""
    text = "你好，世界！这是一个测试。🌍 naïve"
    async with started_worker(tmp_path) as (worker, _):
        request = GenerationRequest(ThreadKey("test", "bot", "zh"), [SYSTEM, {"role": "user", "content": "Say hi."}],
                                    64, temperature=0.0, grammar=f'root ::= "{text}"')
        j = Job(user="u1", request=request)
        worker.submit(j)
        events = await asyncio.wait_for(collect(j), 120)
        deltas = [ev.delta for ev in events if ev.delta]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
        assert events[-1].finish_reason == Finish.STOP
        engine = worker.engine
        pieces = engine._model.tokenize(text.encode(), add_bos=False, special=False)
        assert [engine._piece(t) for t in pieces] == [engine._model.detokenize([t]) for t in pieces]
        assert b"".join(engine._piece(t) for t in pieces).decode() == text
