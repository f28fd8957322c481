"""The config sections of the tools: ``[tools.NAME]`` with a ``type``.

Kept apart from core.config (which imports this module) so that it imports nothing of
botd but the secret references: core.config -> core.tools.config, never back.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from core.secrets import Secret

TOOL_TYPES = ("calculator", "http", "search", "mcp")

# OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$. "__" is kept for MCP tools ("NAME__tool").
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_REFERENCE = re.compile(r"^(env|file|cred):")


def tool_name_problem(name: str) -> str:
    """What is wrong with a ``[tools.NAME]`` name ("" when nothing)."""
    if not _TOOL_NAME.match(name):
        return "a tool's name is 1-40 letters, digits, '-' and '_' (models call it by this name)"
    if "__" in name:
        return "a tool's name may not contain '__' (kept for MCP tools: NAME__tool)"
    return ""


class _ToolSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # What the model reads to decide when to call the tool ("" = a default per type).
    description: Annotated[str, Field(max_length=2000)] = ""
    # Longest time one call may take, and the most characters of its output that the model (or
    # the user) sees; longer output is cut and says so.
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    max_output_chars: Annotated[int, Field(ge=100, le=100_000)] = 2000


def _headers_check(headers: dict[str, str], secret: bool = False) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
        if "\n" in value or "\r" in value:
            raise ValueError(f"header {name}: line breaks are not allowed")
        if not secret and _REFERENCE.match(value):
            raise ValueError(f"header {name}: looks like a secret reference; put it in secret_headers, "
                             f"e.g. secret_headers = {{ {name} = \"env:VARIABLE\" }}")
    return headers


def _secret_headers_check(headers: dict[str, str]) -> dict[str, str]:
    return _headers_check(headers, secret=True)


# Header maps as every tool type takes them: plain values, and secret references apart.
Headers = Annotated[dict[str, str], AfterValidator(_headers_check)]
SecretHeaders = Annotated[dict[str, Secret], AfterValidator(_secret_headers_check)]


def _http_base(v: str) -> str:
    if not re.match(r"^https?://[^/?#@\s]+(/[^?#@\s]*)?$", v):
        raise ValueError('must be an http(s) URL without user, query or fragment, e.g. "https://api.example.com/v1"')
    return v.rstrip("/")


class CalculatorToolConfig(_ToolSection):
    """Arithmetic, percentages, unit conversions and date differences; no network."""

    type: Literal["calculator"]
    timeout_s: Annotated[float, Field(gt=0, le=10)] = 1.0


class HttpToolConfig(_ToolSection):
    """One endpoint of a company API."""

    type: Literal["http"]
    # The API's root; every request stays under it (same scheme, host, port and path prefix).
    base_url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    # Under base_url, with {param} placeholders filled from the arguments (URL-encoded). The other
    # arguments go into the query string (GET, DELETE) or a JSON body (POST, PUT, PATCH).
    path: Annotated[str, Field(max_length=1000)] = ""
    # The arguments' JSON schema (an object), checked before every call.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    headers: Headers = Field(default_factory=dict)
    # Headers whose values are secret references ("env:NAME", "file:/path", "cred:NAME").
    secret_headers: SecretHeaders = Field(default_factory=dict)
    max_response_bytes: Annotated[int, Field(ge=256, le=50_000_000)] = 1_000_000
    # A dotted path into a JSON answer ("current.temp_c", "items.0.name"): only that part is shown.
    select: Annotated[str, Field(max_length=500)] = ""
    # Redirects followed, each only within base_url (0: none).
    max_redirects: Annotated[int, Field(ge=0, le=5)] = 3

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str) -> str:
        return _http_base(v)

    @field_validator("path")
    @classmethod
    def _relative_path(cls, v: str) -> str:
        if "://" in v or v.startswith("//") or "@" in v or "\\" in v:
            raise ValueError("must be a path under base_url (no scheme, host, '@' or '\\')")
        if any(seg in (".", "..") for seg in re.split(r"[/?]", v)):
            raise ValueError("may not contain '.' or '..' segments")
        for name in re.findall(r"\{([^{}]*)\}", v):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"placeholder {{{name}}}: use a parameter name")
        return v

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_schema(v)

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        if v and not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*", v):
            raise ValueError('a dotted path such as "current.temp_c" or "items.0.name"')
        return v

    @model_validator(mode="after")
    def _placeholders_declared(self) -> HttpToolConfig:
        props = self.parameters.get("properties") or {}
        for name in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.path):
            if name not in props:
                raise ValueError(f"path placeholder {{{name}}} is not in parameters.properties")
            if name not in (self.parameters.get("required") or []):
                raise ValueError(f"path placeholder {{{name}}} must be in parameters.required")
        if not self.description:
            raise ValueError("description: say what the endpoint does (the model reads it to choose the tool)")
        return self


def check_schema(v: dict[str, Any]) -> dict[str, Any]:
    import jsonschema

    if v.get("type") != "object":
        raise ValueError('the arguments\' JSON schema must have "type": "object"')
    try:
        jsonschema.Draft202012Validator.check_schema(v)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: {exc.message}") from None
    return v


class SearchToolConfig(_ToolSection):
    """A search endpoint: SearXNG, Elasticsearch, or any JSON search API."""

    type: Literal["search"]
    # searxng: GET {url}/search?q=...&format=json; elasticsearch: POST {url}/{index}/_search with a
    # match query on `fields`; http: GET `url` with {query} in it (URL-encoded).
    kind: Literal["searxng", "elasticsearch", "http"]
    url: str
    index: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.*,-]{0,255}$")] = ""
    fields: list[str] = Field(default_factory=lambda: ["title", "content"])
    # Where results are in the answer (kind = "http": a dotted path to the list) and which fields
    # of a result hold its title, address and text.
    results_path: str = "results"
    title_field: str = "title"
    url_field: str = "url"
    snippet_field: str = "content"
    top_n: Annotated[int, Field(ge=1, le=20)] = 5
    headers: Headers = Field(default_factory=dict)
    secret_headers: SecretHeaders = Field(default_factory=dict)
    max_response_bytes: Annotated[int, Field(ge=256, le=50_000_000)] = 2_000_000

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/?#@\s]+", v) or "@" in v.split("?")[0]:
            raise ValueError('must be an http(s) URL without user, e.g. "http://127.0.0.1:8888"')
        return v if "{query}" in v else _http_base(v)

    @model_validator(mode="after")
    def _kind_needs(self) -> SearchToolConfig:
        if self.kind == "elasticsearch" and not self.index:
            raise ValueError('kind = "elasticsearch" needs index')
        if self.kind == "http" and "{query}" not in self.url:
            raise ValueError('kind = "http" needs {query} in url, e.g. "https://search.example.com/api?q={query}"')
        return self


class McpToolConfig(_ToolSection):
    """The tools of an MCP server, each allowed by name."""

    type: Literal["mcp"]
    # stdio: the server's command line (e.g. ["npx", "-y", "@modelcontextprotocol/server-github"]),
    # its extra environment (secret_env: values are secret references) and working folder.
    command: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, Secret] = Field(default_factory=dict)
    cwd: str = ""
    # Streamable HTTP: the server's endpoint, e.g. "http://127.0.0.1:9000/mcp".
    url: str = ""
    headers: Headers = Field(default_factory=dict)
    secret_headers: SecretHeaders = Field(default_factory=dict)
    # The server's tools that may be used, by their name on the server; no other is listed or called.
    allow: Annotated[list[str], Field(min_length=1)]
    # Longest wait for the server to start and list its tools.
    startup_timeout_s: Annotated[float, Field(gt=0, le=300)] = 20.0
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0

    @field_validator("allow")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"{name!r}: tool names are letters, digits, '-' and '_'")
        return v

    @field_validator("env")
    @classmethod
    def _plain_env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if _REFERENCE.match(value):
                raise ValueError(f"{name}: looks like a secret reference; put it in secret_env")
        return v

    @model_validator(mode="after")
    def _one_transport(self) -> McpToolConfig:
        if bool(self.command) == bool(self.url):
            raise ValueError("set either command (a stdio server) or url (streamable HTTP), not both")
        if self.url:
            _http_base(self.url)
        if self.command and (self.headers or self.secret_headers):
            raise ValueError("headers are for url servers; a stdio server gets env / secret_env")
        if self.url and (self.env or self.secret_env or self.cwd):
            raise ValueError("env, secret_env and cwd are for stdio servers (command)")
        return self


ToolConfig = Annotated[
    Union[CalculatorToolConfig, HttpToolConfig, SearchToolConfig, McpToolConfig],  # noqa: UP007
    Field(discriminator="type"),
]


def tool_config_problem(name: str, cfg: Any) -> tuple[str, str] | None:
    """A problem of ``[tools.NAME]`` that needs its name: (dotted key, reason), or None."""
    problem = tool_name_problem(name)
    if problem:
        return f"tools.{name}", problem
    if isinstance(cfg, McpToolConfig):
        for tool in cfg.allow:
            if len(name) + 2 + len(tool) > 64:
                return f"tools.{name}.allow", (f"{name}__{tool} is longer than 64 characters (the longest name a "
                                               "model may call); use a shorter [tools.NAME]")
    return None
