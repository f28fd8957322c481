"""The mcp tool: the allowed tools of one MCP server (official ``mcp`` SDK), over stdio or
streamable HTTP.

Each server's session lives in a task of its own (the SDK's transports are anyio task groups,
entered and left in one task); calls from any task go through that session. A server that
fails to start or dies gives error results; the next call after ``_RETRY_S`` starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import structlog

from core.secrets import resolve_secret
from core.tools.config import McpToolConfig
from core.tools.errors import ToolError

log = structlog.get_logger("botd.tools")

SEPARATOR = "__"
_RETRY_S = 30.0


def function_name(tool: str, server_tool: str) -> str:
    """What the model calls an MCP server's tool: "NAME__tool" (dots are not allowed in OpenAI names)."""
    return f"{tool}{SEPARATOR}{server_tool}"


class McpServer:
    def __init__(self, name: str, cfg: McpToolConfig) -> None:
        self.name, self.cfg = name, cfg
        self.listed: dict[str, dict[str, Any]] = {}  # allowed tools the server offers: name -> definition
        self.last_error = ""
        self._session: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._started_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self._session is not None and self._task is not None and not self._task.done()

    def functions(self) -> dict[str, dict[str, Any]]:
        return {function_name(self.name, t): d for t, d in self.listed.items()}

    async def start(self) -> None:
        """Start the server and list its tools; a failure is logged and kept in ``last_error``."""
        async with self._lock:
            if self.alive:
                return
            await self._close_task()
            self._started_at = time.monotonic()
            self._stop = asyncio.Event()
            ready = asyncio.Event()
            self._task = asyncio.create_task(self._own(ready), name=f"mcp:{self.name}")
            try:
                await asyncio.wait_for(ready.wait(), self.cfg.startup_timeout_s)
            except TimeoutError:
                self.last_error = f"did not start within {self.cfg.startup_timeout_s:g} s"
                await self._close_task()
            if not self.alive:
                log.warning("mcp_server_unavailable", tool=self.name, error=self.last_error)

    async def _own(self, ready: asyncio.Event) -> None:
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                listing = await session.list_tools()
                offered = {t.name: t for t in listing.tools}
                self.listed = {}
                for name in self.cfg.allow:
                    t = offered.get(name)
                    if t is None:
                        log.warning("mcp_tool_not_offered", tool=self.name, server_tool=name)
                        continue
                    schema = getattr(t, "input_schema", None) or getattr(t, "inputSchema", None) or {}
                    self.listed[name] = {"description": (t.description or name)[:1000],
                                         "parameters": dict(schema) or {"type": "object", "properties": {}}}
                self._session, self.last_error = session, ""
                ready.set()
                await self._stop.wait()
        except Exception as exc:  # the server could not start, or died: calls answer with this
            self.last_error = _describe(exc)
        finally:
            self._session = None
            ready.set()

    def _transport(self) -> Any:
        cfg = self.cfg
        if cfg.command:
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            env = dict(cfg.env)
            env.update({k: resolve_secret(v) for k, v in cfg.secret_env.items()})
            params = StdioServerParameters(command=cfg.command[0], args=cfg.command[1:], env=env or None,
                                           cwd=cfg.cwd or None)
            return stdio_client(params, errlog=sys.__stderr__ or sys.stderr)
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        headers = dict(cfg.headers)
        headers.update({k: resolve_secret(v) for k, v in cfg.secret_headers.items()})
        return _with_client(streamable_http_client, cfg.url, create_mcp_http_client(headers=headers))

    async def call(self, server_tool: str, args: dict[str, Any]) -> str:
        if server_tool not in self.cfg.allow:
            raise ToolError("refused", f"tool {server_tool!r} is not allowed on {self.name}")
        if not self.alive and time.monotonic() - self._started_at >= _RETRY_S:
            await self.start()
        session = self._session
        if session is None or not self.alive:
            raise ToolError("error", f"MCP server {self.name} is not running ({self.last_error or 'stopped'})")
        if server_tool not in self.listed:
            raise ToolError("refused", f"the server does not offer {server_tool!r}")
        try:
            result = await session.call_tool(server_tool, args)
        except (asyncio.CancelledError, ToolError):
            raise
        except Exception as exc:
            self.last_error = _describe(exc)
            self._stop.set()  # a broken session: the next call (after _RETRY_S) starts a fresh one
            raise ToolError("error", f"MCP call failed: {self.last_error}") from None
        text = _content_text(result)
        if getattr(result, "is_error", None) or getattr(result, "isError", None):
            raise ToolError("error", text or "the tool failed")
        return text

    async def close(self) -> None:
        async with self._lock:
            await self._close_task()

    async def _close_task(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        except (TimeoutError, Exception):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


@contextlib.asynccontextmanager
async def _with_client(connect: Any, url: str, client: Any) -> Any:
    async with client, connect(url, http_client=client) as streams:
        yield streams[0], streams[1]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _describe(exc.exceptions[0])
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _content_text(result: Any) -> str:
    parts = []
    for block in getattr(result, "content", None) or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        else:
            parts.append(f"[{kind or 'content'}]")
    if not parts:
        structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
        if structured is not None:
            import json

            parts.append(json.dumps(structured, ensure_ascii=False))
    return "\n".join(parts)
