"""Worker threads at a low CPU priority, for the work that must leave the chat model its cores:
the media models (OCR, speech-to-text), a knowledge base's ingest, the files sent in chat.

The chat model's threads come first on a shared box: such work runs in a thread at nice 19
under ``SCHED_IDLE`` (a file sent in chat at nice 10 alone: its sender waits for it), so that a
waking llama.cpp thread preempts it. A model's own compute threads (onnxruntime's and
CTranslate2's pools) are created by the worker thread when it loads them, and a new Linux thread
inherits its creator's nice value and scheduling policy: they run low too. An executor's threads
are reused, so each worker is one thread of its own (a lowered thread must not go on to serve
anything else): two pictures are read one after the other, never side by side.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

log = structlog.get_logger("botd.lowprio")

NICE = 19
T = TypeVar("T")


def lower_this_thread(nice: int = NICE, idle: bool = True) -> bool:
    """Put the calling thread at ``nice`` and, with ``idle``, under SCHED_IDLE; False where the OS refuses."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        if idle:
            # At nice 19 alone an ingest kept its slice, and the model's other thread spun at a
            # barrier: under SCHED_IDLE a waking model thread always preempts it at once.
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: it runs as it is
        log.info("could not lower a worker thread's priority", thread=threading.current_thread().name,
                 error=str(exc))
        return False
    return True


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _start(nice: int, idle: bool, setup: Callable[[], object] | None) -> None:
    lower_this_thread(nice, idle)
    if setup is not None:
        setup()


class IdleWorker:
    """A single low-priority thread; :meth:`run` awaits a call made in it. ``setup`` runs in the
    thread once, after it is lowered (e.g. its embedding model's thread count)."""

    def __init__(self, name: str, nice: int = NICE, idle: bool = True,
                 setup: Callable[[], object] | None = None) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"botd-{name}",
                                        initializer=functools.partial(_start, nice, idle, setup))

    async def run(self, fn: Callable[[], T], timeout_s: float | None = None) -> T:
        """``fn()`` in the worker thread. Past ``timeout_s`` (or when the caller is cancelled) the
        caller gets TimeoutError at once and a call still queued is dropped; a call already running
        ends in its own time (a model cannot be interrupted mid-step; the work each call may do is
        bounded by its input's limits), its result unused. Once closed: RuntimeError."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        if timeout_s is None:
            return await fut
        # Cancelling the wrapper cancels the executor's future when it has not started yet.
        return await asyncio.wait_for(fut, timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
