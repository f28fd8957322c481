"""The runtime: Redis, history store, engine, fair queue and inference worker, started together.

Both the daemon and ``botd chat`` build one of these from a validated config.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from core import metrics
from core.audit import AuditLog
from core.config import DEFAULT_MODEL, Config, Settings
from core.engines import Engine, PromptTokenizer, create_engine
from core.feedback import FeedbackStore
from core.history import HistoryStore
from core.inbox import Inbox
from core.jobs import FairQueue, Job
from core.knowledge.embedder import Embedder
from core.knowledge.retriever import Retriever
from core.knowledge.thread_files import ThreadFiles
from core.kv import KeyValueCache
from core.models import ModelPool, ServedModel
from core.ratelimit import RateLimiter
from core.redis_store import RedisManager
from core.tools import ToolBox
from core.worker import InferenceWorker

log = structlog.get_logger("botd.runtime")


class Runtime:
    """Everything below the bots layer, started and stopped together: ``async with Runtime(...)``."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        cfg = settings.config
        self.redis = RedisManager(cfg.redis, cfg.server.state_dir)
        self.history = HistoryStore(
            self.redis, cfg.redis.key_prefix, cfg.redis.history_ttl_s, cfg.redis.history_max_messages
        )
        # Every configured model with its own queue and worker; [model] ("default") is the one
        # `engine`, `queue`, `worker` and `tokenizer` below name, loaded at start as before.
        self.models = ModelPool(cfg, on_finished=self._observe, default_engine=engine)
        self.engine: Engine = self.models.default.engine
        self.queue: FairQueue = self.models.default.queue
        self.worker: InferenceWorker = self.models.default.worker
        self.inbox = Inbox(self.redis, cfg.redis.key_prefix, cfg.server.instance_name(), lease_s=cfg.redis.lease_s,
                           max_deliveries=cfg.redis.max_deliveries)
        self.cache = KeyValueCache(self.redis, cfg.redis.key_prefix)
        # Files sent in chat: each thread's own temporary knowledge ([files]).
        self.thread_files = ThreadFiles(self.redis, settings, quiet=lambda: self.models.quiet(10.0))
        self.limits = RateLimiter(self.redis, cfg.redis.key_prefix, cfg.limits)
        self.audit = AuditLog(cfg.audit)
        # Answers' facts and the users' 👍 / 👎 on them; the retention is read at use time (a reload).
        self.feedback = FeedbackStore(self.redis, cfg.redis.key_prefix,
                                      lambda: self.settings.config.redis.feedback_retention_days * 86400)
        # The [tools.NAME] bots may call; MCP servers start with the runtime and stop with it.
        self.tools = ToolBox(cfg.tools)
        self._retiring: set[asyncio.Task[None]] = set()
        self.tokenizer: PromptTokenizer | None = None
        metrics.ENGINE.source = lambda: self.worker.engine.state()
        metrics.MODELS.source = self.models.state
        self.retriever: Retriever | None = None
        self._make_retriever(cfg)
        self.started_at = time.time()
        # Set by the daemon once connectors run and earlier messages are replayed: /healthz says
        # "starting" until then.
        self.ready = False
        # Each knowledge base: "loading" (reading its index), "building" (first ingest under way),
        # "ready", "failed" (no index could be built or read). Answers wait while loading/building.
        self.knowledge_state: dict[str, str] = {}
        self._knowledge_changed = asyncio.Event()

    def _make_retriever(self, cfg: Config) -> None:
        # No knowledge bases configured: the embedding model is never loaded.
        if not cfg.knowledge:
            self.retriever = None
            return
        embedder = Embedder(cfg.embeddings.model, cfg.embeddings.batch_size)
        old = self.retriever
        same_model = old is not None and old.embedder.model_id == embedder.model_id
        if old is not None and same_model:
            embedder = old.embedder
        retriever = Retriever.from_config(cfg, embedder)
        if old is not None and same_model:
            # A reload keeps serving the indexes already loaded while the new ones load.
            retriever.adopt(old, list(cfg.knowledge))
        self.retriever = retriever

    async def load_knowledge(self) -> None:
        """Load the embedding model and every knowledge base's index (in a thread)."""
        for name in list(self.knowledge_state):
            if name not in self.cfg.knowledge:
                del self.knowledge_state[name]
        if self.retriever is None:
            return
        names = list(self.cfg.knowledge)
        for name in names:
            if self.knowledge_state.get(name) != "ready":
                self.set_knowledge_state(name, "loading")
        try:
            await asyncio.to_thread(self.retriever.embedder.load)
            await asyncio.to_thread(self.retriever.refresh, names)
        except BaseException:
            for name in names:
                if self.knowledge_state.get(name) == "loading":
                    self.set_knowledge_state(name, "failed")
            raise
        for name in names:
            if self.knowledge_state.get(name) == "loading":
                self.set_knowledge_state(name, "ready" if self.retriever.has_index(name) else "failed")

    def set_knowledge_state(self, name: str, state: str) -> None:
        self.knowledge_state[name] = state
        # Wake every waiter; later waiters wait on a fresh event.
        self._knowledge_changed.set()
        self._knowledge_changed = asyncio.Event()

    async def wait_knowledge(self, names: list[str], timeout_s: float) -> list[str]:
        """Wait (up to ``timeout_s``) until none of ``names`` is loading or being built; returns
        those still loading when the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [n for n in names if self.knowledge_state.get(n) in ("loading", "building")]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return waiting
            try:
                await asyncio.wait_for(self._knowledge_changed.wait(), left)
            except TimeoutError:
                pass

    @property
    def cfg(self) -> Config:
        return self.settings.config

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(grace_s=0)

    async def start(self) -> None:
        """Redis, the model and the knowledge indexes; on failure, what was started is stopped."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self) -> None:
        self.cfg.server.state_dir.mkdir(parents=True, exist_ok=True)
        await self.redis.start()
        await self.tools.start()
        knowledge = asyncio.create_task(self.load_knowledge())
        try:
            # The default model (its vocabulary-only tokenizer first, off the event loop); the
            # others load when a bot that uses them is first asked.
            await self.models.start()
        finally:
            self.tokenizer = self.models.default.tokenizer
            await knowledge

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.models.stop(grace_s)
        await self.redis.close()
        await self.tools.close()
        self.thread_files.close()
        for task in list(self._retiring):  # toolboxes a reload replaced, still finishing their calls
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self.audit.close()

    async def apply_tools(self, cfg: Config) -> bool:
        """A reload's ``[tools]``: when they changed, a new toolbox (its MCP servers started)
        takes over at once and the old one refuses new calls, finishes those under way and
        closes (so a narrowed ``allow`` list or schema is never left in force). True if replaced."""
        if self.tools.same_as(cfg.tools):
            return False
        changed = sorted(n for n in {*cfg.tools, *self.tools.cfg}
                         if cfg.tools.get(n) != self.tools.cfg.get(n)) or sorted(cfg.tools)
        box = ToolBox(cfg.tools)
        await box.start()
        old, self.tools = self.tools, box
        task = asyncio.create_task(old.retire(ToolBox.grace_s(old.cfg)), name="botd-tools-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("tools reloaded: the new definitions are in force", tools=changed)
        return True

    async def swap_model(self, cfg: Config) -> None:
        """Load the model ``cfg`` names once the worker is idle; the old one serves until then.

        Raises :class:`~core.engines.EngineError` (the old model stays) when it cannot load.
        """
        engine = create_engine(cfg.model)
        tokenizer = await asyncio.to_thread(engine.tokenizer)
        await self.models.swap_default(engine, tokenizer, cfg.model)
        self.engine, self.tokenizer = engine, tokenizer

    def model_for(self, bot: str) -> ServedModel:
        """The model that answers ``bot`` ([bots.NAME] model): its config, engine, queue, worker and
        (once :meth:`ModelPool.tokenizer` loaded it) tokenizer."""
        bot_cfg = self.cfg.bots.get(bot)
        return self.models.get(bot_cfg.model if bot_cfg is not None else DEFAULT_MODEL)

    def apply(self, cfg: Config) -> bool:
        """Take the settings of a reloaded config that need no restart (queue, limits, audit, history,
        knowledge); True when the knowledge settings changed (load them with :meth:`load_knowledge`)."""
        self.queue.max_size, self.queue.per_user = cfg.queue.max_size, cfg.queue.per_user
        self.queue.retry_after_s = cfg.queue.retry_after_s
        self.worker.max_wait_s = cfg.queue.max_wait_s
        self.models.apply(cfg)
        self.inbox.lease_s, self.inbox.max_deliveries = cfg.redis.lease_s, cfg.redis.max_deliveries
        self.limits.cfg = cfg.limits
        self.history.ttl_s, self.history.max_messages = cfg.redis.history_ttl_s, cfg.redis.history_max_messages
        if cfg.audit != self.cfg.audit:
            old, self.audit = self.audit, AuditLog(cfg.audit)
            old.close()
        knowledge_changed = (cfg.knowledge, cfg.embeddings, cfg.retrieval) != (
            self.cfg.knowledge, self.cfg.embeddings, self.cfg.retrieval)
        if knowledge_changed:
            self._make_retriever(cfg)
        return knowledge_changed

    def _observe(self, job: Job) -> None:
        metrics.QUEUE_DEPTH.set(self.models.queue_depth())
        metrics.QUEUE_WAIT.observe(job.queue_wait_s)
        if job.started_at is not None and job.finished_at is not None:
            metrics.GENERATION.observe(job.finished_at - job.started_at)
            if job.first_token_at is not None:
                metrics.TTFT.observe(job.first_token_at - job.started_at)
                decode_s = job.finished_at - job.first_token_at
                if decode_s > 0 and job.usage.completion_tokens > 1:
                    metrics.TOKENS_PER_SECOND.set((job.usage.completion_tokens - 1) / decode_s)
        metrics.TOKENS.labels("prompt").inc(job.usage.prompt_tokens)
        metrics.TOKENS.labels("completion").inc(job.usage.completion_tokens)

    def health(self) -> dict[str, Any]:
        return {
            # The default model may be swapped out under [server] max_loaded; the pool still serves.
            "model_loaded": self.worker.loaded or self.models.started,
            "model": self.cfg.model.name,
            "redis": "ok" if self.redis.healthy else "unreachable",
            "redis_error": self.redis.last_error,
            "queue_depth": len(self.queue),
            "queue_capacity": self.queue.max_size,
            "generating": self.worker.busy,
            "engine": self.worker.engine.state(),
            # Each configured model: loaded or not, its queue, answers running, loads, its engine's figures.
            "models": self.models.state(),
            "max_loaded": self.models.max_loaded,
            "ready": self.ready,
            "knowledge": dict(self.knowledge_state),
            "uptime_s": round(time.time() - self.started_at, 1),
        }
