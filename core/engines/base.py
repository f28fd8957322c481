"""The engine interface: what the inference worker needs from a model backend.

An engine is created on the asyncio side but loaded, used and closed only on the
worker thread that owns it. A :class:`PromptTokenizer` is a separate, lighter
object for counting prompt tokens off that thread (history trimming).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from core.messages import ThreadKey


class EngineError(RuntimeError):
    """The engine could not load its model or run a request."""


class PromptTooLong(EngineError):
    """The prompt leaves no room for a reply in the context window."""


class TemplateError(ValueError):
    """The model's chat template cannot render these messages (e.g. roles that do not alternate)."""


@dataclass(slots=True)
class GenerationRequest:
    # Every job carries its thread down to the engine, so that an engine can keep a
    # thread's KV state between turns or batch several threads together.
    thread_key: ThreadKey
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    seed: int = -1
    stop: Sequence[str] = field(default_factory=tuple)


@dataclass(slots=True)
class Chunk:
    """Text produced since the previous chunk; the last chunk has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PromptTokenizer(ABC):
    """Counts the tokens of a chat prompt exactly as the engine will see it."""

    @abstractmethod
    def count_chat(self, messages: Sequence[dict[str, str]]) -> int:
        """Tokens of ``messages`` rendered with the model's chat template (generation prompt added)."""


class Engine(ABC):
    name: str = "engine"

    @property
    @abstractmethod
    def n_ctx(self) -> int: ...

    @abstractmethod
    def load(self) -> None:
        """Load the model. Called on the worker thread."""

    @abstractmethod
    def tokenizer(self) -> PromptTokenizer:
        """A tokenizer usable from another thread than the worker's."""

    @abstractmethod
    def generate(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> Iterator[Chunk]:
        """Stream a reply. Checks ``should_stop`` between tokens and ends with finish "cancelled"."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model. Called on the worker thread."""
