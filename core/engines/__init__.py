"""Inference engines behind one small interface; ``create_engine`` picks one by config name."""

from __future__ import annotations

from core.config import ModelConfig
from core.engines.base import Chunk, Engine, EngineError, GenerationRequest, PromptTokenizer, PromptTooLong

__all__ = ["Chunk", "Engine", "EngineError", "GenerationRequest", "PromptTokenizer", "PromptTooLong", "create_engine"]


def create_engine(cfg: ModelConfig) -> Engine:
    if cfg.engine == "llama_cpp":
        from core.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            cfg.resolved_path(),
            n_ctx=cfg.n_ctx,
            n_threads=cfg.resolved_threads(),
            n_batch=cfg.n_batch,
            seed=cfg.seed,
            parallel=cfg.parallel,
            cache_mb=cfg.cache_mb,
        )
    raise EngineError(f"unknown engine {cfg.engine!r}")
