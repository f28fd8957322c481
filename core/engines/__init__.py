"""Inference engines behind one small interface; ``create_engine`` picks one by config name.

Each engine's module is imported only when it is chosen, so that an engine's library (llama-cpp-python,
aiohttp's client, ctransformers) is needed only by the deployments that use it.
"""

from __future__ import annotations

from core.engines.base import Chunk, Engine, EngineError, GenerationRequest, PromptTokenizer, PromptTooLong
from core.engines.config import ModelConfig

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
            n_gpu_layers=cfg.n_gpu_layers,
            main_gpu=cfg.main_gpu,
            flash_attn=cfg.flash_attn_setting(),
            step_budget_ms=cfg.step_budget_ms,
            draft_tokens=cfg.draft_tokens,
        )
    if cfg.engine == "openai":
        from core.engines.openai import RemoteEngine
        from core.secrets import SecretError, resolve_secret

        try:
            key = resolve_secret(cfg.api_key) if cfg.api_key else None
        except SecretError as exc:
            raise EngineError(f"model.api_key: {exc}") from None
        return RemoteEngine(
            cfg.base_url,
            api_key=key,
            model=cfg.model,
            n_ctx=cfg.n_ctx,
            timeout_s=cfg.timeout_s,
            max_concurrent=cfg.max_concurrent,
            tokenizer_path=cfg.tokenizer_path,
        )
    if cfg.engine == "ctransformers":
        from core.engines.ctransformers import CTransformersEngine

        return CTransformersEngine(cfg.resolved_path(), cfg.model_type, n_ctx=cfg.n_ctx,
                                   n_threads=cfg.resolved_threads(), n_batch=cfg.n_batch, seed=cfg.seed)
    raise EngineError(f"unknown engine {cfg.engine!r}")
