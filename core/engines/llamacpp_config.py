"""The [model] keys only engine = "llama_cpp" reads (GGUF files in-process), and its check that
this machine's llama-cpp-python can offload to a GPU as asked."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from core.engines.gpu import gpu_offload_problem
from core.section import KeyProblem, Section


class LlamaCppSettings(Section):
    """llama_cpp on a GPU build, and how it paces a prompt read beside streaming answers."""

    ENGINE: ClassVar[str] = "llama_cpp"

    n_gpu_layers: Annotated[int, Field(ge=-1, le=100_000)] = Field(
        default=0,
        description="llama_cpp: layers offloaded to the GPU (0: CPU only, -1: all). Needs a GPU build of "
                    "llama-cpp-python and a GPU; otherwise the start is refused, never run on the CPU unasked.",
        json_schema_extra={"zh": "llama_cpp：卸载到 GPU 的层数（0：只用 CPU，-1：全部）。需要 GPU 版的 "
                                 "llama-cpp-python 和一块 GPU；否则拒绝启动，绝不悄悄改用 CPU。"})
    main_gpu: Annotated[int, Field(ge=-1, le=255)] = Field(
        default=-1,
        description="llama_cpp: the GPU (numbered from 0) that holds the whole model; -1: spread over every GPU.",
        json_schema_extra={"zh": "llama_cpp：容纳整个模型的 GPU（从 0 编号）；-1：分布到所有 GPU。"})
    flash_attn: bool | Literal["auto"] = Field(
        default="auto",
        description='llama_cpp: flash attention: true, false or "auto" (llama.cpp decides: on, on a CPU). On a '
                    "CPU, false reads a long prompt beside running answers far sooner (small chunks deep in a "
                    "prompt cost several times less) and decodes many long threads a little faster, but reads a "
                    "prompt alone ~13 % slower and many short threads ~17 % slower (see Benchmarks).",
        json_schema_extra={"zh": 'llama_cpp：flash attention：true、false 或 "auto"（由 llama.cpp 决定：CPU 上为'
                                 "开启）。在 CPU 上设为 false 时，与正在输出的回答并行读取长提示词要快得多"
                                 "（提示词深处的小块便宜数倍），同时解码多个长会话也略快；但单独读取提示词"
                                 "约慢 13%，同时解码多个短会话约慢 17%（见“基准测试”）。"})
    step_budget_ms: Annotated[float, Field(
        ge=10, le=60_000,
        description="llama_cpp: how long one decode step may take while answers stream, in milliseconds. A new "
                    "prompt is read beside the running answers in chunks sized, from the engine's own timings, "
                    "to keep each step within this: larger, a long prompt gets its first token sooner and the "
                    "running answers pause longer between tokens; smaller, the reverse. A step still reads at "
                    "least 16 prompt tokens, so on a slow box deep in a long prompt it can take longer. While "
                    "nothing streams, prompts are read as fast as the batch allows.",
        json_schema_extra={"zh": "llama_cpp：有回答正在流式输出时，一个解码步骤最多用多少毫秒。新的提示词与正在输出的"
                                 "回答一起分块读取，块的大小由引擎按自己测得的耗时决定，使每一步不超过此值：调大，"
                                 "长提示词的第一个词元来得更早，正在输出的回答在词元之间停顿更久；调小则相反。"
                                 "每一步仍至少读取 16 个提示词词元，因此在较慢的机器上、长提示词的深处，一步可能"
                                 "超过此值。没有回答在输出时，提示词以批次允许的最快速度读取。"})] = 200.0
    draft_tokens: Annotated[int, Field(
        ge=0, le=32,
        description="llama_cpp: tokens guessed ahead from the conversation itself while one or two answers "
                    "stream (an answer that quotes its documents or repeats a name or code from the history): "
                    "the guesses are checked in the same decode step, the ones the model agrees with are kept, "
                    "so such answers come faster and no answer changes. Off by itself while more answers "
                    "stream or when guesses keep failing; 0: never guess.",
        json_schema_extra={"zh": "llama_cpp：只有一两个回答在输出时，从对话本身预先猜测的词元数（回答引用文档、"
                                 "或重复历史中的名称或编号时）：猜测在同一个解码步骤中核对，只保留模型认可的部分，"
                                 "因此这类回答更快，任何回答都不会改变。输出的回答更多或猜测总是落空时自动停用；"
                                 "0：从不猜测。"})] = 8

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if not isinstance(v, bool) and v != "auto":
            raise ValueError('use true, false or "auto"')
        return v

    def flash_attn_setting(self) -> bool | None:
        """``flash_attn`` for the engine: None lets llama.cpp decide."""
        return None if self.flash_attn == "auto" else bool(self.flash_attn)

    def check_chosen(self, path: str) -> None:
        """With engine = "llama_cpp": whether this machine's llama-cpp-python can offload as asked.
        Checked while validating, so that `botd check-config`, a start and a reload all refuse it
        in one line."""
        if self.n_gpu_layers == 0 and self.main_gpu < 0:
            return
        try:
            problem = gpu_offload_problem(self.n_gpu_layers, self.main_gpu)
        except ImportError as exc:  # llama-cpp-python itself is missing or broken
            problem = f"model.n_gpu_layers: llama-cpp-python cannot be imported ({exc})"
        if problem:
            key, _, reason = problem.partition(": ")
            raise KeyProblem(key, reason)
