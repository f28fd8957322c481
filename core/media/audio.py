"""A voice message's bytes as 16 kHz mono samples, decoded with libraries (no external tool).

The platforms' formats: Telegram voice notes and Feishu audio are OGG/Opus, WeCom app voice is
AMR-NB, Slack audio clips are MP4/AAC, WebM/Opus or MP3 (what the recording browser or phone
made), WeChat-family SILK v3 (``#!SILK_V3``) where a platform hands that over. PyAV (FFmpeg's
libraries inside its wheel) demuxes and decodes everything but SILK; SILK is decoded by the
``silk-python`` wheel (Skype's SILK SDK). Both come with the optional extra ``botd[voice]``.

Bounds: only the containers listed in :data:`CONTAINERS` are decoded; the duration the container
declares is checked first, then samples are counted while decoding and the decoder stops at
``max_duration_s`` (a file that lies about its length is cut off, not read to the end).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from core.errors import BotdError

SAMPLE_RATE = 16_000
SILK_MAGIC = b"#!SILK_V3"
# FFmpeg demuxer names (as PyAV reports them) of the formats the platforms send.
CONTAINERS = frozenset({"ogg", "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2", "mp3", "wav", "amr", "aac", "flac"})


class AudioRefused(BotdError):
    """Audio that is not transcribed: ``reason`` "format", "too_long" or "unreadable"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_silk(data: bytes) -> bool:
    # Tencent's files put one byte (0x02) before the SDK's header.
    return data[:9] == SILK_MAGIC or data[1:10] == SILK_MAGIC


def decode(data: bytes, max_duration_s: float) -> np.ndarray:
    """Mono float32 samples at 16 kHz (AudioRefused)."""
    if is_silk(data):
        return _decode_silk(data, max_duration_s)
    return _decode_av(data, max_duration_s)


def _decode_silk(data: bytes, max_duration_s: float) -> np.ndarray:
    try:
        import pysilk
    except ImportError:
        raise AudioRefused("format", "SILK needs the silk-python package (botd[voice])") from None
    src = data[1:] if data[:1] == b"\x02" else data
    out = io.BytesIO()
    try:
        pysilk.decode(io.BytesIO(src), out, SAMPLE_RATE)
    except Exception as exc:  # pysilk.SilkError and the C decoder's other complaints
        raise AudioRefused("unreadable", f"SILK: {type(exc).__name__}: {exc}") from None
    pcm = np.frombuffer(out.getvalue(), dtype="<i2")
    if len(pcm) > max_duration_s * SAMPLE_RATE:
        raise AudioRefused("too_long", f"{len(pcm) / SAMPLE_RATE:.0f} s")
    return (pcm.astype(np.float32) / 32768.0).copy()


def _decode_av(data: bytes, max_duration_s: float) -> np.ndarray:
    try:
        import av
    except ImportError:
        raise AudioRefused("format", "decoding audio needs PyAV (botd[voice])") from None
    limit = int(max_duration_s * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.format.name not in CONTAINERS:
                raise AudioRefused("format", container.format.name)
            if not container.streams.audio:
                raise AudioRefused("unreadable", "no audio stream")
            if container.duration is not None and container.duration / 1_000_000 > max_duration_s + 1:
                raise AudioRefused("too_long", f"{container.duration / 1_000_000:.0f} s")
            stream = container.streams.audio[0]
            resampler: Any = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    total += len(samples)
                    if total > limit:
                        raise AudioRefused("too_long", f"over {max_duration_s:g} s")
                    parts.append(samples)
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except AudioRefused:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, EOFError) as exc:
        raise AudioRefused("unreadable", f"{type(exc).__name__}: {exc}") from None
    if not parts:
        raise AudioRefused("unreadable", "no samples")
    return np.concatenate(parts).astype(np.float32)[:limit]
