"""The batching engine on the real model, no daemon: several threads decoded in one batch,
each thread's KV state kept in its slot or parked in the state cache (issue 12)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from core.config import embedded_model_path
from core.engines.base import Chunk, GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.engines.state_cache import SavedState
from core.messages import ThreadKey

TOPICS = ["the sea", "mountains", "a red bicycle", "coffee", "winter in Oslo", "a lighthouse", "bees", "trains"]


def req(thread: str, messages: list[dict[str, str]], max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(ThreadKey("test", "bot", thread), messages, max_tokens, temperature=0.0,
                             repeat_penalty=1.1, seed=7)


def ask(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Write two sentences about {topic}."}]


# Sentences the model repeats word for word: high-confidence tokens, so that the small float
# differences between a batched and a lone decode (llama.cpp's kernels are not batch-invariant)
# cannot change a word, while a token crossing from one sequence to another would show.
SENTENCES = ["the blue fox sleeps under the old bridge", "seven green apples fell on the kitchen floor",
             "my uncle builds wooden boats in the summer", "a quiet train crossed the snowy valley at dawn",
             "the red kite flew high above the windy beach", "our teacher painted the classroom door yellow",
             "two cats watched the rain from the warm window", "the baker sold fresh bread before sunrise"]


def echo(sentence: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You repeat the user's sentence exactly."},
            {"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
            {"role": "user", "content": "a bird sang in the tree"},
            {"role": "assistant", "content": "a bird sang in the tree"},
            {"role": "user", "content": sentence}]


def never() -> bool:
    return False


def run_together(engine: LlamaCppEngine, requests: list[GenerationRequest],
                 stops: list[Callable[[], bool]] | None = None) -> tuple[list[str], list[Chunk], int]:
    """Open every request at once and step them together; returns texts, last chunks and the
    largest number of sequences that produced text in one step."""
    gens = [engine.open(r, (stops or [never] * len(requests))[i]) for i, r in enumerate(requests)]
    texts = [""] * len(gens)
    finals: list[Chunk | None] = [None] * len(gens)
    widest = 0
    while not all(g.done for g in gens):
        engine.step(gens)
        producing = 0
        for i, g in enumerate(gens):
            if g.out:
                producing += any(c.text for c in g.out)
            while g.out:
                c = g.out.pop(0)
                texts[i] += c.text
                if c.finish_reason:
                    finals[i] = c
        widest = max(widest, producing)
    assert all(f is not None for f in finals)
    return texts, finals, widest  # type: ignore[return-value]


def alone(engine: LlamaCppEngine, request: GenerationRequest) -> str:
    return "".join(c.text for c in engine.generate(request, never))


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=1024, n_threads=2, n_batch=256, parallel=8, cache_mb=64)
    eng.load()
    yield eng
    eng.close()


def test_eight_threads_decode_together_and_each_gets_exactly_its_own_answer(engine):
    solo = [alone(engine, req(f"solo-{i}", echo(t), 40)) for i, t in enumerate(SENTENCES)]
    assert solo == SENTENCES  # the model does repeat them: a mix-up would show
    texts, finals, widest = run_together(engine, [req(f"batch-{i}", echo(t), 40) for i, t in enumerate(SENTENCES)])
    assert widest >= 4, "the sequences were not decoded together"
    assert texts == solo
    assert all(f.finish_reason == "stop" for f in finals)
    # Each prompt was read once and only by its own sequence: one slot per thread, holding its
    # own prompt and answer tokens (or parked, when a slot was wanted to keep ids consecutive).
    owners = {s.owner.chat for s in engine._slots if s.owner is not None}
    parked = {key[2].chat for key in engine.cache._entries}
    assert {f"batch-{i}" for i in range(8)} <= owners | parked


def test_a_threads_next_turn_reuses_its_prefix_after_seven_others_ran(engine):
    first = ask("a quiet harbour")
    answer = alone(engine, req("harbour", first, 32))
    texts, _, _ = run_together(engine, [req(f"other-{t}", ask(t), 16) for t in TOPICS[:7]])
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And at night?"}]
    gen = engine.open(req("harbour", second, 8), never)
    first_len = len(engine._template.render(first)[0])
    # Everything up to the end of the first prompt (and usually the answer) is found read already.
    assert gen.cached_tokens >= first_len, (gen.cached_tokens, first_len)
    engine.release(gen)


def test_parked_state_is_restored_when_the_slots_were_taken(tmp_path):
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=1024, n_threads=2, n_batch=256, parallel=2, cache_mb=64)
    eng.load()
    try:
        first = echo(SENTENCES[0])
        answer = alone(eng, req("harbour", first, 40))
        assert answer == SENTENCES[0]
        for t in TOPICS[:5]:  # two slots, five other threads: the harbour's slot is taken
            alone(eng, req(f"other-{t}", ask(t), 8))
        assert all(s.owner != ThreadKey("test", "bot", "harbour") for s in eng._slots)
        assert len(eng.cache) > 0
        restores = eng.stats.cache_restores
        second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": SENTENCES[1]}]
        gen = eng.open(req("harbour", second, 40), never)
        assert eng.stats.cache_restores == restores + 1
        assert gen.cached_tokens >= len(eng._template.render(first)[0])
        text = ""
        while not gen.done:
            eng.step([gen])
            text += "".join(c.text for c in gen.out)
            gen.out.clear()
        # The restored state carries the conversation on: the next sentence is repeated.
        assert text == SENTENCES[1]
    finally:
        eng.close()


def test_a_cancelled_timed_out_or_failing_sequence_leaves_the_others_unchanged(engine):
    sentences = SENTENCES[:4]
    steps = {"n": 0}

    def cancel_soon() -> bool:
        steps["n"] += 1
        return steps["n"] > 6

    # A sequence whose prompt does not fit fails at once; one is cancelled mid-answer (a timeout
    # is the same stop check).
    too_long = req("mix-too-long", [{"role": "user", "content": "word " * 2000}], 8)
    with pytest.raises(Exception, match="context holds"):
        engine.open(too_long, never)
    texts, finals, _ = run_together(engine, [req(f"mix-{i}", echo(t), 40) for i, t in enumerate(sentences)],
                                    [never, cancel_soon, never, never])
    assert finals[1].finish_reason == "cancelled"
    assert sentences[1].startswith(texts[1]) and texts[1] != sentences[1]
    for i in (0, 2, 3):
        assert texts[i] == sentences[i]


def test_a_finished_or_cancelled_sequence_frees_its_sampler_at_once(engine):
    # llama-cpp-python's sampler refers to itself, so without an explicit free its C chain
    # waited for the cyclic collector: a daemon's RSS grew ~280 KB a message (the RSS bench).
    steps = {"n": 0}

    def cancel_soon() -> bool:
        steps["n"] += 1
        return steps["n"] > 3

    # At a temperature the sampler keeps a llama.cpp chain (greedy needs none: an argmax).
    warm = [GenerationRequest(ThreadKey("test", "bot", f"free-{name}"), echo(SENTENCES[i]), 40, temperature=0.7,
                              seed=7) for i, name in enumerate(("done", "cancelled"))]
    gens = [engine.open(warm[0], never), engine.open(warm[1], cancel_soon)]
    assert all(g.sampler.open for g in gens)
    while not all(g.done for g in gens):
        engine.step(gens)
    assert [g.sampler.open for g in gens] == [False, False]


def test_the_state_cache_never_exceeds_its_bound_and_evicts_the_oldest():
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=512, n_threads=2, n_batch=256, parallel=1, cache_mb=4)
    eng.load()
    try:
        for i, t in enumerate(TOPICS):
            alone(eng, req(f"bounded-{i}", ask(t), 16))
            assert eng.cache.bytes <= 4 * 1024 * 1024
        assert eng.cache.evictions > 0
        assert 0 < len(eng.cache) < len(TOPICS) - 1
    finally:
        eng.close()


def test_a_saved_state_whose_tokens_do_not_match_is_never_restored():
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=512, n_threads=2, n_batch=256, parallel=1, cache_mb=64)
    eng.load()
    try:
        key = ThreadKey("test", "bot", "victim")
        alone(eng, req("someone-else", ask("payroll secrets of finance"), 8))
        # A state saved under this thread's key, but of other tokens (what a key collision or a
        # stale entry would look like): it must not be used for this thread's prompt.
        eng.cache.put(eng._cache_key(key, ()), SavedState(tuple(range(5000, 5100)), b"\0" * 1000))
        restores = eng.stats.cache_restores
        gen = eng.open(req("victim", ask("the sea"), 8), never)
        assert eng.stats.cache_restores == restores
        # Only the tokens it really shares with what the slot holds (the system prompt and the
        # question's first words) are reused.
        from core.engines.state_cache import common_prefix

        shared = common_prefix(eng._template.render(ask("payroll secrets of finance"))[0],
                               eng._template.render(ask("the sea"))[0])
        assert 0 < gen.cached_tokens <= shared
        eng.release(gen)
        # And a thread's own saved state is not offered to another thread.
        alone(eng, req("owner", ask("bees"), 8))
        alone(eng, req("intruder", ask("trains"), 8))  # parks the owner's state
        gen = eng.open(req("intruder2", ask("bees"), 8), never)
        assert eng.stats.cache_restores == restores
        eng.release(gen)
    finally:
        eng.close()


async def test_eight_api_conversations_stream_interleaved_and_each_gets_its_own_answer(tmp_path, redis_server):
    import asyncio
    import json
    import time

    from tests.helpers import make_config, running_daemon, wait_for

    # No guessing ahead (draft_tokens): with it, the first answer, a sentence it repeats from its
    # prompt, may be whole in two steps, before the last of the eight has started. And no time
    # budget for the prompts read beside the first answers (step_budget_ms): on a loaded box it
    # reads them 16 tokens a step, and the eighth starts after the first is done.
    cfg = make_config(tmp_path, redis_server.url, model={"parallel": 8, "max_tokens": 40, "draft_tokens": 0,
                                                         "step_budget_ms": 60_000})
    async with running_daemon(cfg) as api:
        async def stream(i: int) -> tuple[str, list[float]]:
            body = {"messages": echo(SENTENCES[i]), "stream": True, "user": f"user{i}", "temperature": 0}
            text, times = "", []
            # Eight callers (the queue's per-user cap counts callers, not the body's "user").
            async with api.elsewhere(10 + i).session.post(api.base + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                        if delta:
                            text += delta
                            times.append(time.monotonic())
            return text, times

        results = await asyncio.gather(*(stream(i) for i in range(8)))
        assert [t for t, _ in results] == SENTENCES
        # Interleaved: the streams were producing at the same time, not one after another.
        starts = sorted(times[0] for _, times in results)
        ends = sorted(times[-1] for _, times in results)
        assert starts[-1] < ends[0], "a stream started only after another had finished"
        status, health = await api.get("/healthz")
        assert health["engine"]["slots"] == 8 and health["engine"]["steps"] > 0

        # Idle now: the worker reads each answered thread's next-turn opening (5 tokens in ChatML).
        async def read_ahead() -> bool:
            _, health = await api.get("/healthz")
            return health["engine"]["prompt_tokens_ahead"] == 8 * 5

        await wait_for(read_ahead, timeout=30)


def finish(engine: LlamaCppEngine, gen) -> tuple[str, str]:
    text, reason = "", ""
    while not gen.done:
        engine.step([gen])
        for c in gen.out:
            text += c.text
            reason = c.finish_reason or reason
        gen.out.clear()
    return text, reason


def test_the_opening_of_a_threads_next_turn_is_read_while_idle_and_used_only_if_it_follows(engine):
    opening = engine._template.next_turn_opening()
    assert [engine._model.token_get_text(t) for t in opening] == ["<|im_end|>", "Ċ", "<|im_start|>", "user", "Ċ"]
    while engine.read_ahead():  # what earlier tests left
        pass
    first = echo(SENTENCES[2])
    gen = engine.open(req("ahead", first), never)
    answer, reason = finish(engine, gen)
    assert (answer, reason) == (SENTENCES[2], "stop")
    slot = gen.slot
    answered = len(slot.tokens)
    ahead = engine.stats.prompt_tokens_ahead
    assert engine.read_ahead() and not engine.read_ahead()
    assert slot.tokens[answered:] == opening and engine.stats.prompt_tokens_ahead == ahead + len(opening)

    # The follow-up reads only its own words and the generation prompt; its answer is unchanged.
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": SENTENCES[3]}]
    gen = engine.open(req("ahead", second), never)
    assert gen.cached_tokens == answered + len(opening)
    assert finish(engine, gen) == (SENTENCES[3], "stop")

    # A next prompt that does not go on that way (the history was edited) keeps only what agrees.
    assert engine.read_ahead()
    edited = [*first, {"role": "assistant", "content": "something else"},
              {"role": "user", "content": SENTENCES[4]}]
    gen = engine.open(req("ahead", edited), never)
    assert gen.cached_tokens < answered
    assert finish(engine, gen) == (SENTENCES[4], "stop")

    # A turn that comes before the engine was idle finds the opening still pending: it is
    # dropped, never read on top of the new prompt.
    held = list(gen.slot.tokens)
    assert gen.slot.ahead == opening
    ahead = engine.stats.prompt_tokens_ahead
    third = [*edited, {"role": "assistant", "content": SENTENCES[4]}, {"role": "user", "content": SENTENCES[5]}]
    gen = engine.open(req("ahead", third), never)
    assert gen.slot.ahead == [] and gen.cached_tokens == len(held)
    assert finish(engine, gen)[1] == "stop"
    assert engine.stats.prompt_tokens_ahead == ahead


def test_an_answer_cut_at_max_tokens_has_its_last_token_and_the_opening_read_ahead(engine):
    while engine.read_ahead():
        pass
    first = echo(SENTENCES[6])
    gen = engine.open(req("ahead-cut", first, 3), never)
    answer, reason = finish(engine, gen)
    assert reason == "length" and SENTENCES[6].startswith(answer)
    slot = gen.slot
    answered = len(slot.tokens)  # the prompt and the first two answer tokens: the third was never read
    assert engine.read_ahead()
    assert len(slot.tokens) == answered + 1 + len(engine._template.next_turn_opening())
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": SENTENCES[7]}]
    gen = engine.open(req("ahead-cut", second), never)
    assert gen.cached_tokens == len(slot.tokens) == answered + 6
    assert finish(engine, gen) == (SENTENCES[7], "stop")


def test_each_step_costs_the_fewest_micro_batches_and_every_answer_is_as_alone(engine):
    """With a KV stream per slot, llama.cpp makes one micro-batch (a pass over the weights) per run
    of consecutive sequence ids, in row order (core/engines/batching.py). Follow-ups that come back
    to their threads' scattered slots, in no particular order, beside new threads: every step is
    written in the cheapest order, its sequence ids consecutive, and costs what the engine counts."""
    from core.engines.batching import micro_batches

    def followup(i: int) -> list[dict[str, str]]:
        return [*echo(SENTENCES[i]), {"role": "assistant", "content": SENTENCES[i]},
                {"role": "user", "content": SENTENCES[(i + 3) % 8]}]

    expected = {i: alone(engine, req(f"mb-alone-{i}", followup(i), 40)) for i in range(8)}
    expected |= {8 + i: alone(engine, req(f"mb-alone-new-{i}", echo(SENTENCES[i]), 40)) for i in (0, 2)}
    assert all(expected[i] == SENTENCES[(i + 3) % 8] for i in range(8))
    run_together(engine, [req(f"mb-{i}", echo(SENTENCES[i]), 40) for i in range(8)])
    slot_of = {s.owner.chat: s.seq_id for s in engine._slots if s.owner is not None}
    # The threads whose slots are every other one come back, latest slot first.
    back = sorted((i for i in range(8) if slot_of.get(f"mb-{i}", 0) % 2 == 1), key=lambda i: -slot_of[f"mb-{i}"])
    assert len(back) >= 3
    requests = [req(f"mb-{i}", followup(i), 40) for i in back]
    requests += [req(f"mb-new-{i}", echo(SENTENCES[i]), 40) for i in (0, 2)]
    want = [expected[i] for i in back] + [expected[8], expected[10]]
    moves = engine.stats.slot_moves

    gens = [engine.open(r, never) for r in requests]
    # The follow-ups found their threads' tokens (more than the first turn's prompt).
    assert all(g.cached_tokens > 70 for g in gens[:len(back)]), [g.cached_tokens for g in gens]
    texts = [""] * len(gens)
    steps = 0
    while not all(g.done for g in gens):
        streaming = any(not g.done and not g.reading for g in gens)
        engine.step(gens)
        steps += 1
        batch = engine._batch.batch
        rows = [batch.seq_id[i][0] for i in range(engine.stats.last_batch)]
        count = engine.stats.last_micro_batches
        assert count == micro_batches(rows, engine.n_batch)
        assert count == micro_batches(sorted(rows), engine.n_batch), rows  # no cheaper order of these rows
        if len(rows) == len(set(rows)):  # every sequence decodes one token: one pass
            assert count == 1, rows
        elif streaming:  # a prompt read beside answers that stream: one more pass at most
            assert count <= 2, rows
        for k, g in enumerate(gens):
            texts[k] += "".join(c.text for c in g.out)
            g.out.clear()
    assert texts == want
    assert engine.stats.slot_moves > moves  # scattered slots were brought together
