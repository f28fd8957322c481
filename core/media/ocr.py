"""The text in a picture (a screenshot of an error, a photographed notice): OCR on the CPU.

Engine: RapidOCR 3.x (PyPI ``rapidocr``) on onnxruntime, with the PP-OCR Chinese/English
detection and recognition models that ship inside its wheel. They are named by path, so the
library's download code (which fetches a model that is missing) is never reached; onnxruntime's
telemetry is switched off before it loads (``ORT_DISABLE_TELEMETRY``: without it onnxruntime
1.31 resolved a Microsoft telemetry host every few seconds; seen with strace). Chosen over
``rapidocr-onnxruntime`` 1.4.4 (PP-OCRv4, the same accuracy and speed on the generated
screenshots: ``bench/bench_ocr.py``) because that one needs the GUI build of OpenCV, which
fails to import on a server without libGL, and is no longer maintained.

Bounds, all checked before the model sees a pixel: the picture's format (PNG, JPEG, WebP,
GIF's first frame, BMP), its pixel count from its header (``max_pixels``; a decompression bomb
is refused before it is decoded), then the picture is scaled down to ``work_pixels`` (the
detector's cost grows with the pixels, the text stays readable down to about 8 px high), at
most ``max_lines`` text boxes are recognised, and the caller stops waiting after ``timeout_s``.
Reading runs in one thread of lowest CPU priority (:mod:`core.lowprio`): the chat model
preempts it.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from core.errors import BotdError
from core.lowprio import IdleWorker

log = structlog.get_logger("botd.media")

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "MPO"})


class PictureRefused(BotdError):
    """A picture that is not read: ``reason`` is "format", "too_large", "unreadable" or "timeout"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class OcrUnavailable(BotdError):
    """The OCR engine cannot be loaded (its package is missing or broken)."""


@dataclass(frozen=True, slots=True)
class OcrLimits:
    max_pixels: int = 40_000_000
    work_pixels: int = 3_000_000
    max_lines: int = 300
    timeout_s: float = 60.0
    threads: int = 2


@dataclass(frozen=True, slots=True)
class OcrResult:
    text: str  # the lines read, top to bottom, one per line
    lines: int
    seconds: float  # the model's time, in its thread


def load_picture(data: bytes, limits: OcrLimits) -> np.ndarray:
    """The picture as an RGB array, scaled down to ``limits.work_pixels`` (PictureRefused)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            if opened.format not in FORMATS:
                raise PictureRefused("format", str(opened.format))
            img: Image.Image = opened
            w, h = img.size
            if w * h > limits.max_pixels:
                raise PictureRefused("too_large", f"{w}x{h}")
            scale = min(1.0, math.sqrt(limits.work_pixels / max(1, w * h)))
            if opened.format == "JPEG" and scale < 0.5:
                # Decode a JPEG at 1/2, 1/4 or 1/8 of its size: less memory and time.
                opened.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
            opened.seek(0)
            if img.mode in ("RGBA", "LA", "P", "PA"):
                base = Image.new("RGB", img.size, (255, 255, 255))
                rgba = img.convert("RGBA")
                base.paste(rgba, mask=rgba.getchannel("A"))
                img = base
            else:
                img = img.convert("RGB")
            if img.width * img.height > limits.work_pixels:
                s = math.sqrt(limits.work_pixels / (img.width * img.height))
                img = img.resize((max(1, int(img.width * s)), max(1, int(img.height * s))), Image.Resampling.LANCZOS)
            return np.asarray(img)
    except PictureRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PictureRefused("too_large", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise PictureRefused("unreadable", f"{type(exc).__name__}: {exc}") from None


def join_lines(boxes: Any, txts: Any) -> tuple[str, int]:
    """Boxes read on one row joined by a space, rows top to bottom; the text and its row count."""
    items = []
    for box, txt in zip(boxes if boxes is not None else (), txts or (), strict=False):
        t = str(txt).strip()
        if not t:
            continue
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        items.append(((min(ys) + max(ys)) / 2, max(1.0, max(ys) - min(ys)), min(xs), t))
    items.sort(key=lambda i: (i[0], i[2]))
    rows: list[list[tuple[float, float, float, str]]] = []
    for it in items:
        if rows and abs(it[0] - rows[-1][0][0]) < 0.5 * min(it[1], rows[-1][0][1]):
            rows[-1].append(it)
        else:
            rows.append([it])
    return "\n".join(" ".join(i[3] for i in sorted(r, key=lambda i: i[2])) for r in rows), len(rows)


def _model_files() -> dict[str, Path]:
    import rapidocr

    models = Path(rapidocr.__file__).parent / "models"
    found = {"det": sorted(models.glob("*det*.onnx")), "rec": sorted(models.glob("*rec*.onnx")),
             "cls": sorted(models.glob("*cls*.onnx"))}
    missing = [k for k, v in found.items() if not v]
    if missing:
        raise OcrUnavailable(f"the rapidocr package in {models.parent} has no {', '.join(missing)} model")
    return {k: v[0] for k, v in found.items()}


class Ocr:
    """One OCR engine for the process, loaded at its first picture, in its own idle thread."""

    def __init__(self, limits: OcrLimits | None = None) -> None:
        self.limits = limits or OcrLimits()
        self._worker = IdleWorker("ocr")
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._engine is None:
                # Read by onnxruntime when it starts its environment: set before it is imported.
                os.environ["ORT_DISABLE_TELEMETRY"] = "1"
                try:
                    from rapidocr import RapidOCR
                except ImportError as exc:
                    raise OcrUnavailable(f"rapidocr is not installed: {exc}") from None
                files = _model_files()
                ort = "EngineConfig.onnxruntime."
                params: dict[str, Any] = {
                    "Global.log_level": "error",  # "no text found" is not a warning here
                    # Screenshots are upright: the orientation classifier only costs time.
                    "Global.use_cls": False,
                    # Pictures arrive scaled to work_pixels (load_picture): no second resize.
                    "Global.max_side_len": 100_000,
                    "Det.limit_type": "max",
                    "Det.limit_side_len": 100_000,
                    "Det.max_candidates": self.limits.max_lines,
                    "Det.model_path": str(files["det"]),
                    "Rec.model_path": str(files["rec"]),
                    "Cls.model_path": str(files["cls"]),
                    ort + "intra_op_num_threads": self.limits.threads,
                    ort + "inter_op_num_threads": 1,
                }
                started = time.monotonic()
                self._engine = RapidOCR(params=params)
                log.info("ocr engine loaded", seconds=round(time.monotonic() - started, 2), det=files["det"].name,
                         rec=files["rec"].name)
            return self._engine

    def read_now(self, data: bytes, limits: OcrLimits | None = None) -> OcrResult:
        """Read ``data`` in the calling thread (the worker's, or a benchmark's)."""
        limits = limits or self.limits
        img = load_picture(data, limits)
        engine = self._load()
        started = time.monotonic()
        try:
            out = engine(img)
        except Exception as exc:  # the library's own errors have no common type
            raise PictureRefused("unreadable", f"{type(exc).__name__}: {exc}") from None
        text, rows = join_lines(getattr(out, "boxes", None), getattr(out, "txts", None))
        return OcrResult(text, rows, time.monotonic() - started)

    async def read(self, data: bytes, limits: OcrLimits | None = None) -> OcrResult:
        """Read ``data`` in the idle thread; PictureRefused("timeout") past the time limit."""
        limits = limits or self.limits
        try:
            return await self._worker.run(lambda: self.read_now(data, limits), limits.timeout_s)
        except TimeoutError:
            raise PictureRefused("timeout", f"{limits.timeout_s:g} s") from None

    def close(self) -> None:
        self._worker.close()


_shared: Ocr | None = None
_shared_lock = threading.Lock()


def shared_ocr(limits: OcrLimits | None = None) -> Ocr:
    """The process's OCR engine (its models are loaded once, at the first picture, with the
    threads and line limit of ``limits`` then; a changed [images] threads takes a restart)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Ocr(limits)
        return _shared
