"""The content parts of an OpenAI-style chat message: text, and what is sent with it.

``{"type": "text", "text"}``; a picture ``{"type": "image_url", "image_url": {"url":
"data:image/png;base64,…"}}``; a document ``{"type": "file", "file": {"filename", "file_data":
"data:application/pdf;base64,…"}}``; a sound ``{"type": "input_audio", "input_audio": {"data":
"<base64>", "format": "wav"}}``. The bytes come inline (a ``data:`` URL or base64), bounded by
``[server] max_body_bytes``: botd never fetches a URL a caller names (no requests to other hosts
on a caller's behalf), and it keeps no uploaded file ids. The last user message's parts become
the message's :class:`~core.messages.Attachment` list; its download serves their bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from connectors.download import kind_of, mime_of, too_large
from connectors.reply import AttachmentUnavailable
from core.messages import Attachment

# At most this many pictures, files and sounds with one message.
MAX_PARTS = 5
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[\w.-]+)*;base64,", re.ASCII)
_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg", "opus": "audio/ogg",
               "flac": "audio/flac", "m4a": "audio/mp4", "webm": "audio/webm", "amr": "audio/amr"}

Download = Callable[[Attachment, int], Awaitable[bytes]]


class PartRefused(ValueError):
    """A part that cannot be taken: the message says why (for the caller's 400)."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: _ImageUrl


class _FileData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    filename: Annotated[str, Field(max_length=255)] = ""
    file_data: str = ""
    file_id: str | None = None


class FilePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["file"]
    file: _FileData


class _Audio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: str
    format: Annotated[str, Field(pattern=r"^[a-z0-9]{1,10}$")]


class AudioPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_audio"]
    input_audio: _Audio


ContentPart = Annotated[TextPart | ImagePart | FilePart | AudioPart, Field(discriminator="type")]


def _decode(data: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise PartRefused(f"{what}: not valid base64") from None
    if not raw:
        raise PartRefused(f"{what}: empty")
    return raw


def _data_url(url: str, what: str) -> tuple[str, bytes]:
    m = _DATA_URL.match(url)
    if m is None:
        raise PartRefused(f"{what}: send the content inline as a data: URL with base64 (botd fetches no URLs)")
    return (m.group(1) or "").lower(), _decode(url[m.end():], what)


def attachments_of(parts: Sequence[object]) -> tuple[list[Attachment], Download]:
    """The pictures, files and sounds among ``parts``, and the download that serves their bytes.
    Raises :class:`PartRefused` for a part botd cannot take."""
    found: list[Attachment] = []
    blobs: list[bytes] = []
    for part in parts:
        i = len(blobs)
        if isinstance(part, ImagePart):
            mime, raw = _data_url(part.image_url.url, "image_url")
            att = Attachment("image", mime=mime or "image/png", size=len(raw), ref={"part": i})
        elif isinstance(part, FilePart):
            if part.file.file_id and not part.file.file_data:
                raise PartRefused("file: botd keeps no uploaded files; send file_data (a data: URL)")
            mime, raw = _data_url(part.file.file_data, "file.file_data")
            name = part.file.filename.strip()
            mime = mime if mime and mime != "application/octet-stream" else mime_of(name, mime)
            att = Attachment(kind_of(mime, name), name=name, mime=mime, size=len(raw), ref={"part": i})
        elif isinstance(part, AudioPart):
            raw = _decode(part.input_audio.data, "input_audio.data")
            fmt = part.input_audio.format
            att = Attachment("voice", mime=_AUDIO_MIME.get(fmt, f"audio/{fmt}"), size=len(raw), ref={"part": i})
        else:
            continue
        found.append(att)
        blobs.append(raw)
    if len(found) > MAX_PARTS:
        raise PartRefused(f"at most {MAX_PARTS} pictures, files and sounds with one message")

    async def download(attachment: Attachment, max_bytes: int) -> bytes:
        i = attachment.ref.get("part")
        if not isinstance(i, int) or not 0 <= i < len(blobs):
            raise AttachmentUnavailable("api: no such part in this request")
        if len(blobs[i]) > max_bytes:
            raise too_large(max_bytes, len(blobs[i]))
        return blobs[i]

    return found, download
