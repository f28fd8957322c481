"""The [model] key only engine = "ctransformers" reads (old GGML .bin files; optional extra),
and its checks of the file it is given."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from core.section import KeyProblem, Section

# Model types ctransformers can load from GGML .bin files (its `model_type` argument).
CTRANSFORMERS_TYPES = ("gpt2", "gptj", "gpt_neox", "falcon", "llama", "mpt", "starcoder", "gpt_bigcode", "dolly-v2",
                       "replit")


def is_gguf(path: str) -> bool:
    """Whether ``path`` (when absolute: relative ones are resolved later) starts like a GGUF file."""
    file = Path(path).expanduser()
    if not file.is_absolute():
        return False
    try:
        with file.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


class CTransformersSettings(Section):
    """Old GGML .bin files through ctransformers."""

    ENGINE: ClassVar[str] = "ctransformers"

    model_type: Literal["", *CTRANSFORMERS_TYPES] = Field(  # type: ignore[valid-type]
        default="",
        description=f"ctransformers: the GGML file's architecture: one of {', '.join(CTRANSFORMERS_TYPES)}.",
        json_schema_extra={"zh": f"ctransformers：GGML 文件的架构，取值之一：{', '.join(CTRANSFORMERS_TYPES)}。"})

    def check_chosen(self, path: str) -> None:
        """With engine = "ctransformers": a GGML file (not GGUF) and its architecture are named."""
        if not path:
            raise KeyProblem("model.path", 'engine = "ctransformers" needs a GGML .bin file (the embedded '
                             'model is GGUF: engine = "llama_cpp")')
        if is_gguf(path):
            raise KeyProblem("model.path", f"{path!r} is a GGUF file, which ctransformers cannot load; "
                             'use engine = "llama_cpp" for GGUF files')
        if not self.model_type:
            raise KeyProblem("model.model_type", f"engine = \"ctransformers\" needs the file's architecture: "
                             f"one of {', '.join(CTRANSFORMERS_TYPES)}")
