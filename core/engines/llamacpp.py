"""The llama.cpp engine (llama-cpp-python's low-level bindings): GGUF models in this process,
several conversations decoded together, each keeping its KV state between turns.

What it owns:

- the prompt: the chat template from the GGUF file's own metadata (``tokenizer.chat_template``,
  llama-cpp-python's Jinja2 formatter), with special tokens taken only from the template, never
  from message contents (:class:`_ChatTemplate`); a vocabulary-only copy counts prompts off the
  worker thread (:class:`LlamaCppTokenizer`);
- the slots: ``[model] parallel`` sequences, each its own KV stream; a thread's next turn goes
  back to the slot holding its tokens and reads only what is new, a slot taken by another thread
  first parks its state in the :class:`~core.engines.state_cache.StateCache`, a bot's system turn
  is read once and copied into its new threads' slots, and the opening of a thread's next turn
  is read while the engine is idle (:meth:`LlamaCppEngine.read_ahead`);
- the step (:meth:`LlamaCppEngine.step`): one ``llama_decode`` for every running sequence, its
  rows in sequence-id order so that llama.cpp cuts it into the fewest passes over the weights
  (core/engines/batching.py), the next token of each answer plus a chunk of a prompt being read,
  sized so that the step keeps to ``[model] step_budget_ms`` (core/engines/step_budget.py);
  while one or two answers stream, guesses of their next tokens from their own conversation are
  checked in the same step and kept where the model agrees (core/engines/drafting.py);
- sampling on each sequence's logits row (core/engines/sampling.py), text handed over token by
  token with stop strings held back, and stops between steps (cancel, timeout) without
  disturbing the other sequences; LoRA adapters per request, one adapter set per step.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mmap
import os
import re
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from core.engines.base import (
    Chunk,
    Engine,
    EngineError,
    EngineStats,
    Generation,
    GenerationRequest,
    PromptTokenizer,
    PromptTooLong,
    TemplateError,
    hand_over,
)
from core.engines.batching import runs_of, split
from core.engines.drafting import DRAFT_TOKENS, Drafter
from core.engines.gpu import devices as _devices
from core.engines.gpu import gpu_offload_problem
from core.engines.memory import needed_bytes
from core.engines.sampling import TokenSampler
from core.engines.special_tokens import control_pattern
from core.engines.state_cache import SavedState, StateCache, common_prefix
from core.engines.step_budget import Shape, StepBudget
from core.messages import ThreadKey
from core.toolcalls import plain_messages

log = structlog.get_logger("botd.engine")

# Used only when a GGUF file carries no chat template at all.
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_log_callback: Any = None

# The file each step's rows are appended to, when set (a benchmark's hook: see LlamaCppEngine.__init__).
SCHEDULE_ENV = "BOTD_BENCH_STEP_SCHEDULE"

# n_gpu_layers = -1 ("all") is passed as this: llama.cpp caps it at the model's layer count, and
# older versions read a negative count as "none".
_ALL_LAYERS = 1_000_000
# A KV state is moved to another slot (to keep a step's sequence ids consecutive) only if the copy
# costs less than the passes over the weights it saves in this many steps.
PAYBACK_STEPS = 4
# Drafting from the prompt runs while at most this many answers stream and no prompt is being
# read: every sequence then guesses, and all rows of a step still make one pass over the weights.
# With more, the box's arithmetic is busy already and a guess would cost a pass of its own.
DRAFT_SEQS = 2
# A bot's system turn is kept as a shared prefix (copied into each new thread's slot instead of
# read again) from this many tokens on: below, reading it costs about as much as the copy.
SHARED_PREFIX_MIN = 64


def _backend_line(model: Any, n_gpu_layers: int) -> dict[str, Any]:
    """What the "llama.cpp backend" log line says: the CPU and its features, or the GPUs and how
    many of the model's layers went to them."""
    import llama_cpp

    if n_gpu_layers == 0:
        info = llama_cpp.llama_print_system_info().decode(errors="replace")
        # "CPU : SSE3 = 1 | AVX2 = 1 | ..." -> "SSE3 AVX2 ..."
        features = [p.split("=")[0].split(":")[-1].strip() for p in info.split("|") if p.strip().endswith("= 1")]
        cpu = next((d.description for d in _devices() or [] if d.kind == 0), "")
        line = {"backend": "CPU", "cpu": cpu, "cpu_features": " ".join(features)}
        if llama_cpp.llama_supports_gpu_offload():
            line["note"] = "a GPU build: llama.cpp may still send large prompt batches to the GPU"
        return line
    # Layers plus the output layer: what llama.cpp counts in "offloaded N/M layers".
    layers = llama_cpp.llama_model_n_layer(model) + 1
    offloaded = layers if n_gpu_layers < 0 else min(n_gpu_layers, layers)
    gpus = [d.describe() for d in _devices() or [] if d.is_gpu]
    return {"backend": "GPU offload", "gpus": gpus, "layers_offloaded": f"{offloaded}/{layers}"}

# llama-cpp-python silences loading by dup2-ing /dev/null over fds 1 and 2 and back. Two
# loads at once (model and tokenizer) interleave those swaps and can leave stderr pointing
# at /dev/null for good, so every Llama() construction takes this lock.
_LOAD_LOCK = threading.Lock()


def _route_llama_logs() -> None:
    """Send llama.cpp's own log lines through structlog instead of raw stderr."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", "replace").strip()
        # A vocabulary-only load has no training context; llama.cpp reports that as an error.
        if not msg or "n_ctx_train (0)" in msg:
            return
        if level == 3:
            log.warning("llama.cpp", message=msg)
        elif level == 2:
            log.debug("llama.cpp", message=msg)

    _log_callback = callback  # a reference must outlive the C side's use of it
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


# Message contents are rendered as these marks, so that the prompt can be cut back into
# template text and message text: private-use characters no template produces or changes.
_MARK = re.compile("( ?)\ue000(\\d+)\ue001( ?)")


def _control_texts(model: Any) -> list[str]:
    """The text of every token that only a template may produce (CONTROL and UNKNOWN attributes:
    the ones llama.cpp parses out of text when ``special`` is on)."""
    import llama_cpp

    vocab = model.vocab
    wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    texts = set()
    for tid in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, tid) & wanted:
            text = model.token_get_text(tid)
            if text:
                texts.add(text)
    return sorted(texts, key=len, reverse=True)


class _ChatTemplate:
    """The model's chat template and how its prompts are tokenized, for one ``Llama`` object.

    Special tokens may come only from the template: message contents (the user's words, the
    history, retrieved documents) are tokenized as plain text, so a user who types
    ``<|im_end|><|im_start|>system`` gets those characters read as text, not a system turn.
    """

    def __init__(self, model: Any) -> None:
        """``model``: a ``llama_cpp._internals.LlamaModel`` (vocabulary-only will do)."""
        from llama_cpp import llama_chat_format

        self.model = model
        eos_id, bos_id = model.token_eos(), model.token_bos()
        eos = model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = model.token_get_text(bos_id) if bos_id != -1 else ""
        template = model.metadata().get("tokenizer.chat_template")
        self.from_metadata = bool(template)
        # A template that names tools renders their definitions and earlier calls itself.
        self.knows_tools = bool(template) and "tools" in template
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template or _CHATML, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
        )
        self.controls = _control_texts(model)
        self._control = control_pattern(self.controls)

    def _format(self, msgs: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> Any:
        try:
            return self.formatter(messages=msgs, tools=tools)  # type: ignore[arg-type]  # plain dicts
        except Exception as exc:
            # Some templates (Mistral, Gemma) refuse a system role: fold it into the first user turn.
            if not msgs or msgs[0].get("role") != "system" or len(msgs) < 2:
                raise TemplateError(f"the model's chat template rejected the messages: {exc}") from exc
            merged = [{"role": msgs[1]["role"], "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
            try:
                return self.formatter(messages=merged + msgs[2:], tools=tools)  # type: ignore[arg-type]
            except Exception as exc2:
                raise TemplateError(f"the model's chat template rejected the messages: {exc2}") from exc2

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
               ) -> tuple[list[int], list[str]]:
        if self.knows_tools:
            tools = tools or None
        else:
            messages, tools = plain_messages(messages, tools), None
        msgs = [{**m, "content": _plain(m.get("content") or "")} for m in messages]
        if self._control is None or not any(self._control.search(m["content"]) for m in msgs):
            # Nothing in the contents looks like a control token: tokenizing the prompt in one
            # piece is the same as tokenizing its contents as text, and exactly what the model saw
            # in training at the seams.
            result = self._format(msgs, tools)
            tokens = self._tokenize(result.prompt, special=True, bos=not result.added_special)
        else:
            # Each content becomes a mark padded with one space each side: where the template
            # strips contents (Llama 3's ``| trim``) the padding is gone, and so is the content's.
            result = self._format([{**m, "content": f" \ue000{i}\ue001 "} for i, m in enumerate(msgs)], tools)
            pieces = _MARK.split(result.prompt)
            tokens = []
            for j in range(0, len(pieces), 4):
                # The template's own text: its special tokens are real.
                tokens += self._tokenize(pieces[j], special=True, bos=j == 0 and not result.added_special)
                if j + 3 < len(pieces):
                    left, index, right = pieces[j + 1 : j + 4]
                    content = msgs[int(index)]["content"]
                    content = content if left else content.lstrip()
                    content = content if right else content.rstrip()
                    tokens += self._tokenize(content, special=False, bos=False)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stop if s]

    def _tokenize(self, text: str, *, special: bool, bos: bool) -> list[int]:
        if not text and not bos:
            return []
        return self.model.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def next_turn_opening(self) -> list[int]:
        """The tokens that follow an answer in every next prompt, up to the user's words (ChatML:
        ``<|im_end|>``, newline, ``<|im_start|>user``, newline); [] when the template does not
        show one. Found by rendering two conversations that differ only in the next user's
        words and cutting where they part."""
        first = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            one, _ = self.render([*first, {"role": "user", "content": "c"}])
            two, _ = self.render([*first, {"role": "user", "content": "你"}])
            asked, _ = self.render(first[:1])  # ends with the generation prompt
        except TemplateError:
            return []
        answered = asked + self._tokenize("b", special=False, bos=False)
        parted = common_prefix(one, two)
        if one[: len(answered)] != answered or parted <= len(answered):
            return []
        return one[len(answered) : parted]


def _plain(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate (from a JSON escape) becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


class _Rendered:
    """Prompts the tokenizer rendered, kept by their content for the engine of the same file.

    The prompt builder renders the chosen prompt on an executor thread to count it; the engine
    would render the same messages again on the worker thread, where every millisecond holds up
    every stream (~10 ms for 2k tokens). Keyed by the file and a digest of the messages and tools
    themselves, an entry can only ever be the tokens of exactly those messages.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, bytes], tuple[list[int], list[str]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: Path, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
            ) -> tuple[str, bytes]:
        blob = json.dumps([messages, tools], ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
        return str(path), hashlib.blake2b(blob, digest_size=16).digest()

    def put(self, key: tuple[str, bytes], value: tuple[list[int], list[str]]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def take(self, key: tuple[str, bytes]) -> tuple[list[int], list[str]] | None:
        with self._lock:
            return self._items.pop(key, None)


RENDERED = _Rendered()


class LlamaCppTokenizer(PromptTokenizer):
    """A vocabulary-only copy of the model (no weights, ~0.1 s to load) for counting tokens."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        _route_llama_logs()
        self.path = Path(path)
        self._lock = threading.Lock()
        with _LOAD_LOCK:
            self._llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self._template = _ChatTemplate(self._llm._model)

    @property
    def control_texts(self) -> list[str]:
        """The texts of the vocabulary's control tokens (a remote engine defuses them in contents)."""
        return self._template.controls

    def count_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> int:
        with self._lock:
            rendered = self._template.render(messages, tools)
        # The last prompt counted is most often the one sent: the engine takes it from here.
        RENDERED.put(RENDERED.key(self.path, messages, tools), rendered)
        return len(rendered[0])


# A request's LoRA adapters: ((GGUF path, scale), ...); () for the base model alone.
Adapters = tuple[tuple[str, float], ...]


class _Slot:
    """One sequence id of the shared KV cache and the tokens whose state it holds."""

    __slots__ = ("adapters", "ahead", "busy", "owner", "seq_id", "tokens", "used_at")

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.tokens: list[int] = []
        # Tokens to read while the engine is idle: the opening of the thread's next turn.
        self.ahead: list[int] = []
        self.owner: ThreadKey | None = None
        # The LoRA adapter set the slot's KV state was computed under: reused only under the same.
        self.adapters: Adapters = ()
        self.used_at = 0.0
        self.busy = False


def _put(batch: Any, n: int, slot: _Slot, token: int, logits: bool) -> None:
    """Row ``n`` of ``batch``: ``token`` next in ``slot``'s sequence (the slot now holds it)."""
    batch.token[n] = token
    batch.pos[n] = len(slot.tokens)
    batch.n_seq_id[n] = 1
    batch.seq_id[n][0] = slot.seq_id
    batch.logits[n] = logits
    slot.tokens.append(token)


class _Seq(Generation):
    """One reply being generated in a slot: its prompt still to read, its sampler, its text."""

    def __init__(self, request: GenerationRequest, should_stop: Callable[[], bool], prompt: list[int],
                 stops: list[str], max_tokens: int, sampler: Any) -> None:
        super().__init__()
        self.request = request
        self.should_stop = should_stop
        self.prompt = prompt
        self.stops = stops
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.slot: _Slot | None = None
        self.read = 0  # prompt tokens in the slot's KV so far
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.logits_at = -1  # this step's batch row with the logits to sample from
        # A token may end inside a multi-byte character: the decoder holds those bytes back
        # until the character is whole, and a cut (max_tokens, stop) drops them unshown.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # text held back while it might still turn into a stop string
        self.produced = 0
        # Where the prompt's system turn ends, while reading has not reached it (0: reached, or
        # none): reading stops there once (see LlamaCppEngine._place). ``share_key``: the key its
        # state is saved under as the bot's shared prefix when reading gets there; (): not saved.
        self.share_at = 0
        self.share_key: tuple[Any, ...] = ()
        # Drafting (core/engines/drafting.py): the sequence's n-gram index, made when it first may
        # draft, and this step's guessed tokens, written after ``next_token`` with logits on.
        self.drafter: Drafter | None = None
        self.draft: list[int] = []

    @property
    def reading(self) -> bool:
        return self.read < len(self.prompt)


class LlamaCppEngine(Engine):
    """llama.cpp with ``parallel`` sequences, each in its own KV stream, decoded together.

    Each step is one ``llama_decode`` over a batch holding the next token of every sequence
    that is generating plus a chunk of the prompt of sequences still reading theirs (so a long
    prompt never freezes the streams already running). A slot keeps its thread's tokens after
    the answer: the thread's next turn, or any prompt starting with the same tokens, reads only
    what is new. A slot handed to another thread first parks its state in the
    :class:`~core.engines.state_cache.StateCache`. A bot's system turn is read once: its state is
    kept in the same cache and copied into the slot of each new thread of the bot (same model,
    same adapters, the same tokens), which then reads only its own turn.
    """

    name = "llama_cpp"

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int = 2,
        n_batch: int = 512,
        seed: int = -1,
        parallel: int = 1,
        cache_mb: int = 256,
        n_gpu_layers: int = 0,
        main_gpu: int = -1,
        flash_attn: bool | None = None,
        step_budget_ms: float = 200.0,
        draft_tokens: int = DRAFT_TOKENS,
    ) -> None:
        self.path = Path(path)
        # 0: CPU only; -1: every layer; N: llama.cpp puts the model's last N layers on the GPU.
        self.n_gpu_layers = n_gpu_layers
        # -1: llama.cpp spreads the layers over every GPU; N: the whole model on GPU N.
        self.main_gpu = main_gpu
        # None: llama.cpp decides (auto).
        self.flash_attn = flash_attn
        self._n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_batch = n_batch
        self.seed = seed
        self.parallel = parallel
        self.cache = StateCache(cache_mb * 1024 * 1024)
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._template: _ChatTemplate | None = None
        self._tokenizer: LlamaCppTokenizer | None = None
        self._slots: list[_Slot] = []
        # LoRA adapters loaded for this model (GGUF path -> llama_adapter_lora *), once each, and
        # the set the context applies now; a step decodes only the sequences of one set.
        self._adapters: dict[str, Any] = {}
        self._applied: Adapters = ()
        self._turn = 0
        self._can_trim = True
        self._opening: list[int] = []
        self._clock = 0.0
        self._kv_token_bytes = 0
        self._weight_bytes = 0
        self._pieces: list[bytes | None] = []
        # A bot's system turn is shared by its new threads (see _shared_part); off: each reads it itself.
        self.share_prefixes = True
        self._system_turns: OrderedDict[bytes, list[int]] = OrderedDict()
        self.stats = EngineStats()
        # How long a step may take while answers stream: sizes a new prompt's chunk beside them.
        self._budget = StepBudget(step_budget_ms / 1000)
        # The clock the steps are timed by (a test may drive the budget with a clock of its own).
        self._now: Callable[[], float] = time.perf_counter
        # The last step's rows, as their sequence ids (what llama.cpp cuts into micro-batches).
        self.last_rows: list[int] = []
        # bench/bench_concurrency.py replays the steps' rows with bare llama_decode (the box's
        # ceiling on the same mix of tokens): with this set, each step's rows are appended to
        # that file, one JSON line a step, while the file exists (the bench makes it for the
        # stretch it measures).
        self._schedule = os.environ.get(SCHEDULE_ENV) or None
        # Guess a few answers' next tokens from their prompts (see _drafts); off: one token a step.
        self.draft_tokens = draft_tokens
        self.drafting = draft_tokens > 0

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    # -- lifecycle --------------------------------------------------------------------------------

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals

        _route_llama_logs()
        problem = gpu_offload_problem(self.n_gpu_layers, self.main_gpu)
        if problem:
            raise EngineError(problem)
        try:
            with _LOAD_LOCK:
                mparams = llama_cpp.llama_model_default_params()
                mparams.n_gpu_layers = _ALL_LAYERS if self.n_gpu_layers < 0 else self.n_gpu_layers
                if self.main_gpu >= 0:
                    mparams.main_gpu = self.main_gpu
                    mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
                self._model = internals.LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
                cparams = llama_cpp.llama_context_default_params()
                # Each slot its own KV stream of n_ctx cells. One unified cache would let every token
                # attend over every slot's cells (masked): with eight threads' histories held, prompt
                # reads and decoding were ~10 % slower (measured, 0.5B-shaped model, 2 cores).
                cparams.n_ctx = self._n_ctx * self.parallel
                cparams.n_batch = cparams.n_ubatch = min(self.n_batch, self._n_ctx)
                cparams.n_seq_max = self.parallel
                cparams.kv_unified = False
                cparams.n_threads = cparams.n_threads_batch = self.n_threads
                cparams.no_perf = True
                if self.flash_attn is not None:
                    cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                               else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
                self._ctx = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
                self._batch = internals.LlamaBatch(n_tokens=cparams.n_batch, embd=0, n_seq_max=1, verbose=False)
                # Write the whole KV cache once now: its memory is taken at start, not page by page
                # as conversations grow (RSS then stays flat in use).
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), True)
        except Exception as exc:
            self.close()
            raise EngineError(f"cannot load model {str(self.path)!r}: {exc}") from exc
        self._template = _ChatTemplate(self._model)
        if not self._template.from_metadata:
            log.warning("the GGUF file has no chat template; using ChatML", model=str(self.path))
        model = self._model.model
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            # Their state cannot lose its tail: a thread whose prompt changed is read again whole.
            self._can_trim = False
            log.info("recurrent or hybrid model: a thread's state is reused only when its prompt extends it",
                     model=self.path.name)
        self._slots = [_Slot(i) for i in range(self.parallel)]
        # What a slot move copies per token (K and V, f16, every layer) and what a pass reads.
        n_head = max(1, llama_cpp.llama_model_n_head(model))
        head_dim = llama_cpp.llama_model_n_embd(model) // n_head
        self._kv_token_bytes = llama_cpp.llama_model_n_layer(model) * 2 * llama_cpp.llama_model_n_head_kv(model) \
            * head_dim * 2
        self._weight_bytes = self.path.stat().st_size
        self._pieces = [None] * self._model.n_vocab()
        self._opening = self._template.next_turn_opening() if self._can_trim else []
        log.info("llama.cpp backend", model=self.path.name, **_backend_line(model, self.n_gpu_layers))
        log.info(
            "model loaded", model=self.path.name, n_ctx=self._n_ctx, n_threads=self.n_threads,
            parallel=self.parallel, cache_mb=self.cache.max_bytes // (1024 * 1024),
            n_ctx_train=self._model.n_ctx_train(),
        )

    def tokenizer(self) -> LlamaCppTokenizer:
        if self._tokenizer is None:
            self._tokenizer = LlamaCppTokenizer(self.path)
        return self._tokenizer

    def memory_estimate(self) -> int:
        """RAM the loaded model takes, roughly: the file x 1.2 (weights and compute buffers) plus
        the KV cache (f16 K and V of every layer for n_ctx x parallel cells) plus the state cache.
        0 when layers go to a GPU (its memory is llama.cpp's to check)."""
        if self.n_gpu_layers != 0:
            return 0
        # The shape, from the GGUF metadata (the vocabulary-only copy has it; per-layer figures it has not).
        meta = self.tokenizer()._llm._model.metadata()
        return needed_bytes(meta, self.path.stat().st_size, self._n_ctx, self.parallel, self.cache.max_bytes)

    def close(self) -> None:
        import llama_cpp

        with _LOAD_LOCK:
            for adapter in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(adapter)
            self._adapters.clear()
            self._applied = ()
            for part in (self._batch, self._ctx, self._model):
                if part is not None:
                    part.close()
        self._batch = self._ctx = self._model = None
        self.cache.clear()

    # -- sequences --------------------------------------------------------------------------------

    def open(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> _Seq:
        if self._model is None or self._template is None:
            raise EngineError("the model is not loaded")
        rendered = RENDERED.take(RENDERED.key(self.path, request.messages, request.tools))
        prompt, template_stops = rendered or self._template.render(request.messages, request.tools)
        room = self._n_ctx - len(prompt)
        if room < 1:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens; the context holds {self._n_ctx}")
        stops = [s for s in (*request.stop, *template_stops) if s]
        for path, _scale in request.adapters:
            self._adapter(path)
        seq = _Seq(request, should_stop, prompt, stops, min(request.max_tokens, room), self._sampler(request))
        self._place(seq)
        return seq

    def _sampler(self, request: GenerationRequest) -> TokenSampler:
        """The sequence's sampler: the maths of ``Llama.generate``'s chain, on the logits row."""
        return TokenSampler(self._model, request, request.seed if request.seed >= 0 else self.seed)

    def _adapter(self, path: str) -> Any:
        """The LoRA adapter in ``path``, loaded for this model on first use."""
        import llama_cpp

        adapter = self._adapters.get(path)
        if adapter is None:
            with _LOAD_LOCK:
                adapter = llama_cpp.llama_adapter_lora_init(self._model.model, path.encode("utf-8"))
            if not adapter:
                raise EngineError(f"cannot load the LoRA adapter {path!r} for the model {self.path.name!r} "
                                  "(not a LoRA GGUF, or made for another model)")
            self._adapters[path] = adapter
            log.info("LoRA adapter loaded", model=self.path.name, adapter=path)
        return adapter

    def _apply(self, adapters: Adapters) -> None:
        """Make the context compute with exactly ``adapters`` (none: the base model)."""
        import ctypes

        import llama_cpp

        if adapters == self._applied:
            return
        n = len(adapters)
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(self._adapter(p) for p, _ in adapters)) if n else None
        scales = (ctypes.c_float * n)(*(s for _, s in adapters)) if n else None
        llama_cpp.llama_set_adapters_lora(self._ctx.ctx, arr, n, scales)
        self._applied = adapters

    def _cache_key(self, thread: ThreadKey, adapters: Adapters) -> tuple[str, Adapters, ThreadKey]:
        """A parked state's key: the model, the adapter set it was computed under, the thread."""
        return str(self.path), adapters, thread

    def _place(self, seq: _Seq) -> None:
        """Give ``seq`` a free slot: the one already holding most of its prompt, or, when its
        thread's parked state holds more, an empty or least recently used slot with that state
        restored; among equals, one next to the busy slots (a step's ids should stay consecutive:
        see :meth:`_compact`). A slot taken from another thread has that thread's state parked first. KV
        state counts only under the adapter set it was computed with: a slot or a parked state
        of another set is never reused."""
        free = [s for s in self._slots if not s.busy]
        if not free:
            raise EngineError("no free slot (more sequences than [model] parallel)")
        key, adapters = seq.request.thread_key, seq.request.adapters
        # Read at least the last prompt token again: its logits give the first reply token.
        usable = len(seq.prompt) - 1

        def reuse(tokens: Sequence[int], under: Adapters) -> int:
            return min(common_prefix(list(tokens), seq.prompt), usable) if under == adapters else 0

        busy = [s.seq_id for s in self._slots if s.busy]

        def scatter(slot: _Slot) -> int:
            # Runs of consecutive busy ids with this slot taken: a step costs a pass per run.
            return runs_of([*busy, slot.seq_id])

        def fresh(s: _Slot) -> tuple[int, bool, float, int]:
            return scatter(s), s.owner is not None, s.used_at, s.seq_id

        slot = max(free, key=lambda s: (reuse(s.tokens, s.adapters), s.owner == key and s.adapters == adapters,
                                        -scatter(s), s.owner is None, -s.used_at, -s.seq_id))
        kept = reuse(slot.tokens, slot.adapters)
        shared, share_key = self._shared_part(seq)
        saved = self.cache.take(self._cache_key(key, adapters))
        if saved is not None and reuse(saved.tokens, adapters) > kept:
            slot = min(free, key=fresh)
            self._park(slot, key, adapters)
            kept = reuse(saved.tokens, adapters) if self._restore(slot, saved) else 0
        else:
            if saved is not None:
                saved.free()
            prefix = self.cache.peek(share_key) if share_key else None
            copy = reuse(prefix.tokens, adapters) if prefix is not None else 0
            # The bot's prefix is copied into the slot when no slot holds more of the prompt, and
            # also instead of taking another thread's slot for little more than that prefix (its
            # state would be parked now and restored when it comes back).
            taking = slot.owner not in (None, key) and kept - copy < SHARED_PREFIX_MIN
            if copy and (copy > kept or taking):
                other = min(free, key=fresh)
                if copy > kept or other is not slot:
                    slot = other
                    self._park(slot, key, adapters)
                    prefix = self.cache.peek(share_key)  # parking may have evicted it
                    if prefix is not None and self._restore(slot, prefix, shared=True):
                        kept = copy
                        self.stats.shared_prefix_copies += 1
                    else:
                        kept = reuse(slot.tokens, slot.adapters)
                else:
                    self._park(slot, key, adapters)
            else:
                self._park(slot, key, adapters)
        if not self._trim(slot, kept):
            kept = 0
        if shared > kept:
            # A prompt read from before the end of its system turn reads up to there first, then
            # the rest: the system turn's state is the same whether it was read or copied, and so
            # is every answer (llama.cpp's sums depend on how a batch is cut). The first thread to
            # read it keeps that state for its bot's next threads.
            seq.share_at = shared
            seq.share_key = share_key if share_key and self.cache.peek(share_key) is None else ()
        slot.ahead = []
        slot.busy, slot.owner, slot.adapters, slot.used_at = True, key, adapters, self._tick()
        seq.slot, seq.read, seq.cached_tokens = slot, kept, kept
        self.stats.prompt_tokens_reused += kept

    def _shared_part(self, seq: _Seq) -> tuple[int, tuple[Any, ...]]:
        """How many of the prompt's first tokens are its bot's system turn, and the key its
        shared state goes by (model, adapter set, a digest of exactly those tokens); 0 when it is
        too short to be worth sharing, the key () when sharing is off. The part ends where the
        first user turn's words begin: a user's words and the documents retrieved for them
        (which come in the user's turn) are never part of it."""
        if not self._can_trim:
            return 0, ()
        n = common_prefix(self._system_turn(seq.request), seq.prompt)
        if n < SHARED_PREFIX_MIN or n >= len(seq.prompt):
            return 0, ()
        if not self.share_prefixes:
            return n, ()
        digest = hashlib.blake2b(array("i", seq.prompt[:n]).tobytes(), digest_size=16).digest()
        return n, ("shared prefix", str(self.path), seq.request.adapters, digest)

    def _system_turn(self, request: GenerationRequest) -> list[int]:
        """The tokens of the request's system turn and the next turn's opening, as this template
        renders them: where two prompts that differ only in the first user's words part (found
        once per system message and tools, then remembered). [] without a system message."""
        messages = request.messages
        if not messages or messages[0].get("role") != "system" or self._template is None:
            return []
        blob = json.dumps([messages[0], request.tools], ensure_ascii=False, default=str)
        key = hashlib.blake2b(blob.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        turn = self._system_turns.get(key)
        if turn is not None:
            self._system_turns.move_to_end(key)
            return turn
        try:
            one, _ = self._template.render([messages[0], {"role": "user", "content": "a"}], request.tools)
            two, _ = self._template.render([messages[0], {"role": "user", "content": "b"}], request.tools)
            turn = one[: common_prefix(one, two)]
        except TemplateError:
            turn = []
        self._system_turns[key] = turn
        while len(self._system_turns) > 64:
            self._system_turns.popitem(last=False)
        return turn

    def _save_shared(self, seq: _Seq) -> None:
        """Keep the state of the system turn ``seq`` just finished reading as its bot's shared
        prefix (the slot holds exactly those tokens now)."""
        slot, n, key = seq.slot, seq.share_at, seq.share_key
        seq.share_at, seq.share_key = 0, ()
        if not key or slot is None or slot.tokens != seq.prompt[:n] or self.cache.peek(key) is not None:
            return
        ok, area = self._state_of(slot)
        if ok and area is not None:
            self.cache.put(key, SavedState(tuple(slot.tokens), area))
            self.stats.shared_prefixes_saved += 1

    def _compact(self, active: list[_Seq]) -> None:
        """Bring the step's sequences to consecutive slot ids when that pays: each run of
        consecutive ids is a pass over the weights of its own (core/engines/batching.py), and a
        follow-up finds its thread's tokens wherever its slot happens to be. The KV states are
        swapped with those of free slots (whose threads keep their states, in the slots left)
        into the window of ids that needs the least copying; only if the copying costs less
        than the passes it saves in a few steps."""
        ids = [seq.slot.seq_id for seq in active if seq.slot is not None]
        runs = runs_of(ids)
        if runs <= 1 or len(ids) != len(active):
            return
        inside = set(ids)
        blocked = {s.seq_id for s in self._slots if s.busy} - inside
        best: tuple[int, int] | None = None
        for start in range(self.parallel - len(ids) + 1):
            window = range(start, start + len(ids))
            if any(i in blocked for i in window):
                continue
            cost = sum(len(self._slots[i].tokens) for i in inside if i not in window)
            cost += sum(len(self._slots[i].tokens) for i in window if i not in inside)  # swapped out
            if best is None or cost < best[0]:
                best = (cost, start)
        if best is None:
            return
        cost, start = best
        # A copy reads and writes each token's K and V; a pass streams the weights once. Moving
        # pays if it costs less than the passes it saves over PAYBACK_STEPS steps.
        if 2 * cost * self._kv_token_bytes > (runs - 1) * PAYBACK_STEPS * self._weight_bytes:
            return
        window = range(start, start + len(ids))
        holes = [self._slots[i] for i in window if i not in inside]
        for seq in active:
            assert seq.slot is not None
            if seq.slot.seq_id not in window:
                self._move(seq, holes.pop(0))

    def _move(self, seq: _Seq, dst: _Slot) -> None:
        """Swap the KV states of ``seq``'s slot and the free slot ``dst``: the sequence moves to
        ``dst``, and the thread ``dst`` kept (if any) to the slot it leaves, with its read-ahead,
        as if nothing had happened to it. On failure the sequence stays where it is (and a
        state that could not be put back is forgotten: its thread reads its prompt again)."""
        src = seq.slot
        assert src is not None and not dst.busy
        read_moving, moving = self._state_of(src)
        read_staying, staying = self._state_of(dst)
        if not (read_moving and read_staying):
            for area in (moving, staying):
                if area is not None:
                    area.close()
            return
        self._ctx.kv_cache_seq_rm(dst.seq_id, -1, -1)
        if not self._put_state(dst, moving):
            if staying is not None:
                staying.close()
            self._ctx.kv_cache_seq_rm(dst.seq_id, -1, -1)
            dst.tokens.clear()
            dst.owner, dst.ahead = None, []
            log.warning("moving a sequence to another slot failed; it stays", src=src.seq_id, dst=dst.seq_id)
            return
        self._ctx.kv_cache_seq_rm(src.seq_id, -1, -1)
        parked_ok = self._put_state(src, staying)
        dst.tokens, src.tokens = src.tokens, dst.tokens
        dst.owner, src.owner = src.owner, dst.owner
        dst.adapters, src.adapters = src.adapters, dst.adapters
        dst.used_at, src.used_at = src.used_at, dst.used_at
        dst.ahead, src.ahead = [], dst.ahead
        dst.busy, src.busy = True, False
        if not parked_ok:
            self._forget(src)
            src.ahead = []
        seq.slot = dst
        self.stats.slot_moves += 1

    def _state_of(self, slot: _Slot) -> tuple[bool, mmap.mmap | None]:
        """Whether the slot's sequence state could be read, and the state in a memory map of its
        own (given back to the system when closed, as parked states are: see SavedState); None
        when the slot holds nothing."""
        import ctypes

        import llama_cpp

        if not slot.tokens:
            return True, None
        size = llama_cpp.llama_state_seq_get_size(self._ctx.ctx, slot.seq_id)
        area = mmap.mmap(-1, max(1, size))
        view = (ctypes.c_uint8 * size).from_buffer(area)
        written = llama_cpp.llama_state_seq_get_data(self._ctx.ctx, view, size, slot.seq_id)
        del view  # a live ctypes view would keep the map from closing
        if written != size or not size:
            area.close()
            return False, None
        return True, area

    def _put_state(self, slot: _Slot, state: mmap.mmap | None) -> bool:
        """Write a state from :meth:`_state_of` into the (cleared) slot's sequence; closes it."""
        import ctypes

        import llama_cpp

        if state is None:
            return True
        try:
            view = (ctypes.c_uint8 * len(state)).from_buffer(state)
            ok = bool(llama_cpp.llama_state_seq_set_data(self._ctx.ctx, view, len(state), slot.seq_id))
            del view
            return ok
        finally:
            state.close()

    def _trim(self, slot: _Slot, keep: int) -> bool:
        """Drop the slot's tokens past ``keep``; False when that meant clearing it all."""
        if keep >= len(slot.tokens):
            return True
        if keep > 0 and self._can_trim and self._ctx.kv_cache_seq_rm(slot.seq_id, keep, -1):
            del slot.tokens[keep:]
            return True
        self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
        slot.tokens.clear()
        return keep == 0

    def _park(self, slot: _Slot, taker: ThreadKey, adapters: Adapters = ()) -> None:
        """Save the slot's state for its thread before ``taker`` uses the slot (nothing to save
        when the slot is empty or already ``taker``'s under the same adapters)."""
        import ctypes

        import llama_cpp

        if slot.owner is None or (slot.owner == taker and slot.adapters == adapters):
            return
        ctx = self._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, slot.seq_id) if slot.tokens else 0
        if 0 < size <= self.cache.max_bytes:
            # llama.cpp writes the state straight into a map of its own (see SavedState).
            area = mmap.mmap(-1, size)
            view = (ctypes.c_uint8 * size).from_buffer(area)
            written = llama_cpp.llama_state_seq_get_data(ctx, view, size, slot.seq_id)
            del view  # a live ctypes view would keep the map from closing
            if written == size:
                self.cache.put(self._cache_key(slot.owner, slot.adapters), SavedState(tuple(slot.tokens), area))
            else:
                area.close()
        slot.owner = None

    def _restore(self, slot: _Slot, saved: SavedState, *, shared: bool = False) -> bool:
        """Write ``saved`` into the slot (cleared first). A parked thread state moves into the
        slot (freed here); a ``shared`` prefix is copied and stays in the cache."""
        import ctypes

        import llama_cpp

        self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
        slot.tokens.clear()
        size = len(saved.data)
        if isinstance(saved.data, mmap.mmap):
            buf = (ctypes.c_uint8 * size).from_buffer(saved.data)
        else:
            buf = (ctypes.c_uint8 * size).from_buffer_copy(saved.data)
        ok = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, size, slot.seq_id)
        del buf
        if not shared:
            saved.free()
        if not ok:
            self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
            return False
        slot.tokens = list(saved.tokens)
        if not shared:
            self.stats.cache_restores += 1
        return True

    def _tick(self) -> float:
        self._clock += 1
        return self._clock

    def release(self, seq: Generation) -> None:
        assert isinstance(seq, _Seq)
        seq.sampler.close()
        slot = seq.slot
        if slot is not None and slot.busy:
            slot.busy, slot.used_at = False, self._tick()
            if seq.failed:
                self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        """What the slot holds is unknown after a failed decode: start it afresh."""
        self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
        slot.tokens.clear()
        slot.owner = None

    def read_ahead(self) -> bool:
        """Read the opening of a finished thread's next turn into its slot (the most recently
        answered first): a follow-up question then reads only its own words. One slot per call;
        the worker calls this only while nothing runs and nothing waits."""
        pending = [s for s in self._slots if s.ahead and not s.busy]
        if not pending:
            return False
        slot = max(pending, key=lambda s: s.used_at)
        tokens, slot.ahead = slot.ahead, []
        self._apply(slot.adapters)
        batch = self._batch.batch
        for n, token in enumerate(tokens):
            _put(batch, n, slot, token, False)
        batch.n_tokens = len(tokens)
        try:
            self._ctx.decode(self._batch)
        except Exception as exc:
            log.warning("reading ahead failed; the slot starts afresh", error=str(exc))
            self._forget(slot)
            return True
        self.stats.prompt_tokens_ahead += len(tokens)
        return True

    # -- one step -------------------------------------------------------------------------------

    def step(self, seqs: Sequence[Generation]) -> None:
        """One ``llama_decode`` for every sequence in ``seqs`` that is not finished."""
        active: list[_Seq] = []
        for seq in seqs:
            assert isinstance(seq, _Seq)
            if seq.done:
                continue
            if seq.should_stop():
                self._finish(seq, "cancelled")
                continue
            active.append(seq)
        if not active:
            return
        # One adapter set per decode (the context applies one set at a time): the sets take
        # turns step by step, so that none waits for another's answers to end.
        sets = list(dict.fromkeys(seq.request.adapters for seq in active))
        if len(sets) > 1:
            chosen = sets[self._turn % len(sets)]
            self._turn += 1
            active = [seq for seq in active if seq.request.adapters == chosen]
        self._apply(active[0].request.adapters)
        self._compact(active)
        capacity = min(self.n_batch, self._n_ctx)
        # How many rows each sequence writes: its next token while generating; while reading its
        # prompt, one row, except the reader first in line, which reads a chunk. llama.cpp gives
        # every micro-batch the same number of rows of each sequence in it, so one row each and
        # one longer chunk cost two passes at most (see core/engines/batching.py); while others
        # stream, the chunk is what keeps the step within [model] step_budget_ms.
        decoding = [seq for seq in active if not seq.reading and seq.next_token is not None]
        readers = [seq for seq in active if seq.reading]
        takes: dict[int, int] = {id(seq): 1 for seq in decoding}
        # What is left once every reader after the first has its one row.
        budget = capacity - len(decoding) - max(0, len(readers) - 1)
        for k, seq in enumerate(readers):
            left = len(seq.prompt) - seq.read
            if k == 0:
                # Beside streaming answers, as many tokens as fit the step's time budget (see
                # core/engines/step_budget.py); with none streaming, as many as the batch holds.
                take = min(left, self._chunk(seq, decoding, readers, budget, capacity) if decoding else budget,
                           budget)
            elif decoding:
                take = 1
            else:  # nothing streams yet: the prompts fill the batch, first come first
                take = min(left, budget + 1)
            take = max(1, take)
            if seq.share_at > seq.read:  # stop at the end of the system turn (see _place)
                take = min(take, seq.share_at - seq.read)
            takes[id(seq)] = take
            budget -= take if k == 0 else take - 1
        self._drafts(decoding, readers, capacity)
        batch = self._batch.batch
        n = 0
        logits_rows = 0
        cells = 0
        ids: list[int] = []
        for seq in self._row_order(active, readers[0] if readers and decoding else None, takes, capacity):
            seq.logits_at = -1
            take = min(takes.get(id(seq), 0), capacity - n)
            if take <= 0 or seq.slot is None:
                continue
            if not seq.reading:
                assert seq.next_token is not None
                cells += len(seq.slot.tokens) + 1
                _put(batch, n, seq.slot, seq.next_token, True)
                seq.logits_at, seq.next_token = n, None
                ids.append(seq.slot.seq_id)
                n += 1
                for token in seq.draft:  # guesses: checked against the tokens sampled from these rows
                    cells += len(seq.slot.tokens) + 1
                    _put(batch, n, seq.slot, token, True)
                    ids.append(seq.slot.seq_id)
                    n += 1
                logits_rows += 1 + len(seq.draft)
                continue
            last = len(seq.prompt) - 1
            cells += take * len(seq.slot.tokens) + take * (take + 1) // 2
            logits_rows += 1 if seq.read + take > last else 0
            for i in range(seq.read, seq.read + take):
                _put(batch, n, seq.slot, seq.prompt[i], i == last)
                if i == last:
                    seq.logits_at = n
                ids.append(seq.slot.seq_id)
                n += 1
            seq.read += take
            self.stats.prompt_tokens_read += take
        if n == 0:
            return
        batch.n_tokens = n
        self.last_rows = ids
        if self._schedule is not None and os.path.exists(self._schedule):
            self._write_schedule(self._schedule, batch, n)
        started = self._now()
        try:
            self._ctx.decode(self._batch)
        except Exception as exc:
            log.error("llama_decode failed; the sequences of this step end with an error",
                      error=str(exc), sequences=len(active), tokens=n)
            for seq in active:
                seq.failed = True
                self._finish(seq, "error", error=f"generation failed: {exc}")
            return
        seconds = self._now() - started
        parts = split(ids, capacity)
        passes = len(parts)
        held = {seq.slot.seq_id: len(seq.slot.tokens) for seq in active if seq.slot is not None}
        streams = sum(max(held.get(s, 0) for s in part) for part in parts)
        self._budget.observe(Shape(passes, n - logits_rows, logits_rows, cells / 1000, streams / 1000), seconds,
                             decoding=bool(decoding))
        self.stats.steps += 1
        self.stats.batch_tokens += n
        self.stats.last_batch = n
        self.stats.count_step(passes)
        for seq in active:
            if seq.share_at and seq.read == seq.share_at:
                self._save_shared(seq)
            if seq.logits_at >= 0:
                self._sample(seq)

    @staticmethod
    def _write_schedule(path: str, batch: Any, n: int) -> None:
        """The step's rows as runs of one sequence: [seq_id, first position, rows, logits] (logits: 1
        every row, 2 the last row only, 0 none)."""
        runs: list[list[int]] = []
        for i in range(n):
            s, pos, logits = batch.seq_id[i][0], batch.pos[i], bool(batch.logits[i])
            run = runs[-1] if runs else None
            if run is not None and run[0] == s and run[1] + run[2] == pos and run[3] != 2 and (run[3] == 1) == logits:
                run[2] += 1
            elif run is not None and run[0] == s and run[1] + run[2] == pos and run[3] == 0 and logits:
                run[2] += 1
                run[3] = 2
            else:
                runs.append([s, pos, 1, 1 if logits else 0])
        with open(path, "a") as f:
            f.write(json.dumps(runs, separators=(",", ":")) + "\n")

    def _chunk(self, reader: _Seq, decoding: list[_Seq], readers: list[_Seq], most: int, capacity: int) -> int:
        """The chunk of ``reader``'s prompt that keeps this step within [model] step_budget_ms,
        priced by the step budget's fitted costs (core/engines/step_budget.py): the step's
        passes with a chunk of two or more tokens, the other rows, the cells they attend to."""
        others = [*decoding, *(q for q in readers if q is not reader)]
        takes = {id(q): 1 for q in others}
        takes[id(reader)] = 2
        ids = [q.slot.seq_id for q in self._row_order([reader, *others], reader, takes, capacity)
               if q.slot is not None for _ in range(takes[id(q)])]
        parts = split(ids, capacity)
        # Each pass's longest KV stream after the step, the reader's left out (priced per chunk).
        held = {q.slot.seq_id: len(q.slot.tokens) + 1 for q in others if q.slot is not None}
        streams = sum(max((held.get(s, 0) for s in part), default=0) for part in parts)
        rest = Shape(0, len(readers) - 1, len(decoding),
                     sum(len(q.slot.tokens) + 1 for q in others if q.slot is not None) / 1000)
        assert reader.slot is not None
        return self._budget.chunk(rest, passes=len(parts), position=len(reader.slot.tokens), most=most,
                                  pass_kcells=streams / 1000)

    @staticmethod
    def _row_order(active: list[_Seq], reader: _Seq | None, takes: dict[int, int], capacity: int) -> list[_Seq]:
        """The order the step writes its sequences' rows in (each sequence's rows together).

        By sequence id: one micro-batch takes only consecutive ids, in row order (see
        core/engines/batching.py). A prompt chunk read beside streaming answers (``reader``, two
        rows or more) costs a pass of its own anyway; it goes where its rows make a micro-batch
        without the answers' rows (first, or last when the next id is an answer's), for the
        same passes: llama.cpp sizes a micro-batch's attention by the longest KV stream in it,
        and a long prompt's would make every answer's row look over all of its cells."""
        order = sorted(active, key=lambda q: q.slot.seq_id if q.slot is not None else -1)
        if reader is None or takes.get(id(reader), 0) < 2 or len(order) < 2:
            return order
        rest = [q for q in order if q is not reader]

        def cost(o: list[_Seq]) -> tuple[int, bool]:
            ids = [q.slot.seq_id for q in o if q.slot is not None for _ in range(takes.get(id(q), 0))]
            parts = split(ids, capacity)
            assert reader.slot is not None
            shared = any(reader.slot.seq_id in part and len(part) > 1 for part in parts)
            return len(parts), shared

        return min(([reader, *rest], [*rest, reader], order), key=cost)

    def _drafts(self, decoding: list[_Seq], readers: list[_Seq], capacity: int) -> bool:
        """Give each streaming sequence this step's guessed tokens (``seq.draft``), when drafting
        pays: no prompt is being read and at most DRAFT_SEQS answers stream, every one of them has
        a guess (cut to the same length, so that the step stays one pass over the weights: see
        core/engines/batching.py) and none samples under a grammar. Whether any was given."""
        for seq in decoding:
            seq.draft = []
        if (not self.drafting or readers or not decoding or len(decoding) > DRAFT_SEQS or not self._can_trim
                or any(seq.sampler.grammar for seq in decoding)):
            return False
        drafts = []
        for seq in decoding:
            slot = seq.slot
            assert slot is not None and seq.next_token is not None
            if seq.drafter is None:
                seq.drafter = Drafter(slot.tokens)
            # The history is the slot's tokens and the token sampled last (decoded in this step).
            seq.drafter.extend(slot.tokens[len(seq.drafter.history):])
            seq.drafter.extend([seq.next_token])
            # Never guess past the answer's end or the context.
            room = min(self.draft_tokens, seq.max_tokens - seq.produced - 1, self._n_ctx - len(slot.tokens) - 2,
                       capacity // len(decoding) - 1)
            drafts.append(self._before_end(seq.drafter.propose(room)) if room > 0 else [])
        k = min(len(d) for d in drafts)
        if k == 0:
            return False
        for seq, draft in zip(decoding, drafts, strict=True):
            seq.draft = draft[:k]
        self.stats.draft_steps += 1
        return True

    def _before_end(self, draft: list[int]) -> list[int]:
        """The guess up to its first end-of-generation token: a quote taken from the prompt runs on
        into the end of that turn and the next turn's opening, and if the answer ends there too,
        every row guessed past the end is arithmetic for tokens no one will read (the sampled end
        stops the answer whether or not it was guessed)."""
        import llama_cpp

        vocab = self._model.vocab
        for i, token in enumerate(draft):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return draft[:i]
        return draft

    def _sample(self, seq: _Seq) -> None:
        """Sample the sequence's next token from its row; with guesses, go on to the next row as
        long as the sampled token is the guess (its row was decoded with it), and take the
        guessed tokens that were not sampled out of the KV cache."""
        draft, seq.draft = seq.draft, []
        slot = seq.slot
        assert slot is not None
        # What the slot holds without the guesses: everything up to the token decoded this step.
        kept = len(slot.tokens) - len(draft)
        accepted = 0
        for i in range(len(draft) + 1):
            token = seq.sampler.sample(self._ctx.ctx, seq.logits_at + i)
            if not self._emit(seq, token):
                break
            if i < len(draft) and token == draft[i]:
                accepted += 1
                continue
            seq.next_token = token
            break
        if not draft:
            return
        self.stats.draft_tokens += len(draft)
        self.stats.draft_accepted += accepted
        if seq.drafter is not None:
            seq.drafter.record(len(draft), accepted)
        keep = kept + accepted
        if keep < len(slot.tokens):
            if not self._ctx.kv_cache_seq_rm(slot.seq_id, keep, -1):
                # Cannot happen for a model whose state can lose its tail (drafting needs one);
                # if it did, the slot's contents are unknown: the answer ends here.
                if not seq.done:
                    seq.failed = True
                    self._finish(seq, "error", error="generation failed: the KV cache could not drop guesses")
                self._forget(slot)
                return
            del slot.tokens[keep:]

    def _emit(self, seq: _Seq, token: int) -> bool:
        """Hand the sampled ``token`` over; whether the answer goes on after it."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            self._finish(seq, "stop")
            self._ahead_after(seq, [])
            return False
        seq.produced += 1
        text, seq.pending, stopped = hand_over(seq.pending + seq.decoder.decode(self._piece(token)), seq.stops)
        if text:
            seq.out.append(Chunk(text))
        if stopped:
            self._finish(seq, "stop")
            return False
        if seq.produced >= seq.max_tokens:
            self._finish(seq, "length")
            self._ahead_after(seq, [token])  # the answer's last token was sampled, never read
            return False
        return True

    def _piece(self, token: int) -> bytes:
        """The token's bytes (what ``detokenize([token])`` gives), from a table filled on first use:
        one ctypes call and a buffer per token and stream saved on the serial path. The bytes
        may end inside a multi-byte character: each sequence's incremental decoder joins them."""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._model.detokenize([token])
        return piece

    def _ahead_after(self, seq: _Seq, last: list[int]) -> None:
        """The answer is whole (not cut at a stop string, whose tokens the stored text lacks): the
        thread's next prompt will almost surely go on with it and the template's opening of a user
        turn. Read those while idle (:meth:`read_ahead`); the next turn keeps them only if its
        tokens really follow (compared, as always)."""
        slot = seq.slot
        ahead = last + self._opening
        if slot is not None and self._opening and len(slot.tokens) + len(ahead) < self._n_ctx:
            slot.ahead = ahead

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        text = "" if reason == "error" else seq.pending
        seq.out.append(Chunk(text, reason, len(seq.prompt), seq.produced, cached_tokens=seq.cached_tokens,
                             error=error))
        seq.pending = ""
        seq.done = True
        self.release(seq)

    def state(self) -> dict[str, Any]:
        return {
            "slots": self.parallel,
            "active_sequences": sum(1 for s in self._slots if s.busy),
            "state_cache_bytes": self.cache.bytes,
            "state_cache_entries": len(self.cache),
            "state_cache_evictions": self.cache.evictions,
            "lora_adapters": len(self._adapters),
            **self.stats.as_dict(),
            **self._budget.as_dict(),
        }
