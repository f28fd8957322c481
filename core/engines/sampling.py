"""Choosing a sequence's next token from its row of logits, as cheaply as the maths allows.

llama.cpp's sampler chain for botd's settings was ``penalties -> top_k(40) -> typical -> top_p
-> min_p -> temp -> dist`` (``greedy`` at temperature 0). Run as a chain, every step copies the
whole vocabulary (152k entries for Qwen) into a candidate array and the penalty sampler probes a
hash map for each entry: about a millisecond a sequence a step, on the serial path between two
``llama_decode`` calls. Here the same maths is done where it is cheap:

- the repeat penalty touches only the tokens of the last 64 sampled (the penalty's window) and
  is applied to the logits row in place (a numpy view over ``llama_get_logits_ith``, no copy),
  with the same float32 operations llama.cpp's penalty sampler uses (multiply a logit <= 0,
  divide a positive one); a token counts once however often it is in the window;
- at temperature 0 the token is the first largest logit (``np.argmax``; llama.cpp's greedy
  sampler also keeps the first of equal maxima);
- otherwise the rest of the chain (top_k first) runs in llama.cpp on the penalised row, exactly
  as before.

So the tokens are the ones the old chain chose, token for token (tests/test_sampling.py builds
the old chain to check). A request with a grammar keeps the whole chain, grammar first: the
grammar must see every candidate.
"""

from __future__ import annotations

import ctypes
from collections import deque
from typing import Any

import numpy as np

from core.engines.base import EngineError, GenerationRequest
from core.schema_limits import check_grammar
from core.toolcalls import TRIGGER

# llama.cpp's penalty window (``penalty_last_n``) as botd always set it.
PENALTY_LAST_N = 64
TOP_K = 40


def build_chain(model: Any, request: GenerationRequest, seed: int, *, penalties: bool = True) -> Any:
    """llama.cpp's sampler chain for ``request`` (a ``llama_cpp._internals.LlamaSampler``): the
    grammar (if any) first, the repeat penalty (unless ``penalties`` is off: applied on the
    logits instead), then greedy, or top_k(40), typical, top_p, min_p(0.05), temp and dist."""
    import llama_cpp
    from llama_cpp import _internals as internals
    from llama_cpp.llama_grammar import LlamaGrammar

    chain = internals.LlamaSampler()
    if request.grammar:
        # The parser recurses per group: never hand it one unbounded (whoever built it).
        check_grammar(request.grammar)
        # First in the chain, as llama.cpp's own sampler does: the others pick among what it allows.
        grammar = LlamaGrammar.from_string(request.grammar)
        if request.grammar_lazy:
            chain.add_grammar_lazy_patterns(model, grammar, [TRIGGER], [])
        else:
            chain.add_grammar(model, grammar)
        # A grammar llama.cpp refuses adds no sampler, and a chain holding none crashes the
        # process at the first token (core/toolcalls.check_gbnf refuses such grammars earlier).
        if not llama_cpp.llama_sampler_chain_get(chain.sampler, 0):
            chain.close()
            raise EngineError("llama.cpp refused the request's grammar")
    if penalties:
        chain.add_penalties(n_vocab=model.n_vocab(), penalty_last_n=PENALTY_LAST_N,
                            penalty_repeat=request.repeat_penalty, penalty_freq=0.0, penalty_present=0.0)
    if request.temperature == 0.0:
        chain.add_greedy()
    else:
        chain.add_top_k(TOP_K)
        chain.add_typical(1.0, 1)
        chain.add_top_p(request.top_p, 1)
        chain.add_min_p(0.05, 1)
        chain.add_temp(request.temperature)
        chain.add_dist(seed if seed >= 0 else 0xFFFFFFFF)
    return chain


def logits_row(ctx: Any, index: int, n_vocab: int) -> np.ndarray:
    """Batch row ``index``'s logits as a writable float32 view of llama.cpp's own buffer (valid
    until the next decode)."""
    import llama_cpp

    address = ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, index), ctypes.c_void_p).value
    if not address:
        raise RuntimeError(f"llama.cpp has no logits for batch row {index}")
    row: Any = (ctypes.c_float * n_vocab).from_address(address)  # a ctypes array: the buffer protocol
    return np.frombuffer(row, dtype=np.float32)


def penalize(logits: np.ndarray, recent: deque[int] | list[int], penalty: np.float32) -> None:
    """llama.cpp's repeat penalty on ``logits`` in place: each token of ``recent`` once, a logit
    <= 0 multiplied by ``penalty``, a positive one divided (float32, as the C code does)."""
    if not recent:
        return
    ids = np.fromiter(set(recent), dtype=np.intp)
    values = logits[ids]
    logits[ids] = np.where(values <= 0, values * penalty, values / penalty)


class TokenSampler:
    """One sequence's sampler: :meth:`sample` takes its row of logits after a decode."""

    def __init__(self, model: Any, request: GenerationRequest, seed: int) -> None:
        self.n_vocab = model.n_vocab()
        self.greedy = request.temperature == 0.0
        self.grammar = bool(request.grammar)
        self.penalty = np.float32(request.repeat_penalty)
        self.recent: deque[int] = deque(maxlen=PENALTY_LAST_N)
        # The C chain, where one is still needed (a grammar, or sampling at a temperature).
        self.chain: Any = None
        if self.grammar:
            self.chain = build_chain(model, request, seed)
        elif not self.greedy:
            self.chain = build_chain(model, request, seed, penalties=False)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from batch row ``index`` of ``ctx`` (a ``llama_context *``)."""
        import llama_cpp

        if self.grammar:
            return int(llama_cpp.llama_sampler_sample(self.chain.sampler, ctx, index))
        if self.penalty != 1.0:
            logits = logits_row(ctx, index, self.n_vocab)
            penalize(logits, self.recent, self.penalty)
            token = int(np.argmax(logits)) if self.greedy else \
                int(llama_cpp.llama_sampler_sample(self.chain.sampler, ctx, index))
            self.recent.append(token)
            return token
        if self.greedy:
            return int(np.argmax(logits_row(ctx, index, self.n_vocab)))
        return int(llama_cpp.llama_sampler_sample(self.chain.sampler, ctx, index))

    @property
    def open(self) -> bool:
        """Whether a C chain is still held (freed by :meth:`close`)."""
        return self.chain is not None and self.chain.sampler is not None

    def close(self) -> None:
        # llama-cpp-python's sampler frees its C chain only when the cyclic garbage collector
        # finds it (it refers to itself); freed here, its buffers never pile up between collections.
        if self.chain is not None:
            self.chain.close()
