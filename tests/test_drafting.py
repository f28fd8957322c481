"""Drafting from the prompt inside the batch engine (issue 26 item 6): the real engine and the
embedded SmolLM2 model, which quotes. Guessed tokens are checked in the step that decodes the
sequence anyway; what is asserted is the text (the same with and without drafting) and the
engine's own counters (steps, guessed and accepted tokens), never a timing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.drafting import COOLDOWN, FIRST_GUESS, Drafter
from core.engines.llamacpp import DRAFT_SEQS, LlamaCppEngine
from core.messages import ThreadKey
from tests.test_batching import SENTENCES, never

PASSAGE = ("Employees may carry over up to five days of unused leave into the next year, but those days must be "
           "taken before the end of March or they are lost.")


def quote(thread: str, max_tokens: int = 60) -> GenerationRequest:
    messages = [{"role": "system", "content": "You repeat the user's sentence exactly."},
                {"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
                {"role": "user", "content": "a bird sang in the tree"},
                {"role": "assistant", "content": "a bird sang in the tree"},
                {"role": "user", "content": PASSAGE}]
    return GenerationRequest(ThreadKey("test", "draft", thread), messages, max_tokens, temperature=0.0,
                             repeat_penalty=1.1, seed=7)


def echo(thread: str, sentence: str, max_tokens: int = 40) -> GenerationRequest:
    messages = [{"role": "system", "content": "You repeat the user's sentence exactly."},
                {"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
                {"role": "user", "content": sentence}]
    return GenerationRequest(ThreadKey("test", "draft", thread), messages, max_tokens, temperature=0.0,
                             repeat_penalty=1.1, seed=7)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=1024, n_threads=2, n_batch=256, parallel=4, cache_mb=64)
    eng.load()
    yield eng
    eng.close()


def run(engine: LlamaCppEngine, requests: list[GenerationRequest], drafting: bool,
        stops: list[Callable[[], bool]] | None = None) -> tuple[list[str], int]:
    """The texts of ``requests`` decoded together, and the steps it took."""
    engine.drafting = drafting
    try:
        gens = [engine.open(r, (stops or [never] * len(requests))[i]) for i, r in enumerate(requests)]
        texts = [""] * len(gens)
        steps = 0
        while not all(g.done for g in gens):
            engine.step(gens)
            steps += 1
            for i, g in enumerate(gens):
                texts[i] += "".join(c.text for c in g.out)
                g.out.clear()
        return texts, steps
    finally:
        engine.drafting = True


def test_a_quoted_passage_is_drafted_from_the_prompt_in_fewer_steps_with_the_same_text(engine):
    plain, plain_steps = run(engine, [quote("plain")], drafting=False)
    assert "five days of unused leave into the next year, but those days" in plain[0]  # the model quotes
    before = (engine.stats.draft_tokens, engine.stats.draft_accepted)
    drafted, drafted_steps = run(engine, [quote("drafted")], drafting=True)
    assert drafted == plain
    proposed = engine.stats.draft_tokens - before[0]
    accepted = engine.stats.draft_accepted - before[1]
    assert accepted >= 20 and accepted >= proposed // 2, (proposed, accepted)
    # The answer ends where the passage does: no guess runs on past the end of the user's turn into
    # the template's next opening (guessed rows no one would read; 6 of them before guesses were cut
    # at the first end-of-generation token).
    assert proposed - accepted <= 2, (proposed, accepted)
    # Every accepted guess is a step saved.
    assert drafted_steps <= plain_steps - accepted // 2, (drafted_steps, plain_steps, accepted)
    # An admin sees the guesses and what was accepted in /metrics.
    from core import metrics

    saved = metrics.ENGINE.source
    metrics.ENGINE.source = engine.state
    try:
        text = metrics.render()[0].decode()
    finally:
        metrics.ENGINE.source = saved
    assert f"botd_engine_draft_accepted_total {float(engine.stats.draft_accepted)}" in text
    assert f"botd_engine_draft_tokens_total {float(engine.stats.draft_tokens)}" in text


def test_a_guess_stops_before_the_first_end_of_generation_token(engine):
    eos = engine._model.token_eos()
    words = engine._model.tokenize(b" the next year", add_bos=False, special=False)
    assert engine._before_end([*words, eos, *words]) == words
    assert engine._before_end([eos, *words]) == []
    assert engine._before_end(words) == words


def test_two_sequences_draft_together_and_the_texts_are_as_without(engine):
    requests = [echo("two-a", SENTENCES[0]), echo("two-b", SENTENCES[1])]
    plain, _ = run(engine, requests, drafting=False)
    assert plain == SENTENCES[:2]
    accepted = engine.stats.draft_accepted
    drafted, _ = run(engine, [echo("two-c", SENTENCES[0]), echo("two-d", SENTENCES[1])], drafting=True)
    assert drafted == plain
    assert engine.stats.draft_accepted > accepted


def test_a_sequence_cancelled_mid_draft_leaves_the_other_unchanged(engine):
    steps = {"n": 0}

    def cancel_soon() -> bool:
        steps["n"] += 1
        return steps["n"] > 3

    alone, _ = run(engine, [quote("alone")], drafting=True)
    accepted = engine.stats.draft_accepted
    texts, _ = run(engine, [quote("cancelled"), quote("kept")], drafting=True, stops=[cancel_soon, never])
    assert engine.stats.draft_accepted > accepted  # drafts were made while both ran
    assert texts[1] == alone[0]
    assert alone[0].startswith(texts[0]) and texts[0] != alone[0]
    # The cancelled sequence's slot holds only tokens it really read (no guess left behind).
    for slot in engine._slots:
        if slot.owner is not None and slot.owner.chat == "cancelled":
            assert not slot.busy


def test_drafting_is_off_while_the_batch_is_full_and_on_when_it_empties(engine):
    gens = [engine.open(echo(f"full-{i}", s, 40 if i < 2 else 4), never) for i, s in enumerate(SENTENCES[:4])]
    texts = [""] * 4
    full = emptier = 0
    while not all(g.done for g in gens):
        streaming = sum(1 for g in gens if not g.done and not g.reading)
        reading = any(not g.done and g.reading for g in gens)
        steps = engine.stats.draft_steps
        engine.step(gens)
        if streaming > DRAFT_SEQS or reading:
            full += 1
            assert engine.stats.draft_steps == steps, "guessed while the batch was full or a prompt was read"
        elif engine.stats.draft_steps > steps:
            emptier += 1
        for i, g in enumerate(gens):
            texts[i] += "".join(c.text for c in g.out)
            g.out.clear()
    assert full >= 3 and emptier >= 1, (full, emptier)  # two answers go on after the short ones end
    assert texts[:2] == SENTENCES[:2]


def test_a_grammar_or_a_temperature_keeps_the_text_the_sampler_chooses(engine):
    # At a temperature the sampled tokens follow the same random draws with and without drafting
    # (one draw per token, in order): the text is the same for the same seed.
    def warm(thread: str) -> GenerationRequest:
        r = quote(thread, 40)
        return GenerationRequest(r.thread_key, r.messages, 40, temperature=0.7, repeat_penalty=1.1, seed=11)

    plain, _ = run(engine, [warm("warm-plain")], drafting=False)
    drafted, _ = run(engine, [warm("warm-drafted")], drafting=True)
    assert drafted == plain


def test_the_drafter_guesses_what_followed_and_pauses_when_guesses_fail():
    d = Drafter([1, 2, 3, 4, 5, 1, 2])
    assert d.propose() == [3, 4, 5, 1][:FIRST_GUESS]  # (1, 2) was followed by 3 4 5 ...
    d.extend([3, 9])
    assert d.propose() == []  # (3, 9) and (4, 3, 9) never seen
    d.extend([1, 2, 3])
    assert d.propose(3) == [9, 1, 2]  # the latest earlier (1, 2, 3) was followed by 9
    d.record(3, 3)  # a whole guess accepted: the next may be longer
    assert d.propose() == [9, 1, 2, 3] and d.size == 2 * FIRST_GUESS
    for _ in range(4):  # the guesses fail: the running share accepted falls below the threshold
        d.record(8, 0)
    assert [d.propose() for _ in range(COOLDOWN)] == [[]] * COOLDOWN  # paused
    assert d.propose() == [9]  # then it tries again, one token (what failed guesses shrank it to)
    d.record(1, 1)
    assert d.propose() == [9, 1] and (d.proposed, d.accepted) == (3 + 4 * 8 + 1, 4)


def test_the_config_key_turns_drafting_off_and_bad_values_are_refused():
    from pydantic import ValidationError

    from core.config import ModelConfig
    from core.engines import create_engine

    assert create_engine(ModelConfig()).drafting  # type: ignore[attr-defined]
    engine = create_engine(ModelConfig(draft_tokens=0))
    assert not engine.drafting  # type: ignore[attr-defined]
    for bad in (-1, 33, 1000):
        with pytest.raises(ValidationError, match="draft_tokens"):
            ModelConfig(draft_tokens=bad)
    with pytest.raises(ValidationError, match='only read by engine = "llama_cpp"'):
        ModelConfig(engine="openai", base_url="http://127.0.0.1:1/v1", draft_tokens=4)
