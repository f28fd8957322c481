"""core/engines/sampling.py on the real model: the repeat penalty applied on the logits row and
top_k first (or an argmax at temperature 0) choose exactly the tokens llama.cpp's old chain
(penalties -> top_k/greedy -> ...) chose; a grammar request keeps the whole chain."""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np
import pytest

from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.engines.sampling import build_chain, penalize
from core.messages import ThreadKey

PROMPTS = ["Count from one to thirty in words, separated by commas.",
           "Write the word 'echo' twenty times.",
           "List the days of the week, twice.",
           "Write a short poem about the sea and the sea and the sea."]


class _OldChain:
    """The chain the engine used before: llama.cpp's penalties sampler first, over the whole
    vocabulary, then greedy or top_k... (what ``Llama.generate`` builds)."""

    def __init__(self, model: Any, request: GenerationRequest, seed: int) -> None:
        self.chain = build_chain(model, request, seed, penalties=True)
        self.grammar = bool(request.grammar)  # what the engine asks a sampler (no guessing under a grammar)

    def sample(self, ctx: Any, index: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self.chain.sampler, ctx, index))

    def close(self) -> None:
        self.chain.close()


def request(i: int, temperature: float, penalty: float, tokens: int = 32) -> GenerationRequest:
    return GenerationRequest(ThreadKey("test", "bot", f"sampling-{i}-{temperature}-{penalty}"),
                             [{"role": "user", "content": PROMPTS[i]}], tokens, temperature=temperature,
                             repeat_penalty=penalty, seed=1234 + i)


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=512, n_threads=2, n_batch=128, parallel=4, cache_mb=16)
    eng.load()
    yield eng
    eng.close()


def sampled(engine: LlamaCppEngine, requests: list[GenerationRequest], old: bool) -> list[list[int]]:
    """The tokens each request's sampler chose, the requests decoded together."""
    reset(engine)
    chosen: list[list[int]] = [[] for _ in requests]
    gens = []
    for k, r in enumerate(requests):
        gen = engine.open(r, lambda: False)
        if old:
            gen.sampler.close()
            gen.sampler = _OldChain(engine._model, r, r.seed)
        inner = gen.sampler.sample

        def record(ctx: Any, index: int, inner: Any = inner, k: int = k) -> int:
            token = inner(ctx, index)
            chosen[k].append(token)
            return token

        gen.sampler.sample = record
        gens.append(gen)
    while not all(g.done for g in gens):
        engine.step(gens)
        for g in gens:
            g.out.clear()
    reset(engine)
    return chosen


def reset(engine: LlamaCppEngine) -> None:
    """Empty slots, none more recently used: every run reads its prompts afresh into the same slots."""
    for s in engine._slots:
        engine._forget(s)
        s.used_at = 0.0


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("penalty", [1.1, 1.0])
def test_the_tokens_are_the_old_chains_token_for_token(engine, temperature, penalty):
    requests = [request(i, temperature, penalty) for i in range(len(PROMPTS))]
    new = sampled(engine, requests, old=False)
    old = sampled(engine, requests, old=True)
    assert new == old
    assert all(len(t) > 10 for t in new)


def test_the_penalty_changes_the_answer_and_greedy_needs_no_chain(engine):
    gen = engine.open(request(0, 0.0, 1.1), lambda: False)
    assert gen.sampler.chain is None  # an argmax over the logits row, no llama.cpp chain
    engine.release(gen)
    with_penalty = sampled(engine, [request(i, 0.0, 1.1) for i in range(2)], old=False)
    without = sampled(engine, [request(i, 0.0, 1.0) for i in range(2)], old=False)
    assert with_penalty != without  # the test above compares something that matters


def test_penalize_is_llama_cpps_penalty_sampler():
    """On a real logits row: the penalty on the view equals llama.cpp's penalties sampler applied
    to the whole vocabulary (values of both signs, repeated tokens counted once)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, 49152).astype(np.float32)
    recent = [int(t) for t in rng.integers(0, 49152, 64)] + [7, 7, 7]
    chain = llama_cpp.llama_sampler_init_penalties(49152, 64, 1.1, 0.0, 0.0)
    for t in recent[-64:]:
        llama_cpp.llama_sampler_accept(chain, t)
    data = (llama_cpp.llama_token_data * 49152)()
    for i, v in enumerate(logits.tolist()):
        data[i].id, data[i].logit, data[i].p = i, v, 0.0
    arr = llama_cpp.llama_token_data_array(data, 49152, -1, False)
    llama_cpp.llama_sampler_apply(chain, llama_cpp.ctypes.byref(arr))
    llama_cpp.llama_sampler_free(chain)
    mine = logits.copy()
    penalize(mine, recent[-64:], np.float32(1.1))
    theirs = np.array([data[i].logit for i in range(49152)], dtype=np.float32)
    assert np.array_equal(mine, theirs)
    assert not np.array_equal(mine, logits)


def test_a_grammar_request_keeps_the_whole_chain(engine):
    r = GenerationRequest(ThreadKey("test", "bot", "sampling-grammar"), [{"role": "user", "content": "Say yes."}],
                          16, temperature=0.0, grammar='root ::= "yes, " [a-z]+ "."')
    gen = engine.open(r, lambda: False)
    chain = gen.sampler.chain.sampler
    names = [llama_cpp.llama_sampler_name(llama_cpp.llama_sampler_chain_get(chain, i))
             for i in range(llama_cpp.llama_sampler_chain_n(chain))]
    assert names == [b"grammar", b"penalties", b"greedy"]
    text = ""
    while not gen.done:
        engine.step([gen])
        text += "".join(c.text for c in gen.out)
        gen.out.clear()
    assert text.startswith("yes, ") and text.endswith(".")
