"""What users send a WeCom AI bot: pictures and files as encrypted downloads, voice as WeCom's transcript.

A picture or file message carries a ``url`` whose content is AES-256-CBC encrypted: with the
message's own ``aeskey`` over the long connection, with the bot's EncodingAESKey in callback mode;
``key = base64decode(aeskey + "=")``, ``iv = key[:16]``, PKCS#7 padding to 32 bytes (the callback
crypto's scheme, without its framing). The URL needs no token. The ciphertext is read capped (a
32-byte padding block over the limit at most) and decrypted as it arrives.

A voice message arrives already transcribed by WeCom (``voice.content``): its Attachment carries
the transcript and nothing to download.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from connectors.download import CHUNK, READ_TIMEOUT_S, check_announced, mime_of, too_large
from connectors.reply import AttachmentUnavailable
from core.messages import Attachment, AttachmentKind

_BLOCK_BITS = 32 * 8


def attachments_of(body: dict[str, Any]) -> list[Attachment]:
    """The pictures and files of a message (a mixed message's pictures too), and a voice message
    with WeCom's transcript."""
    kind = body.get("msgtype")
    items: list[tuple[AttachmentKind, Any]] = []
    if kind == "image":
        items = [("image", body.get("image"))]
    elif kind == "file":
        items = [("file", body.get("file"))]
    elif kind == "mixed":
        items = [("image", i.get("image")) for i in (body.get("mixed") or {}).get("msg_item") or []
                 if isinstance(i, dict) and i.get("msgtype") == "image"]
    elif kind == "voice":
        heard = str((body.get("voice") or {}).get("content") or "").strip()
        return [Attachment("voice", transcript=heard)] if heard else []
    found = []
    for k, item in items:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str) or not item["url"]:
            continue
        name = str(item.get("filename") or item.get("file_name") or "")
        ref = {"url": item["url"]}
        if isinstance(item.get("aeskey"), str) and item["aeskey"]:
            ref["aeskey"] = item["aeskey"]  # the long connection's per-message key
        size = item.get("size") or item.get("filesize")
        found.append(Attachment(k, name=name, mime="image/jpeg" if k == "image" else mime_of(name), ref=ref,
                                size=size if isinstance(size, int) else None))
    return found


def _key(aeskey: str) -> bytes:
    try:
        key = base64.b64decode(aeskey + "=" * (-len(aeskey) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise AttachmentUnavailable("wecom ai bot: the file's aeskey is not base64") from None
    if len(key) != 32:
        raise AttachmentUnavailable("wecom ai bot: the file's aeskey is not 32 bytes")
    return key


class AibotMedia:
    """Downloads and decrypts one bot's pictures and files (``bot_key``: callback mode's
    EncodingAESKey, used when a message names no key of its own)."""

    def __init__(self, http: aiohttp.ClientSession, bot_key: str | None) -> None:
        self.http = http
        self.bot_key = bot_key

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        url = str(attachment.ref.get("url") or "")
        if not url.startswith(("https://", "http://")):
            raise AttachmentUnavailable("wecom ai bot: nothing to download (a voice message is its transcript)")
        aeskey = str(attachment.ref.get("aeskey") or self.bot_key or "")
        if not aeskey:
            raise AttachmentUnavailable("wecom ai bot: no key to decrypt the file with")
        check_announced(attachment.size, max_bytes)
        key = _key(aeskey)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        unpadder = padding.PKCS7(_BLOCK_BITS).unpadder()
        plain = bytearray()
        read = 0
        try:
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                        sock_read=READ_TIMEOUT_S)) as r:
                if r.status >= 400:
                    raise AttachmentUnavailable(f"wecom ai bot file: HTTP {r.status} (links expire after a while)")
                if r.content_length is not None and r.content_length > max_bytes + 32:
                    raise too_large(max_bytes, r.content_length)
                async for chunk in r.content.iter_chunked(CHUNK):
                    read += len(chunk)
                    if read > max_bytes + 32:  # at most one padding block over the content
                        raise too_large(max_bytes)
                    plain += unpadder.update(decryptor.update(chunk))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AttachmentUnavailable(f"wecom ai bot file: the download failed ({type(exc).__name__})") from None
        try:
            plain += unpadder.update(decryptor.finalize()) + unpadder.finalize()
        except ValueError:
            raise AttachmentUnavailable("wecom ai bot file: it does not decrypt (wrong key or not encrypted)") from None
        if len(plain) > max_bytes:
            raise too_large(max_bytes)
        return bytes(plain)
