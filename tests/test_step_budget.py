"""A long prompt read beside streaming answers, in chunks sized by a time budget per step
(issue 26 item 4): the real engine and model, no daemon. What is asserted is what the engine
counts and chooses (its estimates, its chunks, its rows), never a wall-clock time: a loaded box
changes the estimates, and the chunk must follow them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.engines.step_budget import FLOOR, StepBudget
from core.messages import ThreadKey
from tests.test_batching import SENTENCES, never

# Exchanges the model repeats word for word, many of them: a prompt of ~700 tokens whose answer
# is certain (the last sentence repeated), whatever chunks it is read in.
HISTORY = [s.replace("the ", "a ") for s in SENTENCES] + SENTENCES[::-1]


def long_echo(sentence: str, rounds: int = 2) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You repeat the user's sentence exactly."}]
    for _ in range(rounds):
        for s in HISTORY:
            messages += [{"role": "user", "content": s}, {"role": "assistant", "content": s}]
    return [*messages, {"role": "user", "content": sentence}]


def short_echo(sentence: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You repeat the user's sentence exactly."},
            {"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
            {"role": "user", "content": sentence}]


def req(thread: str, messages: list[dict[str, str]], max_tokens: int = 40) -> GenerationRequest:
    return GenerationRequest(ThreadKey("test", "budget", thread), messages, max_tokens, temperature=0.0,
                             repeat_penalty=1.1, seed=7)


def engine_with(budget_ms: float) -> LlamaCppEngine:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=2048, n_threads=2, n_batch=512, parallel=4, cache_mb=64,
                         step_budget_ms=budget_ms)
    eng.load()
    return eng


@pytest.fixture(scope="module")
def alone_texts() -> Iterator[dict[str, str]]:
    eng = engine_with(200)
    try:
        texts = {}
        for i, s in enumerate(SENTENCES[:4]):
            texts[s] = "".join(c.text for c in eng.generate(req(f"alone-{i}", short_echo(s)), never))
        texts["long"] = "".join(c.text for c in eng.generate(req("alone-long", long_echo(SENTENCES[5])), never))
        yield texts
    finally:
        eng.close()


def streams_then_long(eng: LlamaCppEngine, tag: str, budget: Callable[[StepBudget], float] | None = None
                      ) -> tuple[list[str], list[int], list[tuple[float, float, int]]]:
    """Three answers stream; then a long prompt comes. Returns every text (the three, then the
    long one's), the long prompt's chunk in each step it was read beside streaming answers, and
    what the engine expected before that step: (its seconds per prompt token, its seconds for a
    decode-only step of the streaming rows, those rows). ``budget``: sets the step budget (seconds) from
    the engine's estimates just before the long prompt comes."""
    gens = [eng.open(req(f"{tag}-{i}", short_echo(s)), never) for i, s in enumerate(SENTENCES[:3])]
    texts = ["", "", "", ""]
    while any(g.reading for g in gens):
        eng.step(gens)
    for _ in range(3):  # a few decode-only steps: the engine times them
        eng.step(gens)
    if budget is not None:
        eng._budget.budget_s = budget(eng._budget)
    long = eng.open(req(f"{tag}-long", long_echo(SENTENCES[5])), never)
    gens.append(long)
    chunks: list[int] = []
    expected: list[tuple[float, float, int]] = []
    while not all(g.done for g in gens):
        streaming = sum(1 for g in gens[:3] if not g.done and not g.reading)
        before = long.read
        estimate = (eng._budget.token_s or eng._budget._prefill_s or 0.0, eng._budget.decode_s(streaming), streaming)
        eng.step(gens)
        if long.read > before and streaming and long.reading:  # a chunk beside streams, not the last one
            chunks.append(long.read - before)
            expected.append(estimate)
        for k, g in enumerate(gens):
            texts[k] += "".join(c.text for c in g.out)
            g.out.clear()
    return texts, chunks, expected


def test_a_tiny_budget_reads_the_long_prompt_in_the_smallest_chunks_and_answers_stay_the_same(alone_texts):
    eng = engine_with(1)  # 1 ms: decoding the streams alone takes longer
    try:
        texts, chunks, _ = streams_then_long(eng, "tiny")
        assert len(chunks) >= 3
        # The very first chunk is a guess (nothing measured beside streams yet); then the floor.
        assert set(chunks[1:]) == {FLOOR}, chunks
        assert eng.state()["prompt_chunk_last"] == FLOOR
        assert texts == [*SENTENCES[:3], alone_texts["long"]]
        assert texts[:3] == [alone_texts[s] for s in SENTENCES[:3]]
    finally:
        eng.close()


def test_a_large_budget_reads_as_much_as_the_batch_holds(alone_texts):
    eng = engine_with(60_000)  # a minute a step: the budget never binds, the batch size does
    try:
        texts, chunks, _ = streams_then_long(eng, "large")
        assert chunks and all(c == 512 - 3 for c in chunks), chunks  # the batch less the streams' rows
        assert texts == [*SENTENCES[:3], alone_texts["long"]]
    finally:
        eng.close()


def test_the_chunk_follows_the_engines_own_estimates(alone_texts):
    # A budget between the two (set from what this box measured: room for ~100 prompt tokens
    # beside the streams): the chunk is what the engine's measured costs say fits.
    eng = engine_with(200)
    try:
        texts, chunks, expected = streams_then_long(
            eng, "mid", lambda b: b.decode_s(3) + 100 * (b.token_s or b._prefill_s or 0.001))
        assert len(chunks) >= 2 and len(set(chunks)) >= 2, chunks  # it moved with the estimates
        assert texts == [*SENTENCES[:3], alone_texts["long"]]
        for chunk, (per_token, decode_s, streaming) in zip(chunks, expected, strict=True):
            room = eng._budget.budget_s - decode_s
            want = max(FLOOR, min(512 - streaming, int(room / per_token) if room > 0 else 0))
            assert chunk == want, (chunk, want, per_token, decode_s, streaming)
        assert eng.state()["prompt_token_ms"] > 0
    finally:
        eng.close()


def test_the_budget_shrinks_and_grows_the_chunk_with_the_measured_costs():
    b = StepBudget(0.2)
    assert b.chunk(7, 500) == 32  # nothing measured: a small first probe
    b.observe(0, 400, 0.8)  # prompts alone: 2 ms a token
    b.observe(7, 0, 0.05)  # seven streams alone: 50 ms a step
    assert b.chunk(7, 500) == 75  # (200 - 50) ms / 2 ms
    b.observe(7, 75, 0.05 + 75 * 0.004)  # beside the streams a token cost 4 ms
    assert b.chunk(7, 500) == 37  # (200 - 50) / 4
    for _ in range(40):  # the box got faster: 1 ms a token
        b.observe(7, 100, 0.05 + 100 * 0.001)
    assert 145 <= b.chunk(7, 500) <= 150
    assert b.chunk(7, 60) == 60  # never more than the batch has room for
    for _ in range(40):  # the streams alone fill the budget: the prompt still moves, at the floor
        b.observe(7, 0, 0.5)
    assert b.chunk(7, 500) == FLOOR
    # Rows never measured: the nearest count measured, scaled up, never down.
    assert b.decode_s(14) == pytest.approx(2 * b.decode_s(7))
    assert b.decode_s(3) == b.decode_s(7)


def test_the_config_key_reaches_the_engine_and_bad_values_are_refused():
    from pydantic import ValidationError

    from core.config import ModelConfig
    from core.engines import create_engine

    engine = create_engine(ModelConfig(step_budget_ms=150))
    assert engine._budget.budget_s == pytest.approx(0.15)  # type: ignore[attr-defined]
    for bad in (0, 5, -1, 120_000):
        with pytest.raises(ValidationError, match="step_budget_ms"):
            ModelConfig(step_budget_ms=bad)
    with pytest.raises(ValidationError, match='only read by engine = "llama_cpp"'):
        ModelConfig(engine="openai", base_url="http://127.0.0.1:1/v1", step_budget_ms=100)
