"""A fake model hub on 127.0.0.1 for ``botd model pull``: ModelScope, Hugging Face and mirror paths.

It serves files by their name under the hubs' download paths
(``/models/REPO/resolve/master/FILE``, ``/REPO/resolve/REV/FILE``, ``/mirror/FILE``; a FILE may be
a path inside a model's folder, ``1_Pooling/config.json``) with real
HTTP Range support, and can misbehave the ways a real download does: a hub that is down (404),
a connection dropped midway, a source that fails after some bytes. It runs in a thread with its
own event loop, so a test can call the CLI (which runs its own loop) directly.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)  # "modelscope", "huggingface", "mirror": answer 404
    # Drop the connection after this many bytes of a response, for the next N responses.
    drop_after: int = 0
    drops: int = 0
    # After this many bytes have been served in all, answer 503 (a source that went away).
    fail_after_total: int | None = None
    # Send bodies chunked, without Content-Length (as some mirrors and proxies do).
    chunked: bool = False
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (hub, file, Range)
    served: int = 0
    url: str = ""

    def _hub(self, path: str) -> str:
        if path.startswith("/models/"):
            return "modelscope"
        if path.startswith("/mirror/"):
            return "mirror"
        return "huggingface"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        hub = self._hub(request.path)
        # A file is served at any path ending in its key; the longest key wins, so a folder's
        # "1_Pooling/config.json" (or "NAME/config.json" on a mirror) is not its "config.json".
        keys = [k for k in self.files if request.path.endswith("/" + k)]
        name = max(keys, key=len) if keys else request.path.rsplit("/", 1)[-1]
        rng = request.headers.get("Range")
        self.requests.append((hub, name, rng))
        if hub in self.down or name not in self.files:
            return web.Response(status=404, text="not found")
        if self.fail_after_total is not None and self.served >= self.fail_after_total:
            return web.Response(status=503, text="gone")
        data = self.files[name]
        start = 0
        status = 200
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            if not m or int(m.group(1)) >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            start = int(m.group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if not self.chunked:
            headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        limit = len(body)
        drop = False
        if self.drops > 0 and self.drop_after:
            limit = min(limit, self.drop_after)
            drop = limit < len(body)
            self.drops -= 1
        if self.fail_after_total is not None:
            left = max(0, self.fail_after_total - self.served)
            if left < limit:
                limit, drop = left, True
        for i in range(0, limit, 64 * 1024):
            piece = body[i:min(limit, i + 64 * 1024)]
            await resp.write(piece)
            self.served += len(piece)
        if drop:
            # Mid-body: the client sees the connection end before Content-Length bytes.
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        return app


class HubThread:
    """Runs a :class:`FakeHub` on 127.0.0.1 in a thread; ``hub.url`` is its address."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.hub.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.hub.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._ready.wait(10)
        return self.hub

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
