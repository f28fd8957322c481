"""A bot's system turn is read once and copied into each new thread's slot (issue 26 item 5):
the real engine and model, no daemon. The copy is keyed by model, adapter set and the exact
tokens of the system turn, used only as far as the new prompt's tokens agree, and ends where
the first user turn's words begin (retrieved documents live in the user's turn)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bots.prompt import with_rules
from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import SHARED_PREFIX_MIN, LlamaCppEngine
from core.engines.state_cache import common_prefix
from core.messages import ThreadKey
from tests.test_batching import SENTENCES, alone, never, run_together
from tests.test_models_routing import make_lora

# A persona and house rules of a few hundred tokens: what departments' bots carry.
PERSONA = " ".join([
    "You are the help desk assistant of the Northwind logistics company.",
    "You answer employees' questions about shipping, invoices, holidays, travel and the office.",
    "Be brief and polite, answer in the language of the question, and never promise refunds.",
    "Warehouses: Rotterdam (north gate, badge 4), Lyon (loading bay C), Gdansk (dock 7).",
    "Office hours are eight to five on weekdays; the canteen closes at two.",
    "Escalate anything about salaries to human resources and anything about security to the IT desk.",
] * 4)
ECHO = PERSONA + " When the user writes a sentence, you repeat the user's sentence exactly."


def req(thread: str, messages: list[dict[str, str]], adapters=(), max_tokens: int = 40,
        bot: str = "desk") -> GenerationRequest:
    return GenerationRequest(ThreadKey("test", bot, thread), messages, max_tokens, temperature=0.0,
                             repeat_penalty=1.1, seed=7, adapters=adapters)


def echo(system: str, sentence: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
            {"role": "user", "content": sentence}]


def other_bot(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a poet."},
            {"role": "user", "content": f"Write two lines about {topic}."}]


def system_turn(engine: LlamaCppEngine, messages: list[dict[str, str]]) -> int:
    """The tokens of the system turn and the user turn's opening, found by the test itself:
    where two prompts with different first user words part."""
    assert engine._template is not None
    one = engine._template.render([messages[0], {"role": "user", "content": "x"}])[0]
    two = engine._template.render([messages[0], {"role": "user", "content": "y"}])[0]
    return common_prefix(one, two)


def clean(engine: LlamaCppEngine) -> None:
    """Empty every slot and the state cache (shared prefixes included)."""
    for s in engine._slots:
        engine._trim(s, 0)
        s.owner, s.adapters, s.ahead, s.busy = None, (), [], False
    engine.cache.clear()


def take_slots(engine: LlamaCppEngine) -> None:
    """Other threads of another bot use every slot: no slot holds the desk bot's prompt any more."""
    run_together(engine, [req(f"poet-{i}", other_bot(f"topic {i}"), max_tokens=4, bot="poet")
                          for i in range(engine.parallel)])
    assert all(s.owner is not None and s.owner.bot == "poet" for s in engine._slots)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=1024, n_threads=2, n_batch=256, parallel=2, cache_mb=64)
    eng.load()
    yield eng
    eng.close()


def test_a_new_thread_copies_its_bots_system_turn_and_reads_only_its_own_turn(engine):
    clean(engine)
    first = echo(ECHO, SENTENCES[0])
    assert alone(engine, req("alice", first)) == SENTENCES[0]
    assert engine.stats.shared_prefixes_saved >= 1
    take_slots(engine)  # alice's slot went to the poet's threads: only the shared prefix is left

    second = echo(ECHO, SENTENCES[1])
    n_sys = system_turn(engine, second)
    assert n_sys > 300  # the persona is long: reading it again would be most of the prompt
    copies, read = engine.stats.shared_prefix_copies, engine.stats.prompt_tokens_read
    gen = engine.open(req("bob", second), never)
    assert gen.cached_tokens >= n_sys, (gen.cached_tokens, n_sys)
    assert engine.stats.shared_prefix_copies == copies + 1
    text = ""
    while not gen.done:
        engine.step([gen])
        text += "".join(c.text for c in gen.out)
        gen.out.clear()
    assert text == SENTENCES[1]
    # Bob's own turn is all the engine read (the engine's own count).
    assert engine.stats.prompt_tokens_read - read == len(gen.prompt) - gen.cached_tokens
    assert len(gen.prompt) - gen.cached_tokens < len(gen.prompt) - n_sys + 1
    # An admin sees the copies in /metrics.
    from core import metrics

    saved = metrics.ENGINE.source
    metrics.ENGINE.source = engine.state
    try:
        text = metrics.render()[0].decode()
    finally:
        metrics.ENGINE.source = saved
    assert f"botd_engine_shared_prefix_copies_total {float(engine.stats.shared_prefix_copies)}" in text


def test_a_thread_started_while_another_of_its_bot_runs_copies_the_prefix_too(engine):
    clean(engine)
    alone(engine, req("carol", echo(ECHO, SENTENCES[2])))
    # Carol's thread is busy again (her next turn) when Dave's first turn comes: his slot is
    # another one, and gets the prefix copied rather than read.
    follow = [*echo(ECHO, SENTENCES[2]), {"role": "assistant", "content": SENTENCES[2]},
              {"role": "user", "content": SENTENCES[3]}]
    busy = engine.open(req("carol", follow), never)
    gen = engine.open(req("dave", echo(ECHO, SENTENCES[4])), never)
    assert gen.slot is not busy.slot
    assert gen.cached_tokens >= system_turn(engine, echo(ECHO, SENTENCES[4]))
    engine.release(gen)
    engine.release(busy)


def test_temperature_zero_answers_are_the_same_with_and_without_a_copied_prefix(engine):
    threads = [("erin", SENTENCES[5]), ("frank", SENTENCES[6]), ("grace", SENTENCES[7])]

    def answers(share: bool) -> tuple[list[str], int]:
        clean(engine)
        engine.share_prefixes = share
        copies = engine.stats.shared_prefix_copies
        try:
            out = []
            for who, sentence in threads:
                out.append(alone(engine, req(who, echo(ECHO, sentence))))
                take_slots(engine)  # each next thread finds no slot holding the persona
            return out, engine.stats.shared_prefix_copies - copies
        finally:
            engine.share_prefixes = True

    shared, copied = answers(True)
    unshared, none = answers(False)
    assert (copied, none) == (2, 0)
    assert shared == unshared
    assert sum(a == s for a, (_, s) in zip(shared, threads, strict=True)) >= 2  # real answers, not noise


def test_a_prefix_is_never_copied_across_bots_or_adapter_sets(engine, tmp_path):
    clean(engine)
    lora = ((str(make_lora(tmp_path / "lora.gguf")), 1.0),)
    # Another bot whose system prompt differs only in its last words: its own prefix, never the first's.
    other = ECHO.replace("exactly.", "exactly, in capitals.")
    alone(engine, req("henry", echo(ECHO, SENTENCES[0])))
    take_slots(engine)
    copies = engine.stats.shared_prefix_copies
    gen = engine.open(req("iris", echo(other, SENTENCES[1]), bot="capitals"), never)
    assert engine.stats.shared_prefix_copies == copies and gen.cached_tokens < SHARED_PREFIX_MIN
    engine.release(gen)
    # Each entry holds exactly one system turn: the bot's own, under its own adapters.
    keys = [k for k in engine.cache._entries if k[0] == "shared prefix"]
    assert len(keys) == 1 and keys[0][2] == ()

    # The same system prompt under a LoRA adapter set: computed under other weights, never copied.
    clean(engine)
    alone(engine, req("jack", echo(ECHO, SENTENCES[2]), adapters=lora))
    take_slots(engine)
    copies = engine.stats.shared_prefix_copies
    gen = engine.open(req("kate", echo(ECHO, SENTENCES[3])), never)
    assert engine.stats.shared_prefix_copies == copies and gen.cached_tokens < SHARED_PREFIX_MIN
    while not gen.done:  # read whole: the base model's prefix is saved beside the adapter's
        engine.step([gen])
    take_slots(engine)
    gen = engine.open(req("liam", echo(ECHO, SENTENCES[3]), adapters=lora), never)
    assert engine.stats.shared_prefix_copies == copies + 1  # its own set: copied
    assert gen.cached_tokens >= system_turn(engine, echo(ECHO, SENTENCES[3]))
    engine.release(gen)
    assert {k[2] for k in engine.cache._entries if k[0] == "shared prefix"} == {lora, ()}


def test_a_threads_documents_never_reach_another_thread(engine):
    """A knowledge bot: the rules in the system turn are shared; the documents retrieved for one
    department's question (in its user turn) are not part of the copy."""
    clean(engine)
    system = with_rules(PERSONA)
    secret = "The Rotterdam safe code is 7351-KESTREL."

    def asking(docs: str, question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system},
                {"role": "user", "content": f"Documents:\n\n[1] handbook.pdf\n{docs}\n\nQuestion: {question}"}]

    first = asking(secret, "What is the safe code?")
    alone(engine, req("finance", first, max_tokens=8))
    entries = [v for k, v in engine.cache._entries.items() if k[0] == "shared prefix"]
    assert len(entries) == 1
    n_sys = system_turn(engine, first)
    assert len(entries[0].tokens) == n_sys  # exactly the system turn, nothing of the user's turn
    assert "KESTREL" not in engine._model.detokenize(list(entries[0].tokens)).decode(errors="replace")

    take_slots(engine)
    second = asking("Holidays are booked in the HR portal.", "How do I book a holiday?")
    gen = engine.open(req("sales", second, max_tokens=8), never)
    assert gen.cached_tokens == n_sys  # the rules, copied; not one token of the finance documents
    assert gen.slot is not None and gen.slot.tokens == gen.prompt[:n_sys]
    assert "KESTREL" not in engine._model.detokenize(gen.slot.tokens).decode(errors="replace")
    engine.release(gen)
