"""Benchmark (issue 26, item 5, goal (f)): a new thread's first turn copies its bot's system turn.

One bot with a system prompt of ``--system-tokens`` tokens (persona and instructions) on the
real engine (this process, no daemon: what differs between the turns is the engine's work; the
daemon's own costs are the same for every turn). Printed, all from the same run and engine:

- a follow-up turn in a thread (it reads only its new turn: the thread's KV state is kept);
- a new thread's first turn, with the bot's shared prefix copied into its slot;
- the baseline: the same new-thread first turn with sharing off and nothing in the slots, so
  the system turn is read (what every new thread cost before).

Time to first token, median of ``--rounds`` rounds. Goal (f): new thread ÷ follow-up ≤ 1.5.

    .venv/bin/python bench/bench_shared_prefix.py [--system-tokens 1000] [--rounds 5] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.messages import ThreadKey

RULES = [
    "You are the help desk assistant of the Northwind logistics company.",
    "You answer employees' questions about shipping, invoices, holidays, travel and the office.",
    "Be brief and polite, answer in the language of the question, and never promise refunds.",
    "Warehouses: Rotterdam (north gate, badge 4), Lyon (loading bay C), Gdansk (dock 7), Porto (gate 2).",
    "Office hours are eight to five on weekdays; the canteen closes at two; the library at six.",
    "Escalate anything about salaries to human resources and anything about security to the IT desk.",
    "Invoices above ten thousand euros need the signature of a director and a purchase order number.",
    "Travel is booked through the portal at least two weeks ahead; trains are preferred below 600 km.",
]
QUESTIONS = ["Where do I pick up a parcel in Lyon?", "Who signs a large invoice for me?",
             "When does the canteen close today?", "How early must I book a train to Gdansk?",
             "What badge opens the Rotterdam north gate?", "Can I promise a customer a refund?",
             "Who do I ask about my salary slip?", "Is the library open at five?"]
FOLLOW_UPS = ["And what about the one in Porto?", "What if the director is away this week?",
              "And on Saturdays, is it open?", "Is a flight allowed instead of the train?",
              "And for the loading bay in Lyon?", "What should I say to the customer then?",
              "And about my holiday balance?", "And the office, when does it close?"]


def system_prompt(engine: LlamaCppEngine, tokens: int) -> str:
    """Rules repeated and numbered until the system turn has about ``tokens`` tokens."""
    assert engine._template is not None
    lines: list[str] = []
    while True:
        lines.append(f"{len(lines) + 1}. {RULES[len(lines) % len(RULES)]}")
        text = "\n".join(lines)
        if len(engine._template.render([{"role": "system", "content": text}])[0]) >= tokens:
            return text


def first_token(engine: LlamaCppEngine, thread: str, messages: list[dict[str, str]],
                max_tokens: int = 24) -> tuple[float, str, int]:
    """Seconds to the first sampled token, the whole answer, and the prompt tokens found read."""
    request = GenerationRequest(ThreadKey("bench", "desk", thread), messages, max_tokens, temperature=0.0, seed=1)
    start = time.perf_counter()
    gen = engine.open(request, lambda: False)
    ttft = None
    text = ""
    while not gen.done:
        engine.step([gen])
        if ttft is None and (gen.produced or gen.done):
            ttft = time.perf_counter() - start
        text += "".join(c.text for c in gen.out)
        gen.out.clear()
    while engine.read_ahead():  # what the worker does while idle between turns
        pass
    assert ttft is not None
    return ttft, text, gen.cached_tokens


def empty_slots(engine: LlamaCppEngine) -> None:
    for s in engine._slots:
        engine._trim(s, 0)
        s.owner, s.adapters, s.ahead = None, (), []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=8)
    args = ap.parse_args()
    model = args.model or embedded_model_path()
    engine = LlamaCppEngine(model, n_ctx=4096, n_threads=args.threads, n_batch=512, parallel=args.parallel,
                            cache_mb=256)
    engine.load()
    try:
        system = system_prompt(engine, args.system_tokens)
        head = [{"role": "system", "content": system}]
        n_sys = len(engine._template.render(head)[0]) if engine._template else 0
        # The bot's first thread ever reads its system turn (and keeps it for the next threads).
        first_ttft, _, _ = first_token(engine, "first", [*head, {"role": "user", "content": QUESTIONS[0]}])
        follow, copied, cold = [], [], []
        copied_tokens, cold_tokens = [], []
        for r in range(args.rounds):
            q = QUESTIONS[(r + 1) % len(QUESTIONS)]
            ask = [*head, {"role": "user", "content": q}]
            # A new thread's first turn: the shared prefix copied into its slot.
            ttft, answer, cached = first_token(engine, f"new-{r}", ask)
            copied.append(ttft)
            copied_tokens.append(cached)
            # Its follow-up: the thread's own KV state.
            more = [*ask, {"role": "assistant", "content": answer},
                    {"role": "user", "content": FOLLOW_UPS[r % len(FOLLOW_UPS)]}]
            follow.append(first_token(engine, f"new-{r}", more)[0])
            # Baseline: the same first turn with nothing to copy (sharing off, slots emptied; the
            # bot's prefix stays in the state cache for the next round).
            engine.share_prefixes = False
            try:
                empty_slots(engine)
                ttft, _, cached = first_token(engine, f"cold-{r}", ask)
            finally:
                engine.share_prefixes = True
            cold.append(ttft)
            cold_tokens.append(cached)
        med = statistics.median
        print(f"model {model.name}, {args.threads} threads, system turn {n_sys} tokens, {args.rounds} rounds")
        print(f"  the bot's first thread (reads the system turn): first token {first_ttft * 1000:.0f} ms")
        print(f"  follow-up turn:                 first token {med(follow) * 1000:7.1f} ms")
        print(f"  new thread, prefix copied:      first token {med(copied) * 1000:7.1f} ms "
              f"(found read: {min(copied_tokens)}-{max(copied_tokens)} tokens)")
        print(f"  new thread, read (baseline):    first token {med(cold) * 1000:7.1f} ms "
              f"(found read: {max(cold_tokens)} tokens)")
        ratio, before = med(copied) / med(follow), med(cold) / med(follow)
        print(f"(f) new thread ÷ follow-up: {ratio:.2f} (goal ≤ 1.5; without the copy: {before:.2f}) "
              f"-> {'MET' if ratio <= 1.5 else 'NOT MET'}")
        print(f"    engine: {engine.stats.shared_prefixes_saved} prefixes saved, "
              f"{engine.stats.shared_prefix_copies} copied")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
