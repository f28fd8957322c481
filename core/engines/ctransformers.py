"""The ctransformers engine (``[model] engine = "ctransformers"``, ``pip install 'botd[ctransformers]'``):
the old GGML ``.bin`` models that llama.cpp no longer reads (gpt2, gptj, gpt_neox, falcon, llama
GGML, mpt, starcoder, ...), one conversation at a time, on the CPU.

It owns loading such a file (``model.model_type`` names its architecture), a plain ChatML
prompt (GGML files carry no chat template), token-by-token generation with stops and
``max_tokens``, and counting prompt tokens with the same vocabulary. ctransformers cannot read
current GGUF files, so a GGUF path is refused with a pointer to ``engine = "llama_cpp"``; a
missing or unusable ctransformers is an :class:`EngineError` saying how to install it.
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from core.engines.base import (
    Chunk,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    PromptTokenizer,
    PromptTooLong,
    hand_over,
)
from core.engines.special_tokens import defuse
from core.toolcalls import plain_messages

log = structlog.get_logger("botd.engine")

INSTALL_HINT = ("pip install 'botd[ctransformers]' (in a checkout: .venv/bin/pip install -e '.[ctransformers]'); "
                "ctransformers 0.2.27 ships prebuilt libraries for x86-64 Linux, macOS and Windows")
# ChatML: GGML files carry no template, and the chat models of that era that had one mostly used it.
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"


def render_chatml(messages: Sequence[dict[str, str]]) -> str:
    # The template and the contents become one text that is tokenized whole: a marker written in a
    # user's words or a document would be read as the template's own, so contents are defused.
    turns = "".join(f"{_IM_START}{m['role']}\n{defuse(str(m.get('content') or ''))}{_IM_END}\n"
                    for m in messages)
    return f"{turns}{_IM_START}assistant\n"


def _cpu_lib() -> str | None:
    """ctransformers' build for this CPU, read from /proc/cpuinfo: ctransformers' own detection
    starts a subprocess (py-cpuinfo) and takes about a second."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags and "f16c" in flags:
        return "avx"
    return "basic" if flags else None


class _Reply(Generation):
    def __init__(self, request: GenerationRequest, should_stop: Callable[[], bool], prompt: list[int],
                 max_tokens: int) -> None:
        super().__init__()
        self.request = request
        self.should_stop = should_stop
        self.prompt = prompt  # tokens still to read (the part not already in the model's context)
        self.prompt_tokens = 0
        self.max_tokens = max_tokens
        self.stops = [*request.stop, _IM_END]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.produced = 0
        self.next_token: int | None = None


class CTransformersTokenizer(PromptTokenizer):
    """Counts with the engine's own model once it has loaded (GGML files have no separate vocabulary)."""

    def __init__(self, engine: CTransformersEngine) -> None:
        self.engine = engine

    def count_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> int:
        messages = plain_messages(messages, tools) if tools else messages
        return len(self.engine.tokenize(render_chatml(messages)))


class CTransformersEngine(Engine):
    """One GGML model through ctransformers; ``parallel`` is 1 (it has one context)."""

    name = "ctransformers"
    parallel = 1

    def __init__(self, path: Path, model_type: str, *, n_ctx: int = 2048, n_threads: int = 2, n_batch: int = 8,
                 seed: int = -1) -> None:
        self.path = Path(path)
        self.model_type = model_type
        self._n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_batch = n_batch
        self.seed = seed
        self._llm: Any = None
        # One lock over the model: the worker's eval/sample and another thread's tokenize.
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: str | None = None
        self._active: _Reply | None = None

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def load(self) -> None:
        try:
            self._llm = self._open_model()
        except EngineError as exc:
            self._load_error = str(exc)
            raise
        finally:
            self._loaded.set()
        if self._llm.context_length < self._n_ctx:
            log.warning("the model's context is smaller than model.n_ctx; prompts beyond it are refused",
                        n_ctx=self._n_ctx, context_length=self._llm.context_length)
        log.info("model loaded", engine="ctransformers", model=self.path.name, model_type=self.model_type,
                 n_ctx=self._n_ctx, n_threads=self.n_threads, context_length=self._llm.context_length)

    def _open_model(self) -> Any:
        try:
            with self.path.open("rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise EngineError(f"cannot read {str(self.path)!r}: {exc.strerror}") from None
        if magic == b"GGUF":
            raise EngineError(f"{str(self.path)!r} is a GGUF file, which ctransformers cannot load; "
                              'use engine = "llama_cpp" for GGUF files')
        try:
            from ctransformers import Config
            from ctransformers.llm import LLM
        except ImportError as exc:
            raise EngineError(f'engine = "ctransformers" needs the optional extra: {INSTALL_HINT} ({exc})') from None
        self._probe()
        config = Config(context_length=self._n_ctx, threads=self.n_threads, batch_size=self.n_batch,
                        seed=self.seed, gpu_layers=0)
        try:
            return LLM(str(self.path), self.model_type, config=config, lib=_cpu_lib())
        except OSError as exc:  # no prebuilt library for this platform, or it cannot be loaded
            raise EngineError(f"ctransformers cannot run on this machine ({exc}); {INSTALL_HINT}") from None
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"ctransformers cannot load {str(self.path)!r} as a {self.model_type!r} GGML model "
                              f"(check model.model_type): {exc}") from None

    def _probe(self) -> None:
        """Load the file once in a child process first: given the wrong ``model_type`` (or a
        damaged file), ctransformers' C++ code may abort or crash the process that loads it
        (measured: a GPT-2 file loaded as "mpt" dies of std::bad_alloc), and that must not be
        the daemon. Costs one extra load at start."""
        import subprocess
        import sys

        # A wrong type can also read a size from the wrong place and ask for hundreds of GB (measured:
        # "gpt_neox" on a GPT-2 file was killed by the kernel's OOM killer): the child's address
        # space is capped at twice the file plus 8 GiB, so such a load fails at once instead.
        limit = 2 * self.path.stat().st_size + (8 << 30)
        code = ("import resource, sys\n"
                "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[5]), int(sys.argv[5])))\n"
                "from ctransformers import Config\nfrom ctransformers.llm import LLM\n"
                "LLM(sys.argv[1], sys.argv[2], config=Config(context_length=int(sys.argv[3]), threads=1),"
                " lib=sys.argv[4] or None)\n")
        try:
            done = subprocess.run([sys.executable, "-c", code, str(self.path), self.model_type, str(self._n_ctx),
                                   _cpu_lib() or "", str(limit)], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise EngineError(f"ctransformers took over 600 s to load {str(self.path)!r}") from None
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {done.returncode}"
            if done.returncode < 0:
                why = f"it crashed (signal {-done.returncode}); {why}"
            raise EngineError(f"ctransformers cannot load {str(self.path)!r} as a {self.model_type!r} GGML model "
                              f"(check model.model_type): {why[:300]}")

    def close(self) -> None:
        self._llm = None  # ctransformers frees the model when the object goes

    def tokenizer(self) -> CTransformersTokenizer:
        return CTransformersTokenizer(self)

    def tokenize(self, text: str) -> list[int]:
        # The runtime asks for the tokenizer while the worker is still loading the model.
        if not self._loaded.wait(600) or self._llm is None:
            raise EngineError(self._load_error or "the model is not loaded")
        with self._lock:
            return list(self._llm.tokenize(text))

    # -- generation -------------------------------------------------------------------------------

    def open(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> _Reply:
        if self._llm is None:
            raise EngineError("the model is not loaded")
        if self._active is not None:
            raise EngineError("no free slot (ctransformers runs one conversation at a time)")
        messages = plain_messages(request.messages, request.tools) if request.tools else request.messages
        tokens = self.tokenize(render_chatml(messages))
        room = min(self._n_ctx, self._llm.context_length) - len(tokens)
        if room < 1:
            raise PromptTooLong(f"the prompt has {len(tokens)} tokens; the context holds {self._n_ctx}")
        with self._lock:
            # Drops what the model's context holds beyond the common prefix (a thread's next turn
            # reads only its new part).
            rest = list(self._llm.prepare_inputs_for_generation(tokens))
        reply = _Reply(request, should_stop, rest, min(request.max_tokens, room))
        reply.prompt_tokens = len(tokens)
        reply.cached_tokens = len(tokens) - len(rest)
        self._active = reply
        return reply

    def step(self, generations: Sequence[Generation]) -> None:
        for gen in generations:
            assert isinstance(gen, _Reply)
            if gen.done:
                continue
            if gen.should_stop():
                self._finish(gen, "cancelled")
                continue
            try:
                self._advance(gen)
            except RuntimeError as exc:
                log.error("ctransformers failed; the reply ends with an error", error=str(exc))
                gen.failed = True
                self._finish(gen, "error", f"generation failed: {exc}")

    def _advance(self, gen: _Reply) -> None:
        r = gen.request
        with self._lock:
            if gen.prompt:  # the prompt, n_batch tokens a step, so that a cancel is seen between them
                batch, gen.prompt = gen.prompt[: self.n_batch], gen.prompt[self.n_batch :]
                self._llm.eval(batch)
                if gen.prompt:
                    return
            elif gen.next_token is not None:
                self._llm.eval([gen.next_token])
            token = self._llm.sample(top_p=r.top_p, temperature=r.temperature, repetition_penalty=r.repeat_penalty,
                                     seed=r.seed if r.seed >= 0 else self.seed)
            if self._llm.is_eos_token(token):
                self._finish(gen, "stop")
                return
            piece = self._llm.detokenize([token], decode=False)
        gen.produced += 1
        text, gen.pending, stopped = hand_over(gen.pending + gen.decoder.decode(piece), gen.stops)
        if text:
            gen.out.append(Chunk(text))
        if stopped:
            self._finish(gen, "stop")
            return
        if gen.produced >= gen.max_tokens:
            self._finish(gen, "length")
            return
        gen.next_token = token

    def _finish(self, gen: _Reply, reason: str, error: str | None = None) -> None:
        text = "" if reason == "error" else gen.pending
        gen.out.append(Chunk(text, reason, gen.prompt_tokens, gen.produced, cached_tokens=gen.cached_tokens,
                             error=error))
        gen.pending = ""
        gen.done = True
        self.release(gen)

    def release(self, generation: Generation) -> None:
        if self._active is generation:
            self._active = None
        if generation.failed and self._llm is not None:
            with self._lock:
                self._llm._context.clear()  # unknown state after a failed eval: read the next prompt whole

    def state(self) -> dict[str, Any]:
        return {"slots": 1, "active_sequences": int(self._active is not None)}
