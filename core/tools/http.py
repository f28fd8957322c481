"""The http tool (one endpoint of a company API) and the search tool (SearXNG, Elasticsearch or
a generic JSON search API)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from core.tools._net import build_headers, fetch, pick, render
from core.tools.config import HttpToolConfig, SearchToolConfig
from core.tools.errors import ToolError

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

log = structlog.get_logger("botd.tools")


def declared(args: dict[str, Any], schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``args`` without the names ``schema`` does not declare, and the names dropped.

    JSON Schema lets an object carry any undeclared property unless it says
    ``"additionalProperties": false``; a company API must still get only what the admin
    described (``/tool weather city=x admin=true`` must not send ``admin``), so anything
    undeclared is dropped unless the schema opts in (``additionalProperties`` true or a
    schema, or a matching ``patternProperties``). Nested objects are filtered the same way.
    """
    extra = schema.get("additionalProperties")
    if extra is True or isinstance(extra, dict):
        return args, []
    props: dict[str, Any] = schema.get("properties") or {}
    patterns = []
    for p in schema.get("patternProperties") or {}:
        try:
            patterns.append(re.compile(p))
        except re.error:
            continue  # not a Python regex: its properties are not recognised, so dropped
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in args.items():
        sub = props.get(key)
        if sub is None and not any(p.search(key) for p in patterns):
            dropped.append(key)
            continue
        if isinstance(value, dict) and isinstance(sub, dict) and isinstance(sub.get("properties"), dict):
            value, inner = declared(value, sub)
            dropped += [f"{key}.{n}" for n in inner]
        kept[key] = value
    return kept, dropped


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int | float):
        return str(v)
    return json.dumps(v, ensure_ascii=False)


class HttpTool:
    def __init__(self, name: str, cfg: HttpToolConfig) -> None:
        self.name, self.cfg = name, cfg
        self.base = URL(cfg.base_url, encoded=True)

    def functions(self) -> dict[str, dict[str, Any]]:
        return {self.name: {"description": self.cfg.description, "parameters": self.cfg.parameters}}

    def url_for(self, args: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
        """The request's URL (path placeholders filled) and the arguments left for query or body."""
        used: set[str] = set()

        def fill(m: re.Match[str]) -> str:
            used.add(m.group(1))
            value = _scalar(args[m.group(1)])
            if value in ("", ".", ".."):
                raise ToolError("refused", f"{m.group(1)}: {value!r} is not allowed in the path")
            return quote(value, safe="")

        path = _PLACEHOLDER.sub(fill, self.cfg.path)
        raw = self.cfg.base_url + ("/" + path.lstrip("/") if path else "")
        if "@" in raw[len(self.cfg.base_url):].split("?")[0]:
            raise ToolError("refused", "host not allowed ('@' in the path)")
        return URL(raw, encoded=True), {k: v for k, v in args.items() if k not in used}

    async def run(self, function: str, args: dict[str, Any], session: aiohttp.ClientSession) -> str:
        cfg = self.cfg
        args, dropped = declared(args, cfg.parameters)
        if dropped:
            log.info("tool_arguments_dropped", tool=self.name, names=dropped[:30],
                     reason="not declared in the tool's parameters")
        url, rest = self.url_for(args)
        params = json_body = None
        if cfg.method in ("GET", "DELETE"):
            params = {k: _scalar(v) for k, v in rest.items()} or None
        elif rest:
            json_body = rest
        got = await fetch(session, cfg.method, url, base=self.base,
                          headers=build_headers(cfg.headers, cfg.secret_headers), params=params,
                          json_body=json_body, max_bytes=cfg.max_response_bytes,
                          max_redirects=cfg.max_redirects, timeout_s=cfg.timeout_s)
        if got.status >= 400:
            raise ToolError("error", f"HTTP {got.status}: {got.text()[:300]}")
        if cfg.select:
            return render(pick(got.json(), cfg.select))
        text = got.text()
        if got.truncated:
            text += f"\n[truncated: the answer is over {cfg.max_response_bytes} bytes]"
        return text


class SearchTool:
    def __init__(self, name: str, cfg: SearchToolConfig) -> None:
        self.name, self.cfg = name, cfg

    def functions(self) -> dict[str, dict[str, Any]]:
        description = self.cfg.description or "Search and return the top results (title, address, text)."
        parameters = {"type": "object", "properties": {"query": {"type": "string", "description": "what to search",
                                                                  "minLength": 1, "maxLength": 500}},
                      "required": ["query"], "additionalProperties": False}
        return {self.name: {"description": description, "parameters": parameters}}

    async def run(self, function: str, args: dict[str, Any], session: aiohttp.ClientSession) -> str:
        cfg, query = self.cfg, str(args["query"])
        params: dict[str, str] | None = None
        body: Any = None
        method = "GET"
        if cfg.kind == "searxng":
            base = URL(cfg.url, encoded=True)
            url, params = URL(cfg.url + "/search", encoded=True), {"q": query, "format": "json"}
        elif cfg.kind == "elasticsearch":
            base = URL(cfg.url, encoded=True)
            url = URL(f"{cfg.url}/{quote(cfg.index, safe=',*')}/_search", encoded=True)
            method = "POST"
            body = {"size": cfg.top_n, "query": {"multi_match": {"query": query, "fields": cfg.fields}}}
        else:
            url = URL(cfg.url.replace("{query}", quote(query, safe="")), encoded=True)
            base = url.origin()
        got = await fetch(session, method, url, base=base, headers=build_headers(cfg.headers, cfg.secret_headers),
                          params=params, json_body=body, max_bytes=cfg.max_response_bytes, max_redirects=0,
                          timeout_s=cfg.timeout_s)
        if got.status >= 400:
            raise ToolError("error", f"HTTP {got.status}: {got.text()[:300]}")
        data = got.json()
        if cfg.kind == "elasticsearch":
            hits = pick(data, "hits.hits")
            results = [h.get("_source", {}) for h in hits if isinstance(h, dict)] if isinstance(hits, list) else []
        else:
            found = pick(data, cfg.results_path)
            results = found if isinstance(found, list) else []
        lines = []
        for i, r in enumerate([r for r in results if isinstance(r, dict)][: cfg.top_n], start=1):
            title = _field(r, cfg.title_field) or "(no title)"
            lines.append(f"{i}. {title}")
            if url_text := _field(r, cfg.url_field):
                lines.append(f"   {url_text}")
            if snippet := _field(r, cfg.snippet_field):
                lines.append(f"   {snippet[:300]}")
        return "\n".join(lines) if lines else f"no results for {query!r}"


def _field(r: dict[str, Any], path: str) -> str:
    try:
        v = pick(r, path)
    except ToolError:
        return ""
    text = render(v) if v is not None else ""
    return " ".join(text.split())
