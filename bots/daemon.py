"""The daemon assembly: config -> runtime -> chat service -> connectors -> one HTTP server.

``Daemon.start`` brings everything up in order (Redis, model, connectors), starts answering
the messages a previous run accepted but did not finish (the durable inbox), and only then
opens the port.
``Daemon.reload`` (SIGHUP) applies an edited config.toml without dropping a job;
``Daemon.stop`` (SIGTERM) stops taking events, lets the running answer finish within
``server.shutdown_grace_s`` and leaves what is still queued in the inbox for the next start.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import structlog
from aiohttp import web

from bots.knowledge_jobs import KnowledgeJobs
from bots.service import ChatService
from connectors import REGISTRY, load_connector
from connectors.base import Connector
from connectors.server import build_app
from core import sdnotify
from core.config import Config, ConfigError, load_config
from core.knowledge.embedder import EmbeddingError
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.daemon")

# Read once at start: changing these needs a restart (a reload keeps the running values).
_RESTART_ONLY = {"server": ("host", "port", "state_dir", "max_body_bytes", "instance"),
                 "redis": ("url", "key_prefix")}


class StartupError(RuntimeError):
    """The daemon cannot start; the message is for the admin, one line."""


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.runtime = Runtime(cfg)
        self.service = ChatService(cfg, self.runtime)
        self.knowledge = KnowledgeJobs(self.runtime)
        self.service.ingest_hook = self.knowledge.ingest
        # The running connectors by registry name; HTTP routes look their connector up here on
        # every request, so a reload can replace one under a live server.
        self.connectors: dict[str, Connector] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[bool] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.port: int | None = None

    async def start(self) -> None:
        from core.engines import EngineError

        try:
            await self.runtime.start()
        except EngineError as exc:
            await self.runtime.redis.close()
            raise StartupError(f"model.path: {exc}") from None
        except EmbeddingError as exc:
            await self.runtime.stop(grace_s=0)
            raise StartupError(str(exc)) from None
        self.knowledge.start()
        for name in REGISTRY:
            cls = load_connector(name)
            if cls.enabled(self.cfg):
                self.connectors[name] = cls(self.service, self.cfg)
        app = build_app(self.cfg, self.service, [])
        for name, connector in self.connectors.items():
            app.add_routes(self._forwarding_routes(name, connector))
        # handler_cancellation: a client that disconnects cancels its handler, which stops its job.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        # Connectors are up (Telegram's getMe answered: group mentions can be read) and what an
        # earlier run left is being answered before the port takes its first webhook.
        for c in self.connectors.values():
            await c.start()
        await self._resume()
        site = web.TCPSite(self._runner, self.cfg.server.host, self.cfg.server.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise StartupError(
                f"server.port: cannot listen on {self.cfg.server.host}:{self.cfg.server.port}: {exc.strerror}"
            ) from None
        self._site = site
        sockets = site._server.sockets if site._server else []  # the real port when port = 0 in tests
        self.port = sockets[0].getsockname()[1] if sockets else self.cfg.server.port
        self.runtime.ready = True
        log.info(
            "botd is ready", url=f"http://{self.cfg.server.host}:{self.port}", model=self.cfg.model.name,
            model_file=str(self.cfg.model.resolved_path()), redis=self.runtime.redis.description,
            connectors=list(self.connectors),
        )

    def _forwarding_routes(self, name: str, connector: Connector) -> list[web.RouteDef]:
        routes = []
        for i, rd in enumerate(connector.routes()):
            async def handler(request: web.Request, name: str = name, i: int = i) -> web.StreamResponse:
                current = self.connectors.get(name)
                if current is None:
                    raise web.HTTPNotFound(text=f"the {name} connector is not enabled")
                return await current.routes()[i].handler(request)

            routes.append(web.route(rd.method, rd.path, handler))
        return routes

    async def _resume(self) -> None:
        """Answer what an earlier run accepted but did not deliver (crash, kill -9, SIGTERM)."""
        try:
            pending = await self.runtime.inbox.pending()
        except StoreUnavailable:
            log.warning("cannot read the durable inbox: redis unreachable; earlier messages wait for the next start")
            return
        if not pending:
            return
        by_connector: dict[str, list[Any]] = {}
        for connector, msg in pending:
            by_connector.setdefault(connector, []).append(msg)
        for name, msgs in by_connector.items():
            log.info("answering messages accepted before the restart", connector=name, count=len(msgs))
            c = self.connectors.get(name)
            if c is None:
                log.warning("their connector is not enabled: they stay in the inbox", connector=name,
                            count=len(msgs))
                continue
            await c.resume(msgs)

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.cfg.server.shutdown_grace_s if grace_s is None else grace_s
        self.runtime.ready = False
        self.knowledge.stop()
        # No new platform events: the listener closes and polling / sockets stop.
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for c in self.connectors.values():
            try:
                await c.stop_receiving()
            except Exception:
                log.exception("connector stop failed", connector=c.name)
        # The running generation finishes (bounded by the grace period); queued jobs end with
        # "shutdown" and their messages stay in the durable inbox for the next start.
        await self.runtime.worker.stop(grace)
        for c in reversed(list(self.connectors.values())):
            try:
                await c.stop(grace_s=5.0)
            except Exception:
                log.exception("connector stop failed", connector=c.name)
        await self.service.drain()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.runtime.redis.close()
        self.runtime.audit.close()

    def request_stop(self) -> None:
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
        from core.engines import EngineError

        old = self.cfg
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            log.error("reload refused: the running config stays", error=str(exc))
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
                     model_file=str(new.model.resolved_path()))
            try:
                await self.runtime.swap_model(new)
            except EngineError as exc:
                log.error("reload: the new model did not load; the old model and model settings stay",
                          error=f"model.path: {exc}")
                new = new.model_copy(update={"model": old.model})
        knowledge_changed = self.runtime.apply(new)
        self.service.apply(new)
        if knowledge_changed:
            try:
                await self.runtime.load_knowledge()
            except EmbeddingError as exc:
                log.error("reload: knowledge bases unavailable", error=str(exc))
            self.knowledge.restart()
        await self._reload_connectors(old, new)
        self.cfg = new
        changed_sections = [k for k in type(new).model_fields if getattr(old, k) != getattr(new, k)]
        log.info("config reloaded", file=str(path), changed=changed_sections)
        return True

    async def _reload_connectors(self, old: Config, new: Config) -> None:
        for name in REGISTRY:
            cls = load_connector(name)
            current = self.connectors.get(name)
            wanted = cls.enabled(new)
            if current is None:
                if wanted:
                    log.warning("a connector enabled by the reload starts only with a restart", connector=name)
                continue
            if not wanted:
                log.info("connector disabled by the reload", connector=name)
                del self.connectors[name]
                self._spawn(current.stop())
                continue
            if getattr(old, cls.section) == getattr(new, cls.section):
                current.config = new
                continue
            # Replaced: the old one stops taking events first (a poller or socket must not run
            # twice), the new one starts, and the old one finishes its answers in the background.
            await current.stop_receiving()
            replacement = cls(self.service, new)
            await replacement.start()
            self.connectors[name] = replacement
            self._spawn(current.stop())
            log.info("connector restarted with its new settings", connector=name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
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

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a wedged loop stops the pings and systemd restarts us.
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
