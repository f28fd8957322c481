"""The engine interface: what the inference worker needs from a model backend.

An engine is created on the asyncio side but loaded, used and closed only on the
worker thread that owns it. A :class:`PromptTokenizer` is a separate, lighter
object for counting prompt tokens off that thread (history trimming).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import BotdError
from core.messages import ThreadKey


class EngineError(BotdError, RuntimeError):
    """The engine could not load its model or run a request."""


class PromptTooLong(EngineError):
    """The prompt leaves no room for a reply in the context window."""


class TemplateError(BotdError, ValueError):
    """The model's chat template cannot render these messages (e.g. roles that do not alternate)."""


@dataclass(slots=True)
class GenerationRequest:
    # Every job carries its thread down to the engine, so that an engine can keep a
    # thread's KV state between turns or batch several threads together.
    thread_key: ThreadKey
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    seed: int = -1
    stop: Sequence[str] = field(default_factory=tuple)
    # OpenAI-format tool definitions the prompt offers (core/toolcalls.py); None: no tools.
    tools: list[dict[str, Any]] | None = None
    # GBNF the reply must follow (a tool call's shape); ``grammar_lazy``: only from the first
    # "<tool_call>" on, so the model may also answer in prose.
    grammar: str | None = None
    grammar_lazy: bool = False
    # LoRA adapters applied to this request only, as ((GGUF path, scale), ...): its bot's.
    adapters: tuple[tuple[str, float], ...] = ()


@dataclass(slots=True)
class Chunk:
    """Text produced since the previous chunk; the last chunk has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens whose KV state was already there (the thread's earlier turns, a shared prefix).
    cached_tokens: int = 0
    error: str | None = None


class Generation:
    """One reply under way in an engine: :meth:`Engine.step` appends chunks to ``out``."""

    def __init__(self) -> None:
        self.out: list[Chunk] = []
        self.done = False
        self.failed = False
        self.cached_tokens = 0


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine loaded (read from the event loop: plain numbers, no lock needed)."""

    steps: int = 0
    batch_tokens: int = 0
    last_batch: int = 0
    prompt_tokens_read: int = 0
    prompt_tokens_reused: int = 0
    # Read while idle, before the prompt that needs them came (LlamaCppEngine.read_ahead).
    prompt_tokens_ahead: int = 0
    cache_restores: int = 0
    # Micro-batches llama.cpp cut the steps into (each one a pass over the weights; see
    # core/engines/batching.py): in all, in the last step, and steps by their count
    # (index n: steps of n micro-batches; the last index: that many or more).
    micro_batches: int = 0
    last_micro_batches: int = 0
    steps_by_micro_batches: list[int] = field(default_factory=lambda: [0] * 9)
    # KV states moved from one slot to another to keep a step's sequence ids consecutive.
    slot_moves: int = 0
    # Bots' shared prefixes (the state of a system turn) saved, and copied into new threads' slots.
    shared_prefixes_saved: int = 0
    shared_prefix_copies: int = 0
    # Drafting from the prompt (core/engines/drafting.py): steps that carried guessed tokens, the
    # tokens guessed, and those accepted (each one a step saved).
    draft_steps: int = 0
    draft_tokens: int = 0
    draft_accepted: int = 0

    def count_step(self, micro_batches: int) -> None:
        self.micro_batches += micro_batches
        self.last_micro_batches = micro_batches
        self.steps_by_micro_batches[min(micro_batches, len(self.steps_by_micro_batches) - 1)] += 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromptTokenizer(ABC):
    """Counts the tokens of a chat prompt exactly as the engine will see it."""

    @abstractmethod
    def count_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> int:
        """Tokens of ``messages`` (and ``tools``' definitions) rendered with the model's chat
        template, generation prompt added."""


class Engine(ABC):
    """A model backend. :meth:`open` starts a reply, :meth:`step` advances every open reply by
    one decode step (a batching engine decodes them together), up to ``parallel`` at once."""

    name: str = "engine"
    parallel: int = 1

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
    def open(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> Generation:
        """Start a reply (raises :class:`PromptTooLong` / :class:`TemplateError` at once)."""

    @abstractmethod
    def step(self, generations: Sequence[Generation]) -> None:
        """Advance each unfinished generation by one step; checks ``should_stop`` (then it ends
        with finish "cancelled"); a finished one has its last chunk (``finish_reason``) in ``out``."""

    @abstractmethod
    def release(self, generation: Generation) -> None:
        """Give up an unfinished generation (its slot is free again)."""

    def state(self) -> dict[str, Any]:
        """Figures for /healthz and /metrics."""
        return {}

    def read_ahead(self) -> bool:
        """Work worth doing while no generation runs and no job waits (the worker asks between
        jobs, one piece at a time); returns whether there was some."""
        return False

    def generate(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> Iterator[Chunk]:
        """One reply on its own, chunk by chunk."""
        gen = self.open(request, should_stop)
        try:
            while not gen.done:
                self.step([gen])
                while gen.out:
                    yield gen.out.pop(0)
        finally:
            if not gen.done:
                gen.done = True
                self.release(gen)

    def memory_estimate(self) -> int:
        """Bytes of RAM the loaded model will take (0: none to check, e.g. a remote engine).
        Called before :meth:`load`, off the event loop."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model. Called on the worker thread."""


def hand_over(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split the text decoded so far into (what the client may see now, what is kept back,
    whether a stop string was reached). Kept back: a tail that could still grow into a stop
    string; at a stop string, the text before it (the reply's last words, never the stop)."""
    cut = _find_stop(pending, stops)
    if cut is not None:
        return "", pending[:cut], True
    keep = _stop_prefix_len(pending, stops)
    n = len(pending) - keep
    return pending[:n], pending[n:], False


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
