"""The model pool: every configured model ([model] as "default", each [models.NAME]), each with
its own engine, fair queue and inference worker (one thread per loaded model).

A model is loaded when a job for it is queued and it is not loaded yet (the default one at
start); at most ``[server] max_loaded`` are in memory at once. Loading one more first unloads
the least recently used model that has nothing running or queued; when every loaded model is
busy, the least recently used one (loaded for at least :data:`MIN_RESIDENT_S`) takes no new job
and is unloaded once its running answers end, and the waiting jobs keep their place in their
model's queue meanwhile. A model that cannot come in within ``[queue] max_wait_s`` answers its
waiting jobs "busy"; one that cannot load at all (the file, not enough memory) answers them
with the error.

Before a model loads, its memory need (file size x 1.2, plus its KV cache and state cache) is
checked against the system's ``MemAvailable``; a model that does not fit is refused in one line
naming it, rather than pushing the machine into swap or the OOM killer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from core.config import DEFAULT_MODEL, Config, ModelConfig
from core.engines import Engine, EngineError, PromptTokenizer, create_engine
from core.jobs import FairQueue, Job
from core.messages import Finish
from core.worker import InferenceWorker

log = structlog.get_logger("botd.models")

# A model loaded less than this long ago is not made to give way to another (no thrashing).
MIN_RESIDENT_S = 5.0
_MIB = 1024 * 1024


class ModelUnavailable(EngineError):
    """A model cannot be loaded (not enough memory, a bad file)."""


def mem_available() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(eq=False)
class ServedModel:
    """One configured model: its engine, queue, worker and (once asked for) tokenizer."""

    name: str
    cfg: ModelConfig
    engine: Engine
    queue: FairQueue
    worker: InferenceWorker
    tokenizer: PromptTokenizer | None = None
    last_used: float = 0.0
    loaded_at: float = 0.0
    loads: int = 0
    unloads: int = 0
    last_error: str = ""
    # A reload changed its settings while it was loaded: takes the new ones when next unloaded.
    replacement: ModelConfig | None = None
    loading: asyncio.Task[None] | None = field(default=None, repr=False)
    tokenizer_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def loaded(self) -> bool:
        return self.worker.loaded

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting: it may be unloaded."""
        return not self.worker.busy and not len(self.queue)

    def state(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "loaded": self.loaded,
                "loading": self.loading is not None and not self.loading.done(),
                "queue_depth": len(self.queue), "running": self.worker.running, "loads": self.loads,
                "unloads": self.unloads, "last_error": self.last_error or None,
                "engine": self.engine.state() if self.loaded else {}}


class ModelPool:
    def __init__(self, cfg: Config, *, on_finished: Callable[[Job], None] | None = None,
                 default_engine: Engine | None = None,
                 memory: Callable[[], int | None] = mem_available) -> None:
        self.cfg = cfg
        self.max_loaded = cfg.server.max_loaded
        self._on_finished = on_finished
        self._memory = memory
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.models: dict[str, ServedModel] = {}
        for name, mcfg in cfg.all_models().items():
            self._add(name, mcfg, default_engine if name == DEFAULT_MODEL else None)
        self.started = False

    def _add(self, name: str, mcfg: ModelConfig, engine: Engine | None = None) -> ServedModel:
        q = self.cfg.queue
        queue = FairQueue(q.max_size, q.per_user, q.retry_after_s)
        engine = engine or create_engine(mcfg)
        worker = InferenceWorker(engine, queue, max_wait_s=q.max_wait_s,
                                 on_finished=functools.partial(self._finished, name))
        served = self.models[name] = ServedModel(name, mcfg, engine, queue, worker)
        return served

    @property
    def default(self) -> ServedModel:
        return self.models[DEFAULT_MODEL]

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise EngineError(f"no model named {name!r}") from None

    def loaded(self) -> list[str]:
        return [n for n, m in self.models.items() if m.loaded]

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the default model (and its tokenizer) now; the others load when first asked for."""
        d = self.default
        await self.tokenizer(DEFAULT_MODEL)
        async with self._lock:
            await self._load(d)
        self.started = True

    async def stop(self, grace_s: float = 10.0) -> None:
        self.started = False
        for m in self.models.values():
            if m.loading is not None:
                m.loading.cancel()
        await asyncio.gather(*(m.worker.stop(grace_s) for m in self.models.values()))

    def interrupt_running(self) -> None:
        for m in self.models.values():
            m.worker.interrupt_running()

    @property
    def accepting(self) -> bool:
        return self.default.worker.accepting

    # -- use --------------------------------------------------------------------------------------

    async def tokenizer(self, name: str) -> PromptTokenizer:
        """``name``'s tokenizer (vocabulary only: loaded off the event loop once, without the model)."""
        m = self.get(name)
        if m.tokenizer is None:
            async with m.tokenizer_lock:
                if m.tokenizer is None:
                    m.tokenizer = await asyncio.to_thread(m.engine.tokenizer)
        return m.tokenizer

    def submit(self, name: str, job: Job, force: bool = False) -> None:
        """Queue ``job`` for model ``name`` (raises :class:`~core.jobs.QueueFull` at once when its
        queue is full); a model not loaded is brought in."""
        m = self.get(name)
        job.model = name
        m.worker.submit(job, force=force)
        m.last_used = time.monotonic()
        if not m.loaded:
            self._bring_in(m)

    def standing(self, job: Job) -> tuple[int, float] | None:
        """Where a waiting ``job`` stands in its model's queue: (jobs ahead, expected wait in
        seconds); None once it has started."""
        m = self.models.get(job.model)
        return m.worker.standing(job) if m is not None else None

    def cancel(self, job: Job) -> None:
        self.models.get(job.model, self.default).worker.cancel(job)

    def queue_depth(self) -> int:
        return sum(len(m.queue) for m in self.models.values())

    def quiet(self, for_s: float) -> bool:
        """No model has answered, or been given a job, for ``for_s`` seconds (read from any
        thread: a moment's view)."""
        since = time.monotonic() - for_s
        return all(m.idle and m.last_used <= since for m in list(self.models.values()))

    # -- loading and unloading -------------------------------------------------------------------

    def _finished(self, name: str, job: Job) -> None:
        if name in self.models:
            self.models[name].last_used = time.monotonic()
        self._changed.set()
        if self._on_finished is not None:
            self._on_finished(job)

    def _bring_in(self, m: ServedModel) -> None:
        if m.loading is None or m.loading.done():
            m.loading = asyncio.create_task(self._load_for_jobs(m), name=f"botd-load-{m.name}")

    async def _load_for_jobs(self, m: ServedModel) -> None:
        try:
            async with self._lock:
                if m.loaded or not len(m.queue) or not self.accepting:
                    return
                await self._make_room(m)
                await self._load(m)
        except ModelBusy as exc:
            log.warning("model not loaded in time: its waiting answers are told busy", model=m.name, error=str(exc))
            m.worker.drop_pending(Finish.EXPIRED, str(exc), retry_after=self.cfg.queue.retry_after_s)
        except Exception as exc:  # EngineError, or anything unforeseen: the waiting jobs must not hang
            m.last_error = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            log.error("model cannot be loaded: its waiting answers fail", model=m.name, error=m.last_error)
            m.worker.drop_pending(Finish.ERROR, m.last_error)

    async def _make_room(self, m: ServedModel) -> None:
        deadline = time.monotonic() + self.cfg.queue.max_wait_s
        while True:
            others = [x for x in self.models.values() if x.loaded and x is not m]
            if len(others) < self.max_loaded:
                for x in others:  # room was made elsewhere: a model paused for it serves again
                    x.worker.resume()
                return
            # Free first: nothing running and nothing queued, or paused here and its answers over.
            free = [x for x in others if not x.worker.busy and (x.idle or x.worker.paused)]
            if free:
                victim = min(free, key=lambda x: x.last_used)
                await self._unload(victim)
                if len(victim.queue):
                    self._bring_in(victim)  # its waiting jobs bring it back once there is room
                continue
            oldest = min(others, key=lambda x: x.last_used)
            if time.monotonic() - oldest.loaded_at >= MIN_RESIDENT_S and not oldest.worker.paused:
                log.info("model to be unloaded once its running answers end", model=oldest.name, for_model=m.name)
                oldest.worker.pause()
            left = deadline - time.monotonic()
            if left <= 0:
                for x in others:  # let them take jobs again
                    x.worker.resume()
                raise ModelBusy(f"every loaded model is busy ([server] max_loaded = {self.max_loaded}); "
                                f"the model {m.name!r} could not be loaded in time")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    def memory_needed(self, m: ServedModel) -> int:
        """Bytes of RAM ``m`` is expected to take loaded (0: nothing local to check)."""
        return m.engine.memory_estimate()

    async def _load(self, m: ServedModel) -> None:
        if m.replacement is not None:
            self._replace(m)
        await self.tokenizer(m.name)
        need = await asyncio.to_thread(self.memory_needed, m)
        free = self._memory()
        if need and free is not None and need > free:
            raise ModelUnavailable(
                f"not enough memory to load the model {m.name!r} ({m.cfg.name}): it needs about {need // _MIB} MiB, "
                f"{free // _MIB} MiB are available; lower [server] max_loaded, its n_ctx, parallel or cache_mb, "
                "or use a smaller file")
        t0 = time.monotonic()
        try:
            await m.worker.start()
        except EngineError as exc:
            m.last_error = str(exc)
            raise
        m.loaded_at = time.monotonic()
        m.loads += 1
        m.last_error = ""
        log.info("model in memory", model=m.name, name=m.cfg.name, load_s=round(m.loaded_at - t0, 2),
                 memory_mib=need // _MIB if need else None, loaded=self.loaded())

    async def _unload(self, m: ServedModel) -> None:
        await m.worker.unload()
        m.unloads += 1
        log.info("model unloaded", model=m.name, name=m.cfg.name, loaded=self.loaded())
        if m.replacement is not None:
            self._replace(m)

    def _replace(self, m: ServedModel) -> None:
        """Take the settings a reload gave ``m`` (it is not loaded)."""
        assert m.replacement is not None and not m.loaded
        m.cfg, m.replacement = m.replacement, None
        m.engine = m.worker.engine = create_engine(m.cfg)
        m.tokenizer = None

    # -- reload ----------------------------------------------------------------------------------

    def apply(self, cfg: Config) -> None:
        """A reloaded config: new [models.NAME] sections are added, changed ones take their new
        settings (now when not loaded, else when next unloaded), ``max_loaded`` applies at once.
        [model] ("default") is swapped by the runtime's :meth:`~core.runtime.Runtime.swap_model`."""
        self.cfg = cfg
        self.max_loaded = cfg.server.max_loaded
        if cfg.model.load_settings() == self.default.cfg.load_settings():
            self.default.cfg = cfg.model
        q = cfg.queue
        for served in self.models.values():
            served.queue.max_size, served.queue.per_user = q.max_size, q.per_user
            served.queue.retry_after_s = q.retry_after_s
            served.worker.max_wait_s = q.max_wait_s
        for name, mcfg in cfg.models.items():
            m = self.models.get(name)
            if m is None:
                self._add(name, mcfg)
            elif mcfg.load_settings() != m.cfg.load_settings():
                m.replacement = mcfg
                if not m.loaded and (m.loading is None or m.loading.done()):
                    self._replace(m)
                else:
                    log.info("model settings changed: applied when it is next unloaded", model=name)
            else:
                m.cfg = mcfg

    async def swap_default(self, engine: Engine, tokenizer: PromptTokenizer, cfg: ModelConfig) -> None:
        d = self.default
        if d.loaded:
            await d.worker.swap_engine(engine)
        else:
            d.worker.engine = engine
        d.engine, d.tokenizer, d.cfg = engine, tokenizer, cfg

    def state(self) -> dict[str, Any]:
        return {name: m.state() for name, m in self.models.items()}


class ModelBusy(ModelUnavailable):
    """Every loaded model stayed busy: the one asked for could not come in within max_wait_s."""
