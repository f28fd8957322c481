"""The config sections of the tools: ``[tools.NAME]`` with a ``type``.

Kept apart from core.config (which imports this module) so that it imports nothing of
botd but the secret references: core.config -> core.tools.config, never back.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

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

    description: Annotated[str, Field(max_length=2000)] = Field(
        default="",
        description='What the model reads to decide when to call the tool ("": a default per type).',
        json_schema_extra={"zh": '模型据以决定何时调用该工具的说明（""：按类型的默认说明）。'})
    timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=10.0,
        description="Longest time one call may take, in seconds.",
        json_schema_extra={"zh": "一次调用的最长时间（秒）。"})
    max_output_chars: Annotated[int, Field(ge=100, le=100_000)] = Field(
        default=2000,
        description="Most characters of a call's output the model (or the user) sees; longer output is cut and says "
                    "so.",
        json_schema_extra={"zh": "模型（或用户）看到的调用输出的最大字符数；更长的输出会被截断并注明。"})


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

    doc_zh: ClassVar[str] = "计算器：算术、百分比、单位和日期。"

    type: Literal["calculator"] = Field(
        description='"calculator": arithmetic, percentages, units and dates (17% of 2340, 3 km in m, today + 30 '
                    "days).",
        json_schema_extra={"zh": '"calculator"：算术、百分比、单位和日期（2340 的 17%、3 km 换算成 m、今天 + 30 天'
                                 "）。"})
    timeout_s: Annotated[float, Field(gt=0, le=10)] = Field(
        default=1.0,
        description="Longest time one call may take, in seconds.",
        json_schema_extra={"zh": "一次调用的最长时间（秒）。"})


class HttpToolConfig(_ToolSection):
    """One endpoint of a company API."""

    doc_zh: ClassVar[str] = "HTTP 工具：公司 API 的一个端点。"

    type: Literal["http"] = Field(
        description='"http": one endpoint of a company API; requests never leave base_url.',
        json_schema_extra={"zh": '"http"：公司 API 的一个端点；请求绝不离开 base_url。'})
    base_url: str = Field(
        description="The API's root; every request stays under it (same scheme, host, port and path prefix).",
        json_schema_extra={"zh": "API 的根地址；每个请求都在其下（相同的协议、主机、端口和路径前缀）。"})
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(
        default="GET",
        description="The HTTP method.",
        json_schema_extra={"zh": "HTTP 方法。"})
    path: Annotated[str, Field(max_length=1000)] = Field(
        default="",
        description="Under base_url, with {param} placeholders filled from the arguments (URL-encoded); the other "
                    "arguments go into the query string (GET, DELETE) or a JSON body (POST, PUT, PATCH).",
        json_schema_extra={"zh": "base_url 之下的路径，{param} 占位符由参数填入（URL 编码）；其他参数放入查询字符串"
                                 "（GET、DELETE）或 JSON 请求体（POST、PUT、PATCH）。"})
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="The arguments' JSON schema (an object), checked before every call.",
        json_schema_extra={"zh": "参数的 JSON schema（一个对象），每次调用前校验。"})
    headers: Headers = Field(
        default_factory=dict,
        description="Request headers with plain values.",
        json_schema_extra={"zh": "取值为明文的请求头。"})
    secret_headers: SecretHeaders = Field(
        default_factory=dict,
        description='Request headers whose values are secret references ("env:NAME", "file:/path", "cred:NAME").',
        json_schema_extra={"zh": '取值为秘密引用的请求头（"env:NAME"、"file:/path"、"cred:NAME"）。'})
    max_response_bytes: Annotated[int, Field(ge=256, le=50_000_000)] = Field(
        default=1_000_000,
        description="Largest answer read, in bytes.",
        json_schema_extra={"zh": "读取的最大响应（字节）。"})
    select: Annotated[str, Field(max_length=500)] = Field(
        default="",
        description='A dotted path into a JSON answer ("current.temp_c", "items.0.name"): only that part is shown.',
        json_schema_extra={"zh": 'JSON 响应中的点分路径（"current.temp_c"、"items.0.name"）：只显示这一部分。'})
    max_redirects: Annotated[int, Field(ge=0, le=5)] = Field(
        default=3,
        description="Redirects followed, each only within base_url (0: none).",
        json_schema_extra={"zh": "跟随的重定向次数，每次都只限于 base_url 之内（0：不跟随）。"})

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

    doc_zh: ClassVar[str] = "搜索工具：SearXNG、Elasticsearch 或 HTTP 搜索端点。"

    type: Literal["search"] = Field(
        description='"search": a search engine (SearXNG, Elasticsearch or an HTTP search endpoint).',
        json_schema_extra={"zh": '"search"：搜索引擎（SearXNG、Elasticsearch 或一个 HTTP 搜索端点）。'})
    kind: Literal["searxng", "elasticsearch", "http"] = Field(
        description='"searxng": GET {url}/search?q=...&format=json; "elasticsearch": POST {url}/{index}/_search '
                    'with a match query on fields; "http": GET url with {query} in it (URL-encoded).',
        json_schema_extra={"zh": '"searxng"：GET {url}/search?q=...&format=json；"elasticsearch"：POST '
                                 '{url}/{index}/_search，对 fields 做 match 查询；"http"：GET url，其中的 {query} '
                                 "被替换（URL 编码）。"})
    url: str = Field(
        description="The search service's address.",
        json_schema_extra={"zh": "搜索服务的地址。"})
    index: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.*,-]{0,255}$")] = Field(
        default="",
        description="elasticsearch: the index searched.",
        json_schema_extra={"zh": "elasticsearch：被搜索的索引。"})
    fields: list[str] = Field(
        default_factory=lambda: ["title", "content"],
        description="elasticsearch: the fields the match query searches.",
        json_schema_extra={"zh": "elasticsearch：match 查询搜索的字段。"})
    results_path: str = Field(
        default="results",
        description='Where the list of results is in the answer (kind = "http": a dotted path).',
        json_schema_extra={"zh": '结果列表在响应中的位置（kind = "http"：点分路径）。'})
    title_field: str = Field(
        default="title",
        description="The field of a result that holds its title.",
        json_schema_extra={"zh": "结果中存放标题的字段。"})
    url_field: str = Field(
        default="url",
        description="The field of a result that holds its address.",
        json_schema_extra={"zh": "结果中存放地址的字段。"})
    snippet_field: str = Field(
        default="content",
        description="The field of a result that holds its text.",
        json_schema_extra={"zh": "结果中存放正文的字段。"})
    top_n: Annotated[int, Field(ge=1, le=20)] = Field(
        default=5,
        description="Results shown at most.",
        json_schema_extra={"zh": "最多显示的结果数。"})
    headers: Headers = Field(
        default_factory=dict,
        description="Request headers with plain values.",
        json_schema_extra={"zh": "取值为明文的请求头。"})
    secret_headers: SecretHeaders = Field(
        default_factory=dict,
        description='Request headers whose values are secret references ("env:NAME", "file:/path", "cred:NAME").',
        json_schema_extra={"zh": '取值为秘密引用的请求头（"env:NAME"、"file:/path"、"cred:NAME"）。'})
    max_response_bytes: Annotated[int, Field(ge=256, le=50_000_000)] = Field(
        default=2_000_000,
        description="Largest answer read, in bytes.",
        json_schema_extra={"zh": "读取的最大响应（字节）。"})

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

    doc_zh: ClassVar[str] = "MCP 工具：一个 MCP 服务器的工具（stdio 或 Streamable HTTP）。"

    type: Literal["mcp"] = Field(
        description="\"mcp\": an MCP server's tools, called by the model as NAME__tool.",
        json_schema_extra={"zh": '"mcp"：MCP 服务器的工具，模型以 NAME__tool 的名称调用。'})
    command: list[str] = Field(
        default_factory=list,
        description="stdio: the server's command line, e.g. [\"npx\", \"-y\", "
                    '"@modelcontextprotocol/server-github"].',
        json_schema_extra={"zh": 'stdio：服务器的命令行，例如 ["npx", "-y", "@modelcontextprotocol/server-github"]'
                                 "。"})
    env: dict[str, str] = Field(
        default_factory=dict,
        description="stdio: extra environment variables with plain values.",
        json_schema_extra={"zh": "stdio：取值为明文的额外环境变量。"})
    secret_env: dict[str, Secret] = Field(
        default_factory=dict,
        description="stdio: extra environment variables whose values are secret references.",
        json_schema_extra={"zh": "stdio：取值为秘密引用的额外环境变量。"})
    cwd: str = Field(
        default="",
        description="stdio: the server's working folder; empty: botd's.",
        json_schema_extra={"zh": "stdio：服务器的工作目录；留空：与 botd 相同。"})
    url: str = Field(
        default="",
        description="Streamable HTTP: the server's endpoint, e.g. \"http://127.0.0.1:9000/mcp\".",
        json_schema_extra={"zh": 'Streamable HTTP：服务器的端点，例如 "http://127.0.0.1:9000/mcp"。'})
    headers: Headers = Field(
        default_factory=dict,
        description="Streamable HTTP: request headers with plain values.",
        json_schema_extra={"zh": "Streamable HTTP：取值为明文的请求头。"})
    secret_headers: SecretHeaders = Field(
        default_factory=dict,
        description="Streamable HTTP: request headers whose values are secret references.",
        json_schema_extra={"zh": "Streamable HTTP：取值为秘密引用的请求头。"})
    allow: Annotated[list[str], Field(min_length=1)] = Field(
        description="The server's tools that may be used, by their name on the server; no other is listed or called.",
        json_schema_extra={"zh": "可以使用的服务器工具（按其在服务器上的名称）；其他工具既不列出也不调用。"})
    startup_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=20.0,
        description="Longest wait for the server to start and list its tools, in seconds.",
        json_schema_extra={"zh": "等待服务器启动并列出其工具的最长时间（秒）。"})
    timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=30.0,
        description="Longest time one call may take, in seconds.",
        json_schema_extra={"zh": "一次调用的最长时间（秒）。"})

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
