"""The inference worker: one dedicated thread that owns the engine, fed from the fair queue.

The asyncio side (the dispatcher task) takes the next job from :class:`FairQueue` when
the thread is free and hands it over; the thread generates and sends every piece of
text back with ``loop.call_soon_threadsafe``, so the event loop never waits on the
model. llama.cpp releases the GIL while it computes, so the loop keeps serving
requests (health checks included) during generation.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

import structlog

from core.engines.base import Engine, EngineError, PromptTooLong
from core.jobs import FairQueue, Job, QueueFull
from core.messages import Finish, Usage

log = structlog.get_logger("botd.worker")

_STOP = object()


class _Swap:
    """A control item for the thread: load ``engine`` between jobs and use it from then on."""

    def __init__(self, engine: Engine, done: asyncio.Future[None]) -> None:
        self.engine = engine
        self.done = done


class InferenceWorker:
    def __init__(
        self,
        engine: Engine,
        jobs: FairQueue,
        *,
        max_wait_s: float = 120.0,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.max_wait_s = max_wait_s
        self._on_finished = on_finished
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: Job | None = None
        self._accepting = True
        self.loaded = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread and load the model on it; raises :class:`EngineError` on failure."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="botd-inference", daemon=True)
        self._thread.start()
        await ready
        self.loaded = True
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="botd-dispatcher")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking jobs, let the running one finish for up to ``grace_s``, then stop the thread."""
        self._accepting = False
        # Taken before the dispatcher is cancelled: its cleanup forgets the running job.
        current = self._current
        if self._dispatcher:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
        # Waiting jobs end with "shutdown" at once: platform messages among them stay in the
        # durable inbox and are answered after the restart.
        for job in self.jobs.pending():
            self.jobs.remove(job)
            job.finish("shutdown", error="the daemon is shutting down")
        if current is not None:
            try:
                await asyncio.wait_for(current.wait(), grace_s)
            except TimeoutError:
                log.warning("shutdown grace period over; stopping the running generation", grace_s=grace_s)
                current.interrupt()
                await current.wait()
        if self._thread and self._thread.is_alive():
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join, 30)
        self.loaded = False

    async def swap_engine(self, engine: Engine) -> None:
        """Load ``engine`` on the worker thread once the running job is over, then use it.

        Waiting jobs stay queued meanwhile. If it fails to load, the old engine stays and the
        :class:`EngineError` is raised here.
        """
        assert self._loop is not None, "worker not started"
        done: asyncio.Future[None] = self._loop.create_future()
        self._inbox.put(_Swap(engine, done))
        await done

    # -- submitting -------------------------------------------------------------------

    def submit(self, job: Job, force: bool = False) -> None:
        """Queue a job (raises :class:`QueueFull` at once when there is no room or we are stopping)."""
        if not self._accepting:
            raise QueueFull("the daemon is shutting down", self.jobs.retry_after_s)
        self.jobs.put_nowait(job, force=force)

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop it between tokens if it runs."""
        job.cancel()
        if self.jobs.remove(job):
            job.finish("cancelled")

    @property
    def accepting(self) -> bool:
        """False once :meth:`stop` has begun."""
        return self._accepting

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def queue_depth(self) -> int:
        return len(self.jobs)

    # -- the asyncio side -------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            job = await self.jobs.get()
            if job.cancelled:
                self.jobs.release(job)
                job.finish("cancelled")
                continue
            if job.queue_wait_s > self.max_wait_s and not job.replayed:
                self.jobs.release(job)
                job.finish(Finish.BUSY, error=f"waited {job.queue_wait_s:.0f} s in the queue without a free slot",
                           retry_after=self.jobs.retry_after_s)
                continue
            job.started_at = time.monotonic()
            self._current = job
            self._inbox.put(job)
            try:
                await job.wait()
            finally:
                self._current = None
                self.jobs.release(job)
                if self._on_finished:
                    try:
                        self._on_finished(job)
                    except Exception:  # a metrics hook must never stop the worker
                        log.exception("on_finished hook failed")

    # -- the worker thread ------------------------------------------------------------

    def _thread_main(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self.engine.load()
        except BaseException as exc:  # report any load failure to start(), then end the thread
            err = exc if isinstance(exc, EngineError) else EngineError(f"{type(exc).__name__}: {exc}")
            loop.call_soon_threadsafe(_set_exception, ready, err)
            return
        loop.call_soon_threadsafe(_set_result, ready)
        while True:
            item = self._inbox.get()
            if item is _STOP:
                break
            if isinstance(item, _Swap):
                self._swap(item, loop)
                continue
            assert isinstance(item, Job)
            self._run(item, loop)
        try:
            self.engine.close()
        except Exception:
            log.exception("engine close failed")

    def _swap(self, swap: _Swap, loop: asyncio.AbstractEventLoop) -> None:
        try:
            swap.engine.load()
        except BaseException as exc:
            err = exc if isinstance(exc, EngineError) else EngineError(f"{type(exc).__name__}: {exc}")
            loop.call_soon_threadsafe(_set_exception, swap.done, err)
            return
        old, self.engine = self.engine, swap.engine
        try:
            old.close()
        except Exception:
            log.exception("closing the previous engine failed")
        loop.call_soon_threadsafe(_set_result, swap.done)

    def _run(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        deadline = time.monotonic() + job.timeout_s
        timed_out = False

        def should_stop() -> bool:
            nonlocal timed_out
            if job.stop_flag.is_set():
                return True
            if time.monotonic() > deadline:
                timed_out = True
                return True
            return False

        # Text waits here until the loop takes it: one wake-up of the loop carries every
        # token produced since the last one, so a busy loop costs the model no extra time.
        pending: list[str] = []
        lock = threading.Lock()
        scheduled = False

        def hand_over() -> None:
            nonlocal scheduled
            with lock:
                text = "".join(pending)
                pending.clear()
                scheduled = False
            if text:
                job.push_text(text)

        reason, usage, error = "error", Usage(), None
        try:
            for chunk in self.engine.generate(job.request, should_stop):
                if chunk.text:
                    with lock:
                        pending.append(chunk.text)
                        wake = not scheduled
                        scheduled = True
                    if wake:
                        loop.call_soon_threadsafe(hand_over)
                if chunk.finish_reason:
                    reason = chunk.finish_reason
                    usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)
            if reason == "cancelled" and job.interrupted:
                reason, error = "shutdown", "the daemon is shutting down"
            elif reason == "cancelled" and timed_out:
                reason, error = "timeout", f"generation stopped after {job.timeout_s:g} s"
        except PromptTooLong as exc:
            reason, error = "error", str(exc)
        except Exception as exc:  # the worker thread survives any single job's failure
            log.exception("generation failed", job_id=job.id)
            reason, error = "error", f"generation failed: {type(exc).__name__}"
        finally:
            loop.call_soon_threadsafe(hand_over)
            loop.call_soon_threadsafe(job.finish, reason, usage, error)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
