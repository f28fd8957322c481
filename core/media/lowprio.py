"""One worker thread at the lowest CPU priority, for the media models (OCR, speech-to-text).

The chat model's threads come first on a shared box: a picture's OCR or a voice message's
transcription runs in a thread at nice 19 under ``SCHED_IDLE`` (as the knowledge ingest does),
so that a waking llama.cpp thread always preempts it. The models' own compute threads
(onnxruntime's and CTranslate2's pools) are created by this thread when it loads them, and a
new Linux thread inherits its creator's nice value and scheduling policy: they run idle too.
One thread per kind: two pictures are read one after the other, never side by side.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

log = structlog.get_logger("botd.media")

NICE = 19
T = TypeVar("T")


def lower_this_thread() -> bool:
    """Put the calling thread at nice 19 and SCHED_IDLE; False where the OS refuses."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, NICE)
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: it runs as it is
        log.info("could not lower the media thread's priority", error=str(exc))
        return False
    return True


class IdleWorker:
    """A single low-priority thread; :meth:`run` awaits a call made in it."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"botd-{name}", initializer=lower_this_thread)

    async def run(self, fn: Callable[[], T], timeout_s: float | None = None) -> T:
        """``fn()`` in the worker thread. Past ``timeout_s`` (or when the caller is cancelled) the
        caller gets TimeoutError at once and a call still queued is dropped; a call already running
        ends in its own time (a model cannot be interrupted mid-step; the work each call may do is
        bounded by its input's limits), its result unused."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        if timeout_s is None:
            return await fut
        # Cancelling the wrapper cancels the executor's future when it has not started yet.
        return await asyncio.wait_for(fut, timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
