"""Jobs and the bounded, fair job queue in front of the inference worker.

Fairness: each user has a FIFO of jobs and users take turns (round-robin), so one
user's ten queued jobs do not hold back another user's single job. Bounds: a total
size and a per-user cap (queued plus running); a full queue refuses at once with
:class:`QueueFull` carrying a Retry-After hint, it never makes the caller wait.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from core.engines.base import GenerationRequest
from core.errors import BotdError
from core.messages import Finish, ReplyEvent, ThreadKey, Usage
from core.thinking import ThinkFilter


class QueueFull(BotdError):
    """The queue (or this user's share of it) is full; try again after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: int, per_user: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.per_user = per_user


@dataclass(eq=False)
class Job:
    """One generation: what to generate, for whom, and the stream its reply flows through."""

    user: str
    request: GenerationRequest
    keep_thinking: bool = False
    timeout_s: float = 300.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    text: str = ""
    finish_reason: Finish | None = None
    # A message accepted before a restart: it is answered however long it waits (never "busy").
    replayed: bool = False
    usage: Usage = field(default_factory=Usage)
    # Prompt tokens the engine found already read (the thread's earlier turns).
    cached_tokens: int = 0
    # Set from any thread: the worker checks it between tokens.
    stop_flag: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    # The model that answers it ("default": [model], or a [models.NAME] name); set when queued.
    model: str = "default"

    def __post_init__(self) -> None:
        self._events: asyncio.Queue[ReplyEvent] = asyncio.Queue()
        self._done = asyncio.get_running_loop().create_future()
        self._filter = None if self.keep_thinking else ThinkFilter()
        self._raw_text = ""

    @property
    def thread_key(self) -> ThreadKey:
        return self.request.thread_key

    @property
    def cancelled(self) -> bool:
        return self.stop_flag.is_set()

    @property
    def done(self) -> bool:
        return self._done.done()

    def cancel(self) -> None:
        """Stop this job: removed from the queue if waiting, stopped between tokens if running."""
        self.stop_flag.set()

    def interrupt(self) -> None:
        """Stop this job because the daemon stops: it ends with "shutdown" and is replayed later."""
        self.interrupted = True
        self.stop_flag.set()

    # -- called on the event loop by the worker -------------------------------------

    def history_text(self) -> str:
        """The answer as the thread's history keeps it: the shown text, with any leading
        whitespace the model produced (hidden from users, but part of the tokens its KV holds)."""
        return (self._filter.dropped_lead if self._filter else "") + self.text

    def push_text(self, raw: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._raw_text += raw
        visible = self._filter.feed(raw) if self._filter else raw
        if visible:
            self.text += visible
            self._events.put_nowait(ReplyEvent(delta=visible))

    def finish(self, reason: Finish | str, usage: Usage | None = None, error: str | None = None,
               retry_after: int | None = None) -> None:
        if self._done.done():
            return
        reason = Finish(reason)
        if self._filter:
            tail = self._filter.flush()
            if tail:
                self.text += tail
                self._events.put_nowait(ReplyEvent(delta=tail))
        self.finished_at = time.monotonic()
        self.finish_reason = reason
        if usage is not None:
            self.usage = usage
        self._events.put_nowait(ReplyEvent(finish_reason=reason, text=self.text, usage=self.usage, error=error,
                                           retry_after=retry_after))
        self._done.set_result(reason)

    # -- consumers ------------------------------------------------------------------

    async def events(self):  # -> AsyncIterator[ReplyEvent]
        while True:
            ev = await self._events.get()
            yield ev
            if ev.done:
                return

    async def wait(self) -> Finish:
        return await asyncio.shield(self._done)

    @property
    def queue_wait_s(self) -> float:
        end = self.started_at if self.started_at is not None else time.monotonic()
        return end - self.enqueued_at


class FairQueue:
    """Round-robin across users, bounded in total and per user. Single event loop only."""

    def __init__(self, max_size: int, per_user: int, retry_after_s: int = 5) -> None:
        self.max_size = max_size
        self.per_user = per_user
        self.retry_after_s = retry_after_s
        self._by_user: OrderedDict[str, deque[Job]] = OrderedDict()
        self._active: dict[str, int] = {}  # queued + running, per user
        self._size = 0
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    def put_nowait(self, job: Job, force: bool = False) -> None:
        """Queue ``job``; ``force`` skips the bounds (replaying messages accepted before a restart)."""
        if not force and self._size >= self.max_size:
            raise QueueFull("the queue is full", self.retry_after_s)
        if not force and self._active.get(job.user, 0) >= self.per_user:
            raise QueueFull(
                f"too many requests in flight for this user (limit {self.per_user})",
                self.retry_after_s,
                per_user=True,
            )
        self._by_user.setdefault(job.user, deque()).append(job)
        self._active[job.user] = self._active.get(job.user, 0) + 1
        self._size += 1
        self._nonempty.set()

    def release(self, job: Job) -> None:
        """The job has finished (or was dropped): free its place in the user's cap."""
        n = self._active.get(job.user, 0) - 1
        if n > 0:
            self._active[job.user] = n
        else:
            self._active.pop(job.user, None)

    def remove(self, job: Job) -> bool:
        """Take a waiting job out of the queue (its client went away)."""
        q = self._by_user.get(job.user)
        if not q or job not in q:
            return False
        q.remove(job)
        if not q:
            del self._by_user[job.user]
        self._size -= 1
        if not self._size:
            self._nonempty.clear()
        self.release(job)
        return True

    def _pop(self) -> Job:
        user, q = next(iter(self._by_user.items()))
        job = q.popleft()
        # The user goes to the back of the line; gone if nothing else is queued.
        del self._by_user[user]
        if q:
            self._by_user[user] = q
        self._size -= 1
        if not self._size:
            self._nonempty.clear()
        return job

    async def get(self) -> Job:
        while True:
            await self._nonempty.wait()
            if self._size:
                return self._pop()

    def pending(self) -> list[Job]:
        return [j for q in self._by_user.values() for j in q]

    def ahead_of(self, job: Job) -> int | None:
        """How many waiting jobs the queue will hand out before ``job`` (users take turns, each
        user's own jobs in order: the order :meth:`get` will follow unless someone new arrives);
        None when ``job`` is not waiting."""
        queues = [list(q) for q in self._by_user.values()]
        ahead = 0
        for turn in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if turn < len(q):
                    if q[turn] is job:
                        return ahead
                    ahead += 1
        return None
