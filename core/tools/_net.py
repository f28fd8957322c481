"""HTTP requests of the http and search tools: kept under one configured base URL, redirects
followed only inside it, bodies read up to a byte budget."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from core.secrets import resolve_secret
from core.tools.errors import ToolError

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Fetched:
    status: int
    body: bytes
    truncated: bool
    charset: str
    content_type: str

    def text(self) -> str:
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        if self.truncated:
            raise ToolError("error", "the answer is larger than max_response_bytes; cannot read it as JSON")
        try:
            return json.loads(self.text())
        except ValueError:
            raise ToolError("error", "the answer is not JSON") from None


def under(url: URL, base: URL) -> bool:
    """Whether ``url`` stays on ``base``'s scheme, host and port, inside its path."""
    if url.scheme != base.scheme or (url.host or "").lower() != (base.host or "").lower():
        return False
    if url.port != base.port or url.user is not None or url.password is not None:
        return False
    segments = url.raw_path.split("/")
    if any(s in (".", "..") or s.lower() in ("%2e", "%2e%2e", ".%2e", "%2e.") for s in segments):
        return False
    prefix = base.raw_path.rstrip("/")
    return url.raw_path == prefix or url.raw_path.startswith(prefix + "/") or not prefix


def build_headers(plain: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    headers = dict(plain)
    for name, ref in secret.items():
        try:
            headers[name] = resolve_secret(ref)
        except Exception:
            raise ToolError("error", f"secret for header {name} is not available") from None
    return headers


async def fetch(session: aiohttp.ClientSession, method: str, url: URL, *, base: URL, headers: dict[str, str],
                params: dict[str, str] | None = None, json_body: Any = None, max_bytes: int,
                max_redirects: int, timeout_s: float) -> Fetched:
    """One request (and up to ``max_redirects`` redirects inside ``base``); raises :class:`ToolError`."""
    if not under(url, base):
        raise ToolError("refused", "host not allowed (the address leaves the configured base URL)")
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    for _ in range(max_redirects + 1):
        try:
            async with session.request(method, url, headers=headers, params=params, json=json_body,
                                       allow_redirects=False, timeout=timeout) as resp:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location", "")
                    target = url.join(URL(location)) if location else None
                    if target is None or not under(target, base):
                        raise ToolError("refused", "redirect off the allowed host not followed")
                    if max_redirects == 0:
                        raise ToolError("refused", "redirects are not followed (max_redirects = 0)")
                    url, params = target, None
                    if resp.status == 303:
                        method, json_body = "GET", None
                    continue
                body = bytearray()
                truncated = False
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > max_bytes:
                        truncated = True
                        del body[max_bytes:]
                        break
                return Fetched(resp.status, bytes(body), truncated, resp.charset or "utf-8",
                               resp.content_type or "")
        except aiohttp.ClientError as exc:
            raise ToolError("error", f"request failed: {type(exc).__name__}") from None
    raise ToolError("refused", f"more than {max_redirects} redirects")


def pick(data: Any, path: str) -> Any:
    """The part of ``data`` at a dotted path: "a.b", "items.0.name"."""
    for part in path.split(".") if path else []:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.lstrip("-").isdigit() and -len(data) <= int(part) < len(data):
            data = data[int(part)]
        else:
            raise ToolError("error", f"the answer has no {path!r} (stopped at {part!r})")
    return data


def render(data: Any) -> str:
    return data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
