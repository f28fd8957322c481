"""Tools a bot may call: ``[tools.NAME]`` sections with a ``type``, granted per bot.

- ``calculator``: arithmetic, percentages, units, dates (an ``ast`` walk over an allow-list);
- ``http``: one endpoint of a company API, kept under its ``base_url``;
- ``search``: SearXNG, Elasticsearch or a generic JSON search endpoint;
- ``mcp``: the allowed tools of an MCP server (stdio or streamable HTTP).

One :class:`ToolBox` holds them all (an async context manager: MCP servers start on enter
and stop on exit). A reload that changes ``[tools]`` builds a new box and *retires* the old
one (:meth:`ToolBox.retire`): its calls under way finish, every later call on it is refused,
then its MCP sessions close -- so a narrowed ``allow`` list or schema is in force at once,
even for a caller still holding the old box.

:meth:`ToolBox.call` never raises for a tool's failure: a timeout, a refusal, bad arguments
or a dead server come back as a :class:`ToolResult` with ``ok=False`` and ``text="error: ..."``.
Every call writes one audit line (structlog event ``tool_call``) and counts in
``botd_tool_calls_total`` / ``botd_tool_call_seconds``.

Names the model sees: a tool is called by its ``[tools.NAME]``; an MCP server's tools by
``NAME__tool`` (``NAME`` the section, ``tool`` the server's name of it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import structlog

from core import metrics
from core.secrets import known_secrets, resolve_secret
from core.tools.calculator import CalcError, CalcRefused, calculate_async
from core.tools.config import (
    CalculatorToolConfig,
    HttpToolConfig,
    McpToolConfig,
    SearchToolConfig,
    ToolConfig,
)
from core.tools.errors import Outcome, ToolError
from core.tools.http import HttpTool, SearchTool
from core.tools.mcp_client import SEPARATOR, McpServer, function_name

__all__ = ["SEPARATOR", "ToolBox", "ToolConfig", "ToolError", "ToolResult", "function_name"]

log = structlog.get_logger("botd.tools")

_ARG_LOG_CHARS = 300


@dataclass(frozen=True)
class ToolResult:
    name: str
    ok: bool
    # What the model / user sees: the output cut to the tool's max_output_chars, or "error: <reason>".
    text: str
    duration_s: float
    # When not ok: "timeout", "refused: ...", "invalid arguments: ...", "unknown tool: ...", or the reason.
    error: str | None = None


class _Calculator:
    PARAMETERS: ClassVar[dict[str, Any]] = {"type": "object", "properties": {"expression": {
        "type": "string", "minLength": 1, "maxLength": 500,
        "description": "e.g. 1.5*(3+4), 17% of 2340, 200 + 15%, 3 km in m, 5 GB to MB, 100 F in C, "
                       "2026-12-25 - 2026-11-30, today + 30 days"}},
        "required": ["expression"], "additionalProperties": False}

    def __init__(self, name: str, cfg: CalculatorToolConfig) -> None:
        self.name, self.cfg = name, cfg

    def functions(self) -> dict[str, dict[str, Any]]:
        description = self.cfg.description or (
            "Compute arithmetic exactly: + - * / // % ** and parentheses, sqrt/round/log/sin..., percentages, "
            "unit conversions (length, mass, time, data sizes, temperature) and date differences.")
        return {self.name: {"description": description, "parameters": self.PARAMETERS}}

    async def run(self, args: dict[str, Any]) -> str:
        try:
            return await calculate_async(args["expression"])  # off the event loop
        except CalcRefused as exc:
            raise ToolError("refused", str(exc)) from None
        except CalcError as exc:
            raise ToolError("error", f"cannot compute: {exc}") from None


class ToolBox:
    """The configured tools. ``async with ToolBox(cfg.tools) as box: await box.call(...)``."""

    def __init__(self, tools_cfg: dict[str, ToolConfig]) -> None:
        self.cfg = dict(tools_cfg)
        self._tools: dict[str, Any] = {}
        for name, cfg in self.cfg.items():
            if isinstance(cfg, CalculatorToolConfig):
                self._tools[name] = _Calculator(name, cfg)
            elif isinstance(cfg, HttpToolConfig):
                self._tools[name] = HttpTool(name, cfg)
            elif isinstance(cfg, SearchToolConfig):
                self._tools[name] = SearchTool(name, cfg)
            elif isinstance(cfg, McpToolConfig):
                self._tools[name] = McpServer(name, cfg)
        self._http: aiohttp.ClientSession | None = None
        # Calls under way, and whether a reload replaced this box (it then refuses new calls).
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.retired = False
        self.closed = False
        self._secrets = _started_secrets(self.cfg)

    async def __aenter__(self) -> ToolBox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the MCP servers (together; one that fails is logged and gives error results)."""
        servers = [t for t in self._tools.values() if isinstance(t, McpServer)]
        if servers:
            await asyncio.gather(*(s.start() for s in servers))

    async def close(self) -> None:
        self.retired = True  # a closed box must not start its MCP servers again on a late call
        servers = [t for t in self._tools.values() if isinstance(t, McpServer)]
        await asyncio.gather(*(s.close() for s in servers), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        self.closed = True

    async def retire(self, grace_s: float) -> None:
        """Replaced by a reload: refuse every new call at once, let the calls under way finish
        (up to ``grace_s``; a call past it is cut), then close."""
        self.retired = True
        if self._running:
            log.info("tools replaced by the reload: closing the old ones after their calls", running=self._running)
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                log.warning("old tools closed with calls still running", running=self._running)
        await self.close()

    def same_as(self, tools_cfg: dict[str, ToolConfig]) -> bool:
        """Whether ``tools_cfg`` (a reloaded ``[tools]``) is what this box runs: the same sections
        and the same values behind the secrets its MCP servers were started with (a rotated
        token file is a change even when its reference is not)."""
        return dict(tools_cfg) == self.cfg and _started_secrets(tools_cfg) == self._secrets

    @staticmethod
    def grace_s(tools_cfg: dict[str, ToolConfig]) -> float:
        """How long a call of these tools may run: how long a retired box waits for its calls."""
        return max((c.timeout_s for c in tools_cfg.values()), default=0.0) + 5.0

    # --- what the model is offered ----------------------------------------------------------

    def names(self) -> list[str]:
        """The configured tools' names ([tools.NAME])."""
        return list(self._tools)

    def function_names(self, names: Sequence[str]) -> list[str]:
        """The names the model calls for the tools ``names`` (an MCP server: one per allowed tool it offers)."""
        return [f for n in names if n in self._tools for f in self._tools[n].functions()]

    def tool_of(self, function: str) -> str | None:
        """The [tools.NAME] a called name belongs to ("weather", "gh__search" -> "gh"), or None."""
        if function in self._tools and not isinstance(self._tools[function], McpServer):
            return function
        head, sep, _ = function.partition(SEPARATOR)
        return head if sep and isinstance(self._tools.get(head), McpServer) else None

    def definitions(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """OpenAI ``tools`` entries for the tools ``names``; unknown names are skipped."""
        out = []
        for n in names:
            tool = self._tools.get(n)
            if tool is None:
                continue
            for fname, d in tool.functions().items():
                out.append({"type": "function", "function": {
                    "name": fname, "description": d["description"], "parameters": d["parameters"]}})
        return out

    # --- calling ----------------------------------------------------------------------------

    async def call(self, name: str, arguments: dict[str, Any] | str, *, bot: str, user: str,
                   allowed: Sequence[str] | None = None) -> ToolResult:
        """Run the tool the model (or a user) called ``name``. Never raises for the tool's failure.

        ``allowed``: the [tools.NAME]s this caller was granted (e.g. the bot's ``tools``); a name
        outside them is refused. None: any configured tool.
        """
        start = time.monotonic()
        args: Any = arguments
        tool_name = self.tool_of(name)
        label = name if tool_name is not None else "unknown"
        outcome: Outcome = "ok"
        text = error = ""
        self._running += 1
        self._idle.clear()
        try:
            if self.retired:
                # Replaced by a reload: the old definitions and grants are out of service.
                raise ToolError("refused", "the tools were reconfigured; ask again")
            if tool_name is None:
                raise ToolError("refused", f"unknown tool {name!r}")
            if allowed is not None and tool_name not in allowed:
                raise ToolError("refused", f"tool {name!r} is not granted to this bot")
            args = self._arguments(arguments)
            text = await self._run(tool_name, name, args)
        except ToolError as exc:
            outcome, error = exc.outcome, exc.reason
        except Exception as exc:  # a bug or an unexpected library error: still an answer, logged below
            outcome, error = "error", f"{type(exc).__name__}"
            log.exception("tool_failed", tool=name, bot=bot)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()
        duration = time.monotonic() - start
        budget = self._budget(tool_name)
        if outcome == "ok":
            text = _cut(_masked(text), budget)
            shown_error = None
        else:
            shown_error = {"timeout": "timeout", "refused": f"refused: {error}",
                           "invalid": f"invalid arguments: {error}"}.get(outcome, error)
            shown_error = _masked(shown_error)
            text = _cut(f"error: {shown_error}", budget)
        metrics.TOOL_CALLS.labels(label, outcome).inc()
        metrics.TOOL_SECONDS.labels(label).observe(duration)
        log.info("tool_call", bot=bot, user=user, tool=name, arguments=_loggable(args),
                 duration_ms=round(duration * 1000, 1), outcome=outcome, **({"error": error} if error else {}))
        return ToolResult(name=name, ok=outcome == "ok", text=text, duration_s=duration, error=shown_error)

    def _budget(self, tool_name: str | None) -> int:
        cfg = self.cfg.get(tool_name or "")
        return cfg.max_output_chars if cfg is not None else 2000

    @staticmethod
    def _arguments(arguments: dict[str, Any] | str) -> dict[str, Any]:
        if isinstance(arguments, str):
            if len(arguments) > 100_000:
                raise ToolError("invalid", "arguments too long")
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ToolError("invalid", "not a JSON object") from None
        if not isinstance(arguments, dict):
            raise ToolError("invalid", "arguments must be a JSON object")
        return arguments

    async def _run(self, tool_name: str, function: str, args: dict[str, Any]) -> str:
        tool = self._tools[tool_name]
        cfg = self.cfg[tool_name]
        definition = tool.functions().get(function)
        if isinstance(tool, McpServer) and definition is None:
            server_tool = function[len(tool_name) + len(SEPARATOR):]
            if server_tool not in cfg.allow:  # type: ignore[union-attr]
                raise ToolError("refused", f"tool {server_tool!r} is not allowed on {tool_name}")
        if definition is not None:
            _validate(args, definition["parameters"])
        try:
            async with asyncio.timeout(cfg.timeout_s):
                if isinstance(tool, _Calculator):
                    return await tool.run(args)
                if isinstance(tool, McpServer):
                    return await tool.call(function[len(tool_name) + len(SEPARATOR):], args)
                return str(await tool.run(function, args, self._session()))
        except TimeoutError:
            raise ToolError("timeout", f"no answer within {cfg.timeout_s:g} s") from None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            # No proxies from the environment, no cookies kept between calls.
            self._http = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._http

    # --- slash commands ---------------------------------------------------------------------

    def parse_command(self, name: str, text: str) -> dict[str, Any]:
        """Arguments from a command's text: ``/tool weather city=上海`` -> ``{"city": "上海"}``.

        calculator: the whole text is the expression; search: the whole text is the query; text
        starting with "{": a JSON object; otherwise ``key=value`` pairs (quotes as in a shell),
        numbers and true/false typed as the schema says; a text without "=" fills the schema's
        only required (or only) property. Raises :class:`ToolError` ("invalid") when it cannot.
        """
        tool_name = self.tool_of(name)
        if tool_name is None:
            raise ToolError("refused", f"unknown tool {name!r}")
        tool = self._tools[tool_name]
        text = text.strip()
        if isinstance(tool, _Calculator):
            return {"expression": text}
        if isinstance(tool, SearchTool):
            return {"query": text}
        if text.startswith("{"):
            return self._arguments(text)
        schema = (tool.functions().get(name) or {}).get("parameters") or {}
        props: dict[str, Any] = schema.get("properties") or {}
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise ToolError("invalid", f"cannot read the arguments: {exc}") from None
        if words and not any(re.match(r"^[A-Za-z_][\w-]*=", w) for w in words):
            required = schema.get("required") or []
            only = required if len(required) == 1 else list(props) if len(props) == 1 else []
            if not only:
                raise ToolError("invalid", "write the arguments as key=value")
            return {only[0]: _typed(text, props.get(only[0]) or {})}
        args: dict[str, Any] = {}
        for w in words:
            key, sep, value = w.partition("=")
            if not sep or not re.match(r"^[A-Za-z_][\w-]*$", key):
                raise ToolError("invalid", f"{w!r}: write key=value")
            args[key] = _typed(value, props.get(key) or {})
        return args


def _typed(value: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    try:
        if "integer" in kinds and re.fullmatch(r"[+-]?\d+", value):
            return int(value)
        # One way to match each digit (``\d+\.?\d*`` split a digit run every way: quadratic).
        if "number" in kinds and re.fullmatch(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", value):
            return float(value) if not re.fullmatch(r"[+-]?\d+", value) else int(value)
        if "boolean" in kinds and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if kinds and set(kinds) & {"array", "object"} and value[:1] in "[{":
            return json.loads(value)
    except ValueError:
        pass
    return value


def _validate(args: dict[str, Any], schema: dict[str, Any]) -> None:
    import jsonschema

    try:
        validator = jsonschema.Draft202012Validator(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(args))
    except jsonschema.SchemaError:  # an MCP server's own bad schema: the server checks
        return
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise ToolError("invalid", f"{where + ': ' if where else ''}{error.message}"[:300])


def _started_secrets(tools_cfg: dict[str, ToolConfig]) -> dict[str, str]:
    """A digest of the secret values each MCP server is started with (never the values)."""
    out = {}
    for name, cfg in tools_cfg.items():
        if isinstance(cfg, McpToolConfig):
            digest = hashlib.sha256()
            for ref in [*cfg.secret_env.values(), *cfg.secret_headers.values()]:
                try:
                    digest.update(resolve_secret(ref).encode() + b"\0")
                except Exception:  # unreadable now: compared as such; the server's start says why
                    digest.update(b"\1unresolved\0")
            out[name] = digest.hexdigest()
    return out


def _masked(text: str) -> str:
    """``text`` with every secret botd has resolved replaced by "***" (an API that echoes its key)."""
    for value in sorted(known_secrets()[1], key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***")
    return text


def _cut(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    note = f"\n[truncated: {len(text)} characters, {budget} shown]"
    return text[: max(0, budget - len(note))] + note


def _loggable(args: Any) -> Any:
    """The arguments for the audit line: long values cut (secrets are masked by the log itself)."""
    if isinstance(args, dict):
        return {str(k)[:100]: _loggable(v) for k, v in list(args.items())[:30]}
    if isinstance(args, list):
        return [_loggable(v) for v in args[:30]]
    if isinstance(args, str) and len(args) > _ARG_LOG_CHARS:
        return args[:_ARG_LOG_CHARS] + f"...({len(args)} chars)"
    return args
