"""The daemon assembly: config -> runtime -> chat service -> connectors -> one HTTP server.

Every long-lived part is an async context manager entered in one ``AsyncExitStack``
(runtime: Redis, model, knowledge; the connectors; the HTTP runner), so a failed start
leaves exactly what it entered. Connectors start, and the messages an earlier run
accepted but did not finish (the durable inbox) are being answered, before the port
listens. Stopping has two phases: close intake (the port, polling, sockets) and drain
(the running answers finish within ``server.shutdown_grace_s``; queued ones stay in the
inbox for the next start), then exit the stack. A second SIGTERM stops at once.
``reload`` (SIGHUP) applies an edited config.toml without dropping a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import time
from collections.abc import Sequence
from typing import Any

import structlog
from aiohttp import web

from bots import texts
from bots.knowledge_jobs import KnowledgeJobs
from bots.service import ChatService
from connectors import REGISTRY, configured, load_connector
from connectors.base import Edge
from connectors.config import load_config
from connectors.notify.notifier import Notifier
from connectors.server import ConnectionGuard, GuardedRunner, build_app
from core import sdnotify
from core.config import Config, ConfigError, Settings, secret_references
from core.engines import EngineError
from core.errors import BotdError
from core.knowledge.embedder import EmbeddingError
from core.runtime import Runtime
from core.secrets import secrets_digest

log = structlog.get_logger("botd.daemon")

# Read once at start: changing these needs a restart (a reload keeps the running values).
_RESTART_ONLY = {"server": ("host", "port", "state_dir", "max_body_bytes", "instance", "request_read_timeout_s",
                            "max_connections"),
                 "redis": ("url", "key_prefix", "embedded_maxmemory_mb")}


async def _stop(event: asyncio.Event, task: asyncio.Task[Any]) -> None:
    event.set()
    await task


def model_source(cfg: Config) -> str:
    """Where the model comes from: its file, or the remote server's URL."""
    return cfg.model.base_url if cfg.model.engine == "openai" else str(cfg.model.resolved_path())


def model_error(exc: Exception) -> str:
    """An engine's error as a config line: it names its key itself, or it is about model.path."""
    text = str(exc)
    return text if text.startswith("model.") else f"model.path: {text}"


def _secrets_of(cfg: Config, name: str) -> str:
    """A digest of the secret values connector ``name`` reads: its own section's, and those of
    the sections it names in ``secret_sections`` (the HTTP API checks JWTs with [console]'s key)."""
    cls = load_connector(name)
    sections = (REGISTRY[name].section, *getattr(cls, "secret_sections", ()))
    # A platform's section is a table of accounts ([slack.NAME], [wecom.NAME]): each one's secrets.
    models = [m for s in sections for v in [getattr(cfg, s)] for m in (v.values() if isinstance(v, dict) else [v])]
    return secrets_digest(ref for m in models for _, ref, _ in secret_references(m))


def make_connector(name: str, service: ChatService, runtime: Runtime) -> Edge:
    """Connector ``name``, handed what it serves: the service, or (the console) the admin backend."""
    cls = load_connector(name)
    return cls(service.admin if cls.hands == "admin" else service, service.settings, runtime.cache)


def _log_tasks() -> None:
    """SIGUSR1: where every task of the daemon is waiting, in the log (a stuck answer's stack)."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=12, file=out)
        log.warning("task", name=task.get_name(), stack=out.getvalue())


class StartupError(BotdError, RuntimeError):
    """The daemon cannot start; the message is for the admin, one line."""


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.settings = Settings(cfg)
        self.runtime = Runtime(self.settings)
        self.service = ChatService(self.settings, self.runtime)
        # Admin alerts to a WeCom group robot ([notify]); a no-op without that section.
        self.notifier = Notifier(self.settings, texts.alert)
        self.knowledge = KnowledgeJobs(self.runtime, self.notifier.post)
        self.runtime.redis.on_change = self._redis_changed
        # A message handed out [redis] max_deliveries times without an answer: the admins hear of it.
        self.runtime.inbox.on_dead = lambda **fields: self.notifier.post("dead_letter", **fields)
        self._redis_down_at: float | None = None
        # The running connectors by registry name; a route finds its connector here on every
        # request, so a reload can replace one under a live server.
        self.connectors: dict[str, Edge] = {}
        # The resolved secrets each running connector was built with (a reload compares them).
        self._secrets: dict[str, str] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[bool] | None = None

        def reload_from_console() -> asyncio.Task[bool] | None:
            # The console's "Reload": the same as SIGHUP; the console waits for the task.
            self.request_reload()
            return self._reloading

        self.service.hooks(ingest=self.knowledge.ingest, reload=reload_from_console)
        self._background: set[asyncio.Task[Any]] = set()
        self.port: int | None = None

    @property
    def cfg(self) -> Config:
        return self.settings.config

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            await self._enter(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def _enter(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.cfg
        # First in, last out: it tells of a Redis outage at start and sends "stopping" at the end.
        await stack.enter_async_context(self.notifier)
        try:
            await stack.enter_async_context(self.runtime)
        except EngineError as exc:
            raise StartupError(model_error(exc)) from None
        except EmbeddingError as exc:
            raise StartupError(str(exc)) from None
        stack.push_async_callback(self.service.tasks.drain, 5.0)
        self.knowledge.start()
        stack.callback(self.knowledge.close)
        stack.push_async_callback(self._close_connectors)
        for name in configured(cfg):
            self._secrets[name] = _secrets_of(cfg, name)
            connector = make_connector(name, self.service, self.runtime)
            await connector.start()
            self.connectors[name] = connector
        app = build_app(cfg.server.max_body_bytes, self.service.health, self._health_details)
        for name, connector in self.connectors.items():
            for method, path, handler in connector.routes():
                app.router.add_route(method, path, self._route(name, handler))
        # handler_cancellation: a client that disconnects cancels its handler, which stops its job.
        # A read deadline and a connection cap (aiohttp has neither); idle keep-alives end as soon.
        guard = ConnectionGuard(cfg.server.request_read_timeout_s, cfg.server.max_connections)
        runner = GuardedRunner(app, guard, handler_cancellation=True, access_log=None,
                               keepalive_timeout=min(75.0, cfg.server.request_read_timeout_s))
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        # What an earlier run left is being answered before the port takes its first webhook.
        await self.service.platforms.resume(self.connectors)
        # Kept fresh while answered; other daemons' abandoned messages taken over (one Redis).
        stop_serving = asyncio.Event()
        serving = asyncio.create_task(self.service.platforms.serve(self.connectors, stop_serving), name="botd-inbox")
        stack.push_async_callback(_stop, stop_serving, serving)
        site = web.TCPSite(runner, cfg.server.host, cfg.server.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"server.port: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}") from None
        self._site = site
        self.port = runner.addresses[0][1]  # the real port when port = 0 in tests
        self.runtime.ready = True
        log.info(
            "botd is ready", url=f"http://{cfg.server.host}:{self.port}", model=cfg.model.name,
            model_file=model_source(cfg), redis=self.runtime.redis.description,
            connectors=list(self.connectors),
        )
        self.notifier.post("started", model=cfg.model.name, url=f"http://{cfg.server.host}:{self.port}")

    def _redis_changed(self, up: bool, error: str | None) -> None:
        """Redis went away or came back (told once per change by the runtime's Redis monitor)."""
        redis = self.runtime.redis.description
        if up:
            down_s = round(time.monotonic() - self._redis_down_at) if self._redis_down_at is not None else 0
            self._redis_down_at = None
            self.notifier.post("redis_up", redis=redis, down_s=down_s)
        else:
            self._redis_down_at = time.monotonic()
            self.notifier.post("redis_down", redis=redis, error=error or "")

    async def _health_details(self, request: web.Request) -> bool:
        """/healthz in full and /metrics: for anyone with health_details = "public", else for a
        caller with an API key or token (never an anonymous one)."""
        if self.cfg.server.health_details == "public":
            return True
        api = self.connectors.get("http_api")
        return api is not None and await api.credentialed(request)  # type: ignore[attr-defined]

    def _route(self, name: str, handler: str) -> Any:
        async def forward(request: web.Request) -> web.StreamResponse:
            current = self.connectors.get(name)
            if current is None:
                raise web.HTTPNotFound(text=f"the {name} connector is not enabled")
            return await getattr(current, handler)(request)

        return forward

    async def _close_connectors(self) -> None:
        for c in reversed(list(self.connectors.values())):
            try:
                await c.stop_receiving()
                await c.close()
            except Exception:
                log.exception("connector stop failed", connector=c.name)

    async def stop(self, grace_s: float | None = None) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        grace = self.cfg.server.shutdown_grace_s if grace_s is None else grace_s
        self.runtime.ready = False
        self.notifier.post("stopping")
        # Phase 1, close intake and drain: no new platform events (the listener closes, polling
        # and sockets stop); the running generations finish within the grace period, queued
        # ones end with "shutdown" and their messages stay in the durable inbox.
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for c in self.connectors.values():
            try:
                await c.stop_receiving()
            except Exception:
                log.exception("connector stop failed", connector=c.name)
        await self.runtime.models.stop(grace)
        # The answers whose generation ended show their last words and clear their records.
        await self.service.tasks.drain(15.0)
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)
        # Phase 2: leave everything that was entered, in reverse.
        await stack.aclose()

    def request_stop(self) -> None:
        if self._stop.is_set():
            # A second signal: the admin does not want to wait. The running generations stop
            # now; their messages stay in the durable inbox and are answered after the restart.
            log.warning("second stop signal: stopping the running answers now")
            self.runtime.models.interrupt_running()
            return
        self._stop.set()

    def request_reload(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.info("a reload is already under way; this SIGHUP is folded into it")
            return
        self._reloading = asyncio.create_task(self.reload(), name="botd-reload")

    async def reload(self) -> bool:
        """Re-read config.toml and apply it; an invalid file is refused and the old config keeps running."""
        path = self.cfg.source
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            return await self._reload(path)
        finally:
            sdnotify.notify("READY=1")

    async def _reload(self, path: Any) -> bool:
        old = self.cfg
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            log.error("reload refused: the running config stays", error=str(exc))
            self.notifier.post("reload_failed", error=str(exc))
            return False
        # Settings read once at start keep their running values; say so rather than ignore silently.
        kept = []
        for section, keys in _RESTART_ONLY.items():
            o, n = getattr(old, section), getattr(new, section)
            changed = {k: getattr(o, k) for k in keys if getattr(o, k) != getattr(n, k)}
            if changed:
                kept += [f"{section}.{k}" for k in changed]
                new = new.model_copy(update={section: n.model_copy(update=changed)})
        if kept:
            log.warning("these settings change only with a restart; running values kept", keys=kept)
        if new.model.load_settings() != old.model.load_settings():
            log.info("model settings changed: loading the new model once the running answer is done",
                     model_file=model_source(new))
            try:
                await self.runtime.swap_model(new)
            except (EngineError, ValueError) as exc:  # llama-cpp-python: ValueError for a file it cannot read
                log.error("reload: the new model did not load; the old model and model settings stay",
                          error=model_error(exc))
                self.notifier.post("model_failed", model=new.model.name, error=model_error(exc))
                new = new.model_copy(update={"model": old.model})
            else:
                self.notifier.post("model_reload", model=new.model.name, source=model_source(new))
        # Changed tools are replaced before the new grants are read (the old ones refuse calls).
        await self.runtime.apply_tools(new)
        knowledge_changed = self.runtime.apply(new)
        self.settings.config = new  # the one reference everyone reads
        if knowledge_changed:
            try:
                await self.runtime.load_knowledge()
            except EmbeddingError as exc:
                log.error("reload: knowledge bases unavailable", error=str(exc))
            self.knowledge.restart()
        await self._reload_connectors(old, new)
        changed_sections = [k for k in type(new).model_fields if getattr(old, k) != getattr(new, k)]
        log.info("config reloaded", file=str(path), changed=changed_sections)
        return True

    async def _reload_connectors(self, old: Config, new: Config) -> None:
        wanted = configured(new)
        for name, entry in REGISTRY.items():
            current = self.connectors.get(name)
            if current is None:
                if name in wanted:
                    log.warning("a connector enabled by the reload starts only with a restart", connector=name)
                continue
            if name not in wanted:
                log.info("connector disabled by the reload", connector=name)
                del self.connectors[name]
                await current.stop_receiving()
                self._spawn(self._retire(current))
                continue
            secrets = _secrets_of(new, name)
            if getattr(old, entry.section) == getattr(new, entry.section) and secrets == self._secrets.get(name):
                continue
            self._secrets[name] = secrets
            # Replaced: the old one stops taking events first (a poller or socket must not run
            # twice), the new one starts, and the old one closes once its answers are over.
            await current.stop_receiving()
            replacement = make_connector(name, self.service, self.runtime)
            await replacement.start()
            self.connectors[name] = replacement
            self._spawn(self._retire(current))
            log.info("connector restarted with its new settings", connector=name)

    async def _retire(self, connector: Edge) -> None:
        await self.service.tasks.drain_connector(connector.name, timeout_s=30.0)
        await connector.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run_forever(self, asked: Sequence[int] = ()) -> None:
        """Start, serve until SIGTERM or SIGINT, stop. ``asked``: the signals that came before the
        event loop ran (noted by ``botd run``): a stop stops the start at once, a SIGHUP reloads
        once started."""
        loop = asyncio.get_running_loop()
        # The signals are the daemon's before the start: by default SIGTERM kills the process
        # (the embedded redis-server, a daemon of its own, would be left running; as a
        # container's PID 1 it is ignored instead), and a start can take a while.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
        # A SIGHUP while starting: the reload follows the start.
        reload_asked = [True] if signal.SIGHUP in asked else []
        loop.add_signal_handler(signal.SIGHUP, reload_asked.append, True)
        if any(sig != signal.SIGHUP for sig in asked):
            self.request_stop()
        if not await self._start_unless_stopped():
            log.info("stopped")
            return
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if reload_asked:
            self.request_reload()
        # Ready only now: model loaded, Redis tried, listeners up.
        sdnotify.notify(f"READY=1\nSTATUS=listening on {self.cfg.server.host}:{self.port}")
        pinger = None
        interval = sdnotify.watchdog_interval_s()
        if interval is not None:
            pinger = asyncio.create_task(self._watchdog(interval), name="botd-watchdog")
        try:
            await self._stop.wait()
            log.info("stopping", grace_s=self.cfg.server.shutdown_grace_s)
            sdnotify.notify("STOPPING=1")
        finally:
            if pinger is not None:
                pinger.cancel()
            if self._reloading is not None and not self._reloading.done():
                await asyncio.wait([self._reloading], timeout=60)
            await self.stop()
            log.info("stopped")

    async def _start_unless_stopped(self) -> bool:
        """Start; a stop asked for meanwhile cuts the start short (its exit stack leaves what it
        had entered; a step running in a thread, a model loading, is waited for). True: started."""
        starting = asyncio.create_task(self.start(), name="botd-start")
        stop_asked = asyncio.create_task(self._stop.wait(), name="botd-stop-asked")
        try:
            await asyncio.wait({starting, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stop asked for while starting: the start is cut short")
                starting.cancel()
                await asyncio.wait({starting})
        finally:
            stop_asked.cancel()
            if not starting.done():
                starting.cancel()
        if starting.cancelled():
            return False
        starting.result()  # a failed start raises here (StartupError: the admin's one line)
        return True  # (a start that finished first is stopped the usual way)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a wedged loop stops the pings and systemd restarts us.
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
