"""The daemon assembly: config -> runtime -> chat service -> connectors -> one HTTP server.

``Daemon.start`` brings everything up in order (Redis, model, server, connectors) and
``Daemon.stop`` takes it down in reverse, letting the running answer finish within the
grace period.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from bots.service import ChatService
from connectors import REGISTRY, load_connector
from connectors.base import Connector
from connectors.server import build_app
from core import sdnotify
from core.config import Config
from core.runtime import Runtime

log = structlog.get_logger("botd.daemon")


class StartupError(RuntimeError):
    """The daemon cannot start; the message is for the admin, one line."""


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.runtime = Runtime(cfg)
        self.service = ChatService(cfg, self.runtime)
        self.connectors: list[Connector] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self.port: int | None = None

    async def start(self) -> None:
        from core.engines import EngineError

        try:
            await self.runtime.start()
        except EngineError as exc:
            await self.runtime.redis.close()
            raise StartupError(f"model.path: {exc}") from None
        classes = [load_connector(name) for name in REGISTRY]
        self.connectors = [cls(self.service, self.cfg) for cls in classes if cls.enabled(self.cfg)]
        app = build_app(self.cfg, self.service, self.connectors)
        # handler_cancellation: a client that disconnects cancels its handler, which stops its job.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
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
        for c in self.connectors:
            await c.start()
        log.info(
            "botd is ready", url=f"http://{self.cfg.server.host}:{self.port}", model=self.cfg.model.name,
            model_file=str(self.cfg.model.resolved_path()), redis=self.runtime.redis.description,
            connectors=[c.name for c in self.connectors],
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        # New connections are refused first; requests already in flight finish below.
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for c in reversed(self.connectors):
            try:
                await c.stop()
            except Exception:
                log.exception("connector stop failed", connector=c.name)
        await self.runtime.worker.stop(grace_s)
        await self.service.drain()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.runtime.redis.close()
        self.runtime.audit.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # Ready only now: model loaded, Redis tried, listeners up.
        sdnotify.notify(f"READY=1\nSTATUS=listening on {self.cfg.server.host}:{self.port}")
        pinger = None
        interval = sdnotify.watchdog_interval_s()
        if interval is not None:
            pinger = asyncio.create_task(self._watchdog(interval), name="botd-watchdog")
        try:
            await self._stop.wait()
            log.info("stopping")
            sdnotify.notify("STOPPING=1")
        finally:
            if pinger is not None:
                pinger.cancel()
            await self.stop()
            log.info("stopped")

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a wedged loop stops the pings and systemd restarts us.
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
