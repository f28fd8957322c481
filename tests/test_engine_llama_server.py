"""The remote engine (``engine = "openai"``) against a REAL llama.cpp ``llama-server``, through a
real botd daemon: what tests/test_engine_openai.py shows with a fake, shown with the server
that botd's README tells admins to run.

llama-server serves the embedded model (SmolLM2-135M) on 127.0.0.1 (``-c 2048 -np 2 -t 2``);
botd reaches it through a small counting TCP proxy (asyncio, its own thread) that records every
HTTP request on the way (method, path, body), so the tests can count what llama-server was
asked. Shown:

- streaming through botd's ``POST /v1/chat/completions`` (``stream: true``) with the usage
  reported (prompt and completion tokens > 0, llama-server's own counts);
- botd counts prompt tokens with llama-server's ``/apply-template`` + ``/tokenize`` (the remote
  tokenizer is the one chosen), and its count equals llama-server's own ``prompt_tokens`` for
  the same messages;
- llama-server killed while botd streams a long answer: the user gets the partial text, then a
  clear error event; botd sends no second request (no retry after text was sent);
- a wrong key: the start stops with one ``model.api_key`` line after exactly one request; a key
  refused later (the server restarted with another key): each request fails once, no retries,
  one error line in the log.

A remote answering 503 stays covered by the fake (test_engine_openai.py). The llama-servers
are started together, once for the module (they load in parallel).

Needs ``bench/.cache/llama-server-build/bin/llama-server`` (built by
``bench/bench_concurrency.py --llama-server``); skipped without it (CI has no bench/.cache).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bots.daemon import Daemon, StartupError
from core.config import embedded_model_path
from core.engines.openai import RemoteEngine, RemoteTokenizer
from tests.helpers import REPO, free_port, make_config, running_daemon

LLAMA_SERVER = REPO / "bench" / ".cache" / "llama-server-build" / "bin" / "llama-server"

if not os.access(LLAMA_SERVER, os.X_OK):
    pytest.skip(f"needs llama.cpp's llama-server at {LLAMA_SERVER.relative_to(REPO)} (build it with "
                "`.venv/bin/python bench/bench_concurrency.py --llama-server`); bench/.cache is not in git, "
                "so CI skips this file", allow_module_level=True)

RIGHT_KEY = "llama-test-right-key-1234"
ROTATED_KEY = "llama-test-rotated-key-5678"
KEY_ENV = "BOTD_TEST_LLAMA_SERVER_KEY"


# -- llama-server ----------------------------------------------------------------------------------

class LlamaServer:
    """One llama-server process on 127.0.0.1 serving the embedded model."""

    def __init__(self, workdir: Path, name: str, api_key: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.log = workdir / f"llama-server-{name}.log"
        cmd = [str(LLAMA_SERVER), "-m", str(embedded_model_path()), "--host", "127.0.0.1", "--port", str(self.port),
               "-c", "2048", "-np", "2", "-t", "2"]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self._ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> LlamaServer:
        """Until GET /health answers 200 (503 while the model loads)."""
        if self._ready:
            return self
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server {self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with opener.open(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self._ready = True
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"llama-server {self.name} not ready in {timeout:g} s:\n{self.tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LlamaServer]]:
    """All the llama-servers the module uses, started at once so that they load in parallel;
    each test waits for the ones it needs."""
    work = tmp_path_factory.mktemp("llama-server")
    fleet = {
        "plain": LlamaServer(work, "plain"),
        "doomed": LlamaServer(work, "doomed"),  # killed mid-answer
        "keyed": LlamaServer(work, "keyed", RIGHT_KEY),
        "rotated": LlamaServer(work, "rotated", ROTATED_KEY),  # the same server after a key change
    }
    try:
        yield fleet
    finally:
        for server in fleet.values():
            server.kill()


# -- a TCP proxy that counts requests ---------------------------------------------------------------

_REQUEST_LINE = re.compile(r"^([A-Z]+) (\S+) HTTP/1\.[01]$")


class _RequestReader:
    """Reads HTTP/1.1 requests (Content-Length bodies) out of one connection's client bytes."""

    def __init__(self, sink: list[dict[str, Any]]) -> None:
        self.sink = sink
        self.buf = b""
        self.current: dict[str, Any] | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.current is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                line, *headers = self.buf[:end].decode("latin-1").split("\r\n")
                self.buf = self.buf[end + 4:]
                match = _REQUEST_LINE.match(line)
                length = 0
                for h in headers:
                    name, _, value = h.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                # Recorded when its head arrives: a request to a dead server counts too.
                self.current = {"method": match[1] if match else "?", "path": match[2] if match else line,
                                "length": length, "body": None, "t": time.monotonic()}
                self.sink.append(self.current)
            if len(self.buf) < self.current["length"]:
                return
            n = self.current["length"]
            self.current["body"], self.buf = self.buf[:n], self.buf[n:]
            self.current = None


class CountingProxy:
    """127.0.0.1:port -> llama-server, on a loop and thread of its own; records every request."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in list(self.requests) if (r["method"], r["path"]) == (method, path))

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in list(self.requests) if r["path"] == "/v1/chat/completions"]

    def switch(self, upstream_port: int) -> None:
        """Point at another server and drop the open connections (as a restarted server would)."""

        def drop() -> None:
            self.upstream_port = upstream_port
            for w in list(self._conns):
                w.close()

        self.loop.call_soon_threadsafe(drop)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        upstream: asyncio.StreamWriter | None = None
        requests = _RequestReader(self.requests)
        try:
            data = await reader.read(65536)  # the client speaks first: its request is counted here
            if not data:
                return
            requests.feed(data)
            try:
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return  # the server is gone: the client sees its connection closed
            upstream.write(data)

            async def to_server() -> None:
                while chunk := await reader.read(65536):
                    requests.feed(chunk)
                    upstream.write(chunk)
                    await upstream.drain()

            async def to_client() -> None:
                while chunk := await up_reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()

            tasks = [asyncio.ensure_future(to_server()), asyncio.ensure_future(to_client())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # either side gone: close both
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(writer)
            for w in (upstream, writer):
                if w is not None:
                    w.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for w in list(self._conns):
                w.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def proxy_to() -> Iterator[Any]:
    made: list[CountingProxy] = []

    def make(server: LlamaServer) -> CountingProxy:
        made.append(CountingProxy(server.wait_ready().port))
        return made[-1]

    yield make
    for p in made:
        p.close()


# -- botd ------------------------------------------------------------------------------------------

def remote_config(tmp_path: Path, redis_url: str, base_url: str, **model: Any):
    # n_ctx: llama-server's context per slot (-c 2048 / -np 2).
    return make_config(tmp_path, redis_url, model={"engine": "openai", "base_url": base_url, "n_ctx": 1024,
                                                   "max_concurrent": 2, "timeout_s": 60, "max_tokens": 24,
                                                   **model})


async def sse(api: Any, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """botd's streamed answer, one parsed server-sent event at a time (``[DONE]`` ends it)."""
    async with api.session.post(api.base + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            if line == b"data: [DONE]":
                return
            yield json.loads(line[5:])


def engine_of(api: Any) -> RemoteEngine:
    engine = api.daemon.runtime.worker.engine
    assert isinstance(engine, RemoteEngine)
    return engine


# -- streaming, usage and token counting -----------------------------------------------------------

async def test_streams_with_usage_and_counts_tokens_with_llama_servers_tokenizer(tmp_path, redis_server, servers,
                                                                                proxy_to):
    server = servers["plain"]
    proxy = proxy_to(server)
    async with running_daemon(remote_config(tmp_path, redis_server.url, proxy.base_url)) as api:
        engine = engine_of(api)
        # The model botd asks for is the one llama-server lists (model = "" in the config).
        assert engine.model.endswith(embedded_model_path().name)
        tokenizer = api.daemon.runtime.tokenizer
        assert isinstance(tokenizer, RemoteTokenizer) and tokenizer.kind == "llama-server", tokenizer
        assert tokenizer.root == f"http://127.0.0.1:{proxy.port}"

        pieces: list[tuple[float, str]] = []
        usage: dict[str, int] | None = None
        finish = None
        async for ev in sse(api, {"messages": [{"role": "user", "content": "Name three colours of the sea."}],
                                  "stream_options": {"include_usage": True}, "max_tokens": 24}):
            assert "error" not in ev, ev
            for choice in ev.get("choices") or []:
                if choice["delta"].get("content"):
                    pieces.append((time.monotonic(), choice["delta"]["content"]))
                finish = choice.get("finish_reason") or finish
            if ev.get("usage") and not ev.get("choices"):
                usage = ev["usage"]
        # Streamed: the text came in several events, spread over the generation.
        assert len(pieces) >= 2 and pieces[-1][0] > pieces[0][0], pieces
        assert "".join(p for _, p in pieces).strip()
        assert finish in ("stop", "length")
        assert usage is not None and usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 24, usage
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        [chat] = proxy.chat_requests()
        sent = json.loads(chat["body"])
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert sent["messages"][-1] == {"role": "user", "content": "Name three colours of the sea."}

        # botd's count of those messages is llama-server's /apply-template + /tokenize, one call each...
        before = (proxy.count("POST", "/apply-template"), proxy.count("POST", "/tokenize"))
        counted = await asyncio.to_thread(tokenizer.count_chat, sent["messages"])
        after = (proxy.count("POST", "/apply-template"), proxy.count("POST", "/tokenize"))
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
        # ... and equals what llama-server itself read: the usage through botd, and asked directly.
        assert counted == usage["prompt_tokens"]
        async with api.session.post(f"{server.url}/v1/chat/completions",
                                    json={"messages": sent["messages"], "max_tokens": 1}) as resp:
            direct = (await resp.json())["usage"]["prompt_tokens"]
        assert counted == direct
        status, health = await api.get("/healthz")
        assert health["engine"]["tokenizer"] == "RemoteTokenizer", health["engine"]


# -- a remote that dies mid-answer -----------------------------------------------------------------

async def test_llama_server_killed_mid_answer_gives_the_partial_text_an_error_and_no_second_request(
        tmp_path, redis_server, servers, proxy_to):
    server = servers["doomed"]
    proxy = proxy_to(server)
    cfg = remote_config(tmp_path, redis_server.url, proxy.base_url, max_tokens=400)
    async with running_daemon(cfg) as api:
        text: list[str] = []
        errors: list[dict[str, Any]] = []
        after_error = 0
        async for ev in sse(api, {"messages": [{"role": "user", "content": "Write a long story about the sea."}],
                                  "max_tokens": 400}):
            if errors:
                after_error += 1
            if "error" in ev:
                errors.append(ev["error"])
                continue
            for choice in ev.get("choices") or []:
                if choice["delta"].get("content"):
                    text.append(choice["delta"]["content"])
                    if len(text) == 3:
                        server.kill()  # llama-server dies in the middle of the answer
                assert choice.get("finish_reason") is None, "the answer finished before llama-server was killed"
        # The partial answer, then one clear error event, then [DONE].
        assert len(text) >= 3 and "".join(text).strip()
        [error] = errors
        assert error["code"] == "generation_failed" and error["type"] == "server_error", error
        assert error["message"].startswith("the remote engine broke off the answer after "), error
        assert after_error == 0
        # No second request: a retry would have said the start of the answer twice.
        await asyncio.sleep(1.5)  # longer than the first retry's backoff (0.5 s)
        assert len(proxy.chat_requests()) == 1
        stats = engine_of(api).stats
        assert (stats["requests"], stats["retries"], stats["errors"]) == (1, 0, 1), stats


# -- a wrong key -----------------------------------------------------------------------------------

async def test_a_wrong_key_stops_the_start_in_one_line_after_one_request(tmp_path, redis_server, servers, proxy_to,
                                                                          monkeypatch):
    proxy = proxy_to(servers["keyed"])
    monkeypatch.setenv(KEY_ENV, "llama-test-wrong-key-0000")
    cfg = remote_config(tmp_path, redis_server.url, proxy.base_url, api_key=f"env:{KEY_ENV}")
    daemon = Daemon(cfg)
    with capture_logs() as logs:
        with pytest.raises(StartupError) as exc:
            await daemon.start()
    message = str(exc.value)
    assert re.fullmatch(r"model\.api_key: the remote engine at http://127\.0\.0\.1:\d+/v1 refused the key "
                        r"\(HTTP 401: Invalid API Key\)", message), message
    assert "llama-test-wrong-key" not in message
    await asyncio.sleep(1.0)
    # One request (the start's first: the tokenizer's /apply-template), no retries, nothing generated;
    # not mistaken for a server without a tokenizer (no "estimated" warning).
    assert [(r["method"], r["path"]) for r in proxy.requests] == [("POST", "/apply-template")]
    assert not [e for e in logs if "retrying" in e["event"] or "characters / 3" in e["event"]], logs


async def test_a_key_refused_later_fails_each_request_once_with_one_log_line(tmp_path, redis_server, servers,
                                                                           proxy_to, monkeypatch):
    proxy = proxy_to(servers["keyed"])
    servers["rotated"].wait_ready()
    monkeypatch.setenv(KEY_ENV, RIGHT_KEY)
    cfg = remote_config(tmp_path, redis_server.url, proxy.base_url, api_key=f"env:{KEY_ENV}", max_tokens=4)
    async with running_daemon(cfg) as api:
        assert isinstance(api.daemon.runtime.tokenizer, RemoteTokenizer)  # the key opened /tokenize too
        data = await api.chat("Say hi.", user="alice")
        assert data["usage"]["completion_tokens"] > 0
        # llama-server restarted with another key: botd's key is now refused.
        proxy.switch(servers["rotated"].port)
        await asyncio.sleep(0.3)
        chats = len(proxy.chat_requests())
        with capture_logs() as logs:
            for i in range(3):
                status, body, _ = await api.post("/v1/chat/completions",
                                                 {"messages": [{"role": "user", "content": f"Again {i}."}]})
                assert status == 500 and body["error"]["code"] == "generation_failed", body
                assert body["error"]["message"].startswith("model.api_key: the remote engine refused botd's key "
                                                           "(HTTP 401"), body
        await asyncio.sleep(1.0)
        assert len(proxy.chat_requests()) - chats == 3  # one per request: no retry storm
        refused = [e for e in logs if "refuses botd's key" in e["event"]]
        assert [e["log_level"] for e in refused] == ["error"], refused
        assert not [e for e in logs if "retrying" in e["event"]]
