"""The inference worker: one dedicated thread that owns the engine, fed from the fair queue.

The asyncio side (the dispatcher task) takes the next job from :class:`FairQueue` whenever
one of the engine's ``parallel`` slots is free and hands it over; the thread steps every
running job together (one batched decode per step, a new job joining at the next step) and
hands what every job produced in a step to the event loop in one ``call_soon_threadsafe``
(one wake of the loop per step, however many streams), so the event loop never waits on the
model and the model's threads are not interrupted once per stream per token. llama.cpp
releases the GIL while it computes, so the loop keeps serving requests (health checks
included) during generation.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from collections.abc import Callable

import structlog

from core.engines.base import Engine, EngineError, Generation, PromptTooLong
from core.jobs import FairQueue, Job, QueueFull
from core.messages import Finish, Usage

log = structlog.get_logger("botd.worker")

_STOP = object()
# Before any job has finished: a guess of one answer's time, in seconds (an ETA needs a rate).
GUESS_SERVICE_S = 10.0
# Weight of the newest answer in the running mean of answer times.
_SERVICE_WEIGHT = 0.2
# How long the worker waits without news before the engine's idle work (reading ahead).
IDLE_S = 0.25


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
        self._running: set[Job] = set()
        # The thread's hand-over to the loop (set when the thread starts).
        self._delivery: _Delivery | None = None
        self._accepting = True
        self.loaded = False
        # Cleared by :meth:`pause`: the dispatcher takes no new job (the model is to be unloaded).
        self._gate = asyncio.Event()
        self._gate.set()
        # Measured: the running mean of how long an answer holds a slot (seconds), None until
        # one has finished; the waiting notice's estimate is built on it.
        self.service_s: float | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread and load the model on it; raises :class:`EngineError` on failure.
        Called again after :meth:`unload` to load the model again (jobs queued meanwhile wait)."""
        self._loop = asyncio.get_running_loop()
        self._gate.set()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="botd-inference", daemon=True)
        self._thread.start()
        await ready
        self.loaded = True
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="botd-dispatcher")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking jobs, let the running ones finish for up to ``grace_s``, then stop the thread."""
        self._accepting = False
        # Taken before the dispatcher is cancelled.
        running = list(self._running)
        if self._dispatcher:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
        # Waiting jobs end with "shutdown" at once: platform messages among them stay in the
        # durable inbox and are answered after the restart.
        self.drop_pending(Finish.SHUTDOWN, "the daemon is shutting down")
        if running:
            _, late = await asyncio.wait([asyncio.ensure_future(j.wait()) for j in running], timeout=grace_s)
            if late:
                log.warning("shutdown grace period over; stopping the running generations", grace_s=grace_s,
                            running=len(late))
                for job in running:
                    if not job.done:
                        job.interrupt()
                await asyncio.wait([asyncio.ensure_future(j.wait()) for j in running])
        if self._thread and self._thread.is_alive():
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join, 30)
        self.loaded = False

    def drop_pending(self, reason: Finish, error: str, retry_after: int | None = None) -> None:
        """End every waiting job with ``reason`` (nothing was generated for them)."""
        for job in self.jobs.pending():
            self.jobs.remove(job)
            job.finish(reason, error=error, retry_after=retry_after)
            self._notify(job)

    def pause(self) -> None:
        """Take no new job from the queue until :meth:`start` (the model is about to be unloaded)."""
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    @property
    def paused(self) -> bool:
        return not self._gate.is_set()

    async def unload(self) -> None:
        """Free the model while nothing runs: the thread closes the engine and ends; the queue
        stays (jobs may wait in it) and :meth:`start` loads the model again."""
        assert not self._running, "unload with jobs running"
        if self._dispatcher:
            self._dispatcher.cancel()
            try:
                await self._dispatcher
            except asyncio.CancelledError:
                pass
            self._dispatcher = None
        self.loaded = False
        if self._thread and self._thread.is_alive():
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    def interrupt_running(self) -> None:
        """Stop every running generation now (they end with "shutdown")."""
        for running in list(self._running):
            if not running.done:
                running.interrupt()

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
            job.finish(Finish.CANCELLED)
            self._notify(job)

    @property
    def accepting(self) -> bool:
        """False once :meth:`stop` has begun."""
        return self._accepting

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self.jobs)

    def standing(self, job: Job) -> tuple[int, float] | None:
        """Where a waiting ``job`` stands: the jobs the fair queue hands out before it and the
        expected wait in seconds (the measured answer time, ``parallel`` answered at once);
        None once it has started (or is not queued here)."""
        ahead = self.jobs.ahead_of(job)
        if ahead is None:
            return None
        service = self.service_s if self.service_s is not None else GUESS_SERVICE_S
        parallel = max(1, self.engine.parallel)
        # It starts when a slot frees after every job ahead of it has taken one.
        free = max(0, parallel - len(self._running))
        rounds = max(0, ahead + 1 - free)
        return ahead, rounds * service / parallel

    # -- the asyncio side -------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        # The fair queue decides who gets the next free slot; the thread decodes every running
        # job together.
        slots = asyncio.Semaphore(max(1, self.engine.parallel))
        while True:
            await slots.acquire()
            try:
                await self._gate.wait()
                job = await self.jobs.get()
            except BaseException:
                slots.release()
                raise
            if job.cancelled:
                self.jobs.release(job)
                job.finish(Finish.CANCELLED)
                slots.release()
                self._notify(job)
                continue
            if job.queue_wait_s > self.max_wait_s and not job.replayed:
                self.jobs.release(job)
                job.finish(Finish.EXPIRED, error=f"waited {job.queue_wait_s:.0f} s in the queue without a free slot",
                           retry_after=self.jobs.retry_after_s)
                slots.release()
                self._notify(job)
                continue
            job.started_at = time.monotonic()
            self._running.add(job)
            self._inbox.put(job)
            asyncio.ensure_future(job.wait()).add_done_callback(
                functools.partial(self._on_wait_done, job, slots))

    def _on_wait_done(self, job: Job, slots: asyncio.Semaphore, _done: object) -> None:
        self._ended(job, slots)

    def _ended(self, job: Job, slots: asyncio.Semaphore) -> None:
        if job.started_at is not None and job.finished_at is not None and job.finish_reason in (
                Finish.STOP, Finish.LENGTH):
            took = job.finished_at - job.started_at
            self.service_s = took if self.service_s is None else (
                (1 - _SERVICE_WEIGHT) * self.service_s + _SERVICE_WEIGHT * took)
        self._running.discard(job)
        self.jobs.release(job)
        slots.release()
        self._notify(job)

    def _notify(self, job: Job) -> None:
        """Every job that ends, started or not, reaches the hook (queue depth, wait times)."""
        if self._on_finished:
            try:
                self._on_finished(job)
            except Exception:  # a metrics hook must never stop the worker
                log.exception("on_finished hook failed")

    # -- the worker thread ------------------------------------------------------------

    def _next_when_idle(self) -> object:
        """The next item for an idle worker. The engine's idle work (a piece at a time) waits for
        IDLE_S without news first: a request that comes right after an answer (a client's next
        call) would otherwise wait behind it, while people take seconds to write their next turn."""
        while True:
            try:
                return self._inbox.get(timeout=IDLE_S)
            except queue.Empty:
                pass
            try:
                if not self.engine.read_ahead():
                    return self._inbox.get()
            except Exception:  # idle work is optional: never let it stop the worker
                log.exception("the engine's idle work failed")
                return self._inbox.get()

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
        self._delivery = delivery = _Delivery(loop)
        running: list[_Running] = []
        held: list[Job] = []
        swap: _Swap | None = None
        stopping = False
        while True:
            # Wait for work only when nothing runs (after the engine's idle work, one piece at a
            # time, each time nothing arrived); otherwise take what arrived and step on.
            items: list[object] = []
            if not running and not held:
                items.append(self._next_when_idle())
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Swap):
                    swap = item
                else:
                    assert isinstance(item, Job)
                    held.append(item)
            if swap is not None and not running:
                self._swap(swap, loop)
                swap = None
            if swap is None:
                # More jobs than slots only after a reload made `parallel` smaller: they wait here.
                while held and len(running) < self.engine.parallel:
                    started = self._open(held.pop(0), delivery)
                    if started is not None:
                        running.append(started)
            delivery.flush()
            if stopping and not running and not held:
                break
            if not running:
                continue
            try:
                self.engine.step([r.generation for r in running])
            except Exception:  # the worker thread survives any step's failure
                log.exception("generation step failed")
                for r in running:
                    r.generation.failed = True
                    r.fail("generation failed: step error")
                    self.engine.release(r.generation)
                running.clear()
                delivery.flush()
                continue
            for r in running:
                r.drain()
            delivery.flush()  # one wake of the loop for every stream's text of this step
            running = [r for r in running if not r.finished]
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

    def _open(self, job: Job, delivery: _Delivery) -> _Running | None:
        running = _Running(job, delivery)
        try:
            running.generation = self.engine.open(job.request, running.should_stop)
        except PromptTooLong as exc:
            running.fail(str(exc))
            return None
        except Exception as exc:
            log.exception("generation failed to start", job_id=job.id)
            running.fail(f"generation failed: {type(exc).__name__}")
            return None
        return running


class _Delivery:
    """What the worker thread hands to the event loop: every job's text and endings since the
    loop last took them, carried by one ``call_soon_threadsafe`` (a wake of the loop's selector)
    at most per step, whatever the number of streams; none while the previous one is still
    waiting to run (it will carry the new pieces too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        # (job, text) and (job, (reason, usage, error)) in the order they happened.
        self._items: list[tuple[Job, str | tuple[str, Usage, str | None]]] = []
        self._scheduled = False
        self.wakes = 0

    def text(self, job: Job, text: str) -> None:
        with self._lock:
            self._items.append((job, text))

    def end(self, job: Job, reason: str, usage: Usage, error: str | None) -> None:
        with self._lock:
            self._items.append((job, (reason, usage, error)))

    def flush(self) -> None:
        """Called by the worker thread after each step: wake the loop once if there is news."""
        with self._lock:
            if not self._items or self._scheduled:
                return
            self._scheduled = True
        self.wakes += 1
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop: each job's pieces joined into one, then its ending after them."""
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        texts: dict[Job, list[str]] = {}
        for job, item in items:
            if isinstance(item, str):
                texts.setdefault(job, []).append(item)
                continue
            pieces = texts.pop(job, None)
            self._apply(job, "".join(pieces) if pieces else "", item)
        for job, pieces in texts.items():
            self._apply(job, "".join(pieces), None)

    @staticmethod
    def _apply(job: Job, text: str, end: tuple[str, Usage, str | None] | None) -> None:
        try:  # one job's trouble must not keep the others' text from them
            if text:
                job.push_text(text)
            if end is not None:
                job.finish(*end)
        except Exception:
            log.exception("handing a job's text to the loop failed", job_id=job.id)


class _Running:
    """A job the thread is generating: its stop check and the hand-over of its text to the loop."""

    def __init__(self, job: Job, delivery: _Delivery) -> None:
        self.job = job
        self.delivery = delivery
        self.deadline = time.monotonic() + job.timeout_s
        self.timed_out = False
        self.finished = False
        self.generation: Generation = Generation()

    def should_stop(self) -> bool:
        if self.job.stop_flag.is_set():
            return True
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        return False

    def drain(self) -> None:
        out = self.generation.out
        for chunk in out:
            if chunk.text:
                self.delivery.text(self.job, chunk.text)
            if chunk.finish_reason:
                reason, error = chunk.finish_reason, chunk.error
                if reason == "cancelled" and self.job.interrupted:
                    reason, error = "shutdown", "the daemon is shutting down"
                elif reason == "cancelled" and self.timed_out:
                    reason, error = "timeout", f"generation stopped after {self.job.timeout_s:g} s"
                usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)
                self.job.cached_tokens = chunk.cached_tokens
                self._end(reason, usage, error)
        out.clear()

    def fail(self, error: str) -> None:
        self._end("error", Usage(), error)

    def _end(self, reason: str, usage: Usage, error: str | None) -> None:
        self.finished = True
        self.delivery.end(self.job, reason, usage, error)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
