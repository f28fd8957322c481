"""Fetching what users send (files, pictures, voice messages) from a platform, bounded.

Every connector's :meth:`connectors.reply.ReplyTarget.download` ends here: the response body is
read in chunks and refused as soon as it passes the limit (a declared ``Content-Length`` over
it is refused before the first byte), so a huge or endless body never fills memory. Errors
become :class:`~connectors.reply.AttachmentUnavailable` with a reason that never holds a URL
(platforms put tokens and signed keys in them) nor a token.

Also here: the attachment kind a platform's MIME type or file name implies, shared by the
connectors that announce only one of them.
"""

from __future__ import annotations

import mimetypes
from typing import Any

import aiohttp

from connectors.reply import AttachmentTooLarge, AttachmentUnavailable
from core.messages import AttachmentKind

CHUNK = 64 * 1024
# A download that stalls this long between two chunks is given up.
READ_TIMEOUT_S = 30.0


def too_large(max_bytes: int, size: int | None = None) -> AttachmentTooLarge:
    said = f" ({size} bytes)" if size is not None else ""
    return AttachmentTooLarge(f"the attachment is larger than {max_bytes} bytes{said}")


def check_announced(size: Any, max_bytes: int) -> None:
    """Refuse before any request when the platform already said the file is too big."""
    if isinstance(size, int) and not isinstance(size, bool) and size > max_bytes:
        raise too_large(max_bytes, size)


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    """The body of ``resp``, at most ``max_bytes`` (refused while reading, not after)."""
    if resp.status >= 400:
        raise AttachmentUnavailable(f"{what}: the platform answered HTTP {resp.status}")
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise too_large(max_bytes, declared)
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            buf += chunk
            if len(buf) > max_bytes:
                raise too_large(max_bytes)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AttachmentUnavailable(f"{what}: the download broke off ({type(exc).__name__})") from None
    return bytes(buf)


async def fetch(session: aiohttp.ClientSession, url: str, max_bytes: int, what: str,
                headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> bytes:
    """GET ``url`` and read it capped; connection errors become AttachmentUnavailable (the URL,
    which may carry a token, is never in the reason)."""
    try:
        async with session.get(url, headers=headers, params=params, allow_redirects=True,
                               timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                             sock_read=READ_TIMEOUT_S)) as resp:
            return await read_capped(resp, max_bytes, what)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AttachmentUnavailable(f"{what}: no answer from the platform ({type(exc).__name__})") from None


def kind_of(mime: str, name: str = "") -> AttachmentKind:
    """image/* -> "image", audio/* -> "voice", anything else "file" (the MIME type guessed from
    the name when the platform gave none)."""
    mime = (mime or mimetypes.guess_type(name)[0] or "").lower()
    if mime.startswith("image/"):
        return "image"
    if mime.startswith("audio/"):
        return "voice"
    return "file"


def mime_of(name: str, fallback: str = "") -> str:
    return mimetypes.guess_type(name)[0] or fallback
