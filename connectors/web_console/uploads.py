"""Files sent in the console's chat: kept in Redis for a few minutes, fetched by the answer.

The chat form posts a file with the message (multipart/form-data). Its bytes are kept under a
random key (``console:upload:<random>`` in the shared key-value cache, base64, ``TTL_S``) and the
message's :class:`~core.messages.Attachment` holds only that key and the user's name: the
answer reads it through :meth:`ChatUploads.download_for`, which gives a user's own uploads only.
Any daemon of a cluster can read them; nothing is written to disk.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Awaitable, Callable

from connectors.download import check_announced, kind_of, mime_of, too_large
from connectors.reply import AttachmentUnavailable
from core.kv import KeyValueCache
from core.messages import Attachment
from core.redis_store import StoreUnavailable

TTL_S = 900
PREFIX = "console:upload:"
# At most this many files with one message.
MAX_FILES = 5

Download = Callable[[Attachment, int], Awaitable[bytes]]


class ChatUploads:
    def __init__(self, cache: KeyValueCache) -> None:
        self.cache = cache

    async def keep(self, user: str, name: str, mime: str, data: bytes) -> Attachment:
        """Keep ``data`` for ``TTL_S`` seconds; the attachment that names it."""
        key = PREFIX + secrets.token_urlsafe(18)
        await self.cache.set(key, base64.b64encode(data).decode("ascii"), TTL_S)
        mime = mime if mime and mime != "application/octet-stream" else mime_of(name, mime)
        return Attachment(kind_of(mime, name), name=name, mime=mime, size=len(data),
                          ref={"upload": key, "user": user})

    def download_for(self, user: str) -> Download:
        """The download of ``user``'s answers: their own uploads, nothing else."""
        async def download(attachment: Attachment, max_bytes: int) -> bytes:
            key = str(attachment.ref.get("upload") or "")
            if not key.startswith(PREFIX) or attachment.ref.get("user") != user:
                raise AttachmentUnavailable("console: not an upload of this user")
            check_announced(attachment.size, max_bytes)
            try:
                raw = await self.cache.get(key)
            except StoreUnavailable:
                raise AttachmentUnavailable("console: Redis is unreachable") from None
            if raw is None:
                raise AttachmentUnavailable(f"console: the upload expired (kept {TTL_S} s)")
            if len(raw) // 4 * 3 - 2 > max_bytes:  # decoded size, before decoding
                raise too_large(max_bytes)
            try:
                data = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise AttachmentUnavailable("console: the stored upload is damaged") from None
            if len(data) > max_bytes:
                raise too_large(max_bytes, len(data))
            return data
        return download
