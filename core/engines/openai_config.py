"""The [model] keys only engine = "openai" reads: a remote OpenAI-compatible server (vLLM,
llama-server, Ollama, another botd)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, field_validator

from core.secrets import Secret
from core.section import KeyProblem, Section


class OpenAISettings(Section):
    """A remote OpenAI-compatible server."""

    ENGINE: ClassVar[str] = "openai"

    base_url: str = Field(
        default="",
        description='openai: the server\'s API root, e.g. "http://127.0.0.1:8000/v1".',
        json_schema_extra={"zh": 'openai：服务器的 API 根地址，例如 "http://127.0.0.1:8000/v1"。'})
    api_key: Secret | None = Field(
        default=None,
        description='openai: the server\'s key, a secret reference (e.g. "env:OPENAI_API_KEY").',
        json_schema_extra={"zh": 'openai：服务器的密钥，一个秘密引用（例如 "env:OPENAI_API_KEY"）。'})
    model: Annotated[str, Field(max_length=256)] = Field(
        default="",
        description='openai: the model name the server serves; "": the first one its /models lists.',
        json_schema_extra={"zh": 'openai：服务器提供的模型名；""：取其 /models 列出的第一个。'})
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0,
        description="openai: the longest wait for the server to connect, answer or send the next piece, "
                    "in seconds.",
        json_schema_extra={"zh": "openai：等待服务器建立连接、应答或发送下一段的最长时间（秒）。"})
    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=4,
        description="openai: requests kept in flight to the server at once.",
        json_schema_extra={"zh": "openai：同时发往服务器的请求数上限。"})
    tokenizer_path: str = Field(
        default="",
        description="openai, when the server has no /tokenize: a local GGUF file of the same model, read for "
                    "its vocabulary and chat template only, to count prompt tokens. Neither: characters / 3.",
        json_schema_extra={"zh": "openai，服务器没有 /tokenize 时：同一模型的本地 GGUF 文件，只读取其词表和对话模板，"
                                 "用来计算提示词的词元数。两者都没有：按字符数 / 3 估算。"})

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError('must be an http(s) URL, e.g. "http://127.0.0.1:8000/v1"')
        return v.rstrip("/")

    def check_chosen(self, path: str) -> None:
        """With engine = "openai": the server is named, and no local model file is."""
        if not self.base_url:
            raise KeyProblem("model.base_url", 'engine = "openai" needs the server\'s API root, '
                             'e.g. "http://127.0.0.1:8000/v1"')
        if path:
            raise KeyProblem("model.path", 'engine = "openai" loads no local model; a local vocabulary for '
                             "counting tokens goes in model.tokenizer_path")
