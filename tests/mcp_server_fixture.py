"""A tiny MCP server over stdio for tests/test_tools.py (the mcp SDK's MCPServer, formerly FastMCP).

Tools: add (allowed in the tests), shout (allowed), secret_file (never allowed: it must be
neither listed nor callable), fail (raises: an error result), whoami (the HTTP Authorization header).
With FIXTURE_CALLS set, each call appends the tool's name to that file (what reached the server).
"""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("botd-test")


def _record(tool: str) -> None:
    path = os.environ.get("FIXTURE_CALLS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(tool + "\n")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    _record("add")
    return str(a + b)


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text; says which token the server was given."""
    _record("shout")
    return text.upper() + " " + os.environ.get("FIXTURE_TOKEN", "no-token")


@server.tool()
def secret_file() -> str:
    """Must never be reachable through botd."""
    _record("secret_file")
    return "TOP-SECRET-CONTENT"


@server.tool()
def fail() -> str:
    """Always fails."""
    _record("fail")
    raise ToolError("broken on purpose")


@server.tool()
def whoami(ctx: Context) -> str:
    """The Authorization header of the HTTP request (streamable HTTP only)."""
    _record("whoami")
    return (ctx.headers or {}).get("authorization", "none")


if __name__ == "__main__":
    # No argument: stdio. "http PORT": streamable HTTP on 127.0.0.1:PORT/mcp.
    if len(sys.argv) == 3 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
