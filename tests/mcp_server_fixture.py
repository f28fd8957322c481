"""A tiny MCP server over stdio for tests/test_tools.py (the mcp SDK's MCPServer, formerly FastMCP).

Tools: add (allowed in the tests), shout (allowed), secret_file (never allowed: it must be
neither listed nor callable), fail (raises: an error result), whoami (the HTTP Authorization header).
"""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("botd-test")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text; says which token the server was given."""
    return text.upper() + " " + os.environ.get("FIXTURE_TOKEN", "no-token")


@server.tool()
def secret_file() -> str:
    """Must never be reachable through botd."""
    return "TOP-SECRET-CONTENT"


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ToolError("broken on purpose")


@server.tool()
def whoami(ctx: Context) -> str:
    """The Authorization header of the HTTP request (streamable HTTP only)."""
    return (ctx.headers or {}).get("authorization", "none")


if __name__ == "__main__":
    # No argument: stdio. "http PORT": streamable HTTP on 127.0.0.1:PORT/mcp.
    if len(sys.argv) == 3 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
