"""Benchmark (issue 26, item 6, goal (d)): answers that quote, with and without drafting from the prompt.

The real engine in this process (no daemon: what differs is the engine's steps), the embedded
SmolLM2-135M by default (a model with real weights: random weights never quote). Two kinds of
answer, both at temperature 0:

- a knowledge answer that copies a ~40-token passage of its source (the passage is in the
  user's turn, as retrieved documents are, and the bot repeats it);
- a follow-up whose answer repeats a code and a sentence from the thread's history.

Each is decoded with drafting on (``[model] draft_tokens``) and off, rounds alternating, one user
at a time and then ``--users`` at once (drafting turns itself off while more than two answers
stream, so eight users must come out no slower). Printed: decode tokens/s on and off, the ratio
(goal: one user >= 1.5, eight users >= 0.98), the engine's guessed and accepted tokens, and
whether every text was the same with and without drafting (it must be). Beside each ratio, the
same ratio per second of this process's CPU time (less disturbed by other work on the box; the
wall-clock ratio is the goal's).

    .venv/bin/python bench/bench_drafting.py [--rounds 3] [--users 8] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.messages import ThreadKey

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

PASSAGES = [
    "Employees may carry over up to five days of unused leave into the next year, but those days must be taken "
    "before the end of March or they are lost.",
    "Travel is booked through the company portal at least two weeks ahead, and trains are preferred to flights for "
    "any journey shorter than six hundred kilometres.",
    "Invoices above ten thousand euros need the signature of a director and a purchase order number before the "
    "finance team can pay them.",
    "The north warehouse in Rotterdam opens at seven in the morning and closes at six in the evening on every "
    "working day of the week.",
    "A new laptop is ordered by your manager through the IT desk, and it arrives at the office within five "
    "working days of the order.",
    "Overtime is paid at one and a half times the normal rate, and it must be approved by your manager before "
    "the work is done.",
    "Parking spaces in the basement are given to staff who live more than thirty kilometres away or who work "
    "night shifts.",
    "The canteen serves lunch from half past eleven until two, and a hot meal costs four euros with a staff "
    "badge.",
]
CODES = ["INV-2024-88317-ZX", "PO-7731-KLM-0042", "TKT-55190-RTM-7", "HR-2025-0917-AB",
         "IT-44821-LPT-93", "FIN-3308-DIR-12", "PRK-0071-B2-NS", "CAN-1130-HOT-4"]
SHOTS = [{"role": "user", "content": "the dog ran home"}, {"role": "assistant", "content": "the dog ran home"},
         {"role": "user", "content": "a bird sang in the tree"},
         {"role": "assistant", "content": "a bird sang in the tree"}]


def quote(i: int) -> list[dict[str, str]]:
    """The bot answers from a retrieved passage by repeating it."""
    return [{"role": "system", "content": "You repeat the user's sentence exactly."}, *SHOTS,
            {"role": "user", "content": PASSAGES[i % len(PASSAGES)]}]


def follow_up(i: int) -> list[dict[str, str]]:
    """A thread whose answer repeats a code and a sentence said earlier in it."""
    code = CODES[i % len(CODES)]
    said = f"Your ticket is {code} and it is handled by the finance team within three working days."
    return [{"role": "system", "content": "You repeat the user's sentence exactly."}, *SHOTS,
            {"role": "user", "content": said}, {"role": "assistant", "content": said},
            {"role": "user", "content": f"Again please: {said}"}]


def run(engine: LlamaCppEngine, prompts: list[list[dict[str, str]]], drafting: bool, tag: str,
        max_tokens: int) -> tuple[float, int, list[str], float]:
    """Decode ``prompts`` together; (decode tokens/s from the first token to the last, tokens, texts,
    the same tokens per second of this process's CPU time: a figure a busy box disturbs less)."""
    engine.drafting = drafting
    gens = [engine.open(GenerationRequest(ThreadKey("bench", "draft", f"{tag}-{k}"), p, max_tokens,
                                          temperature=0.0, repeat_penalty=1.1, seed=1), lambda: False)
            for k, p in enumerate(prompts)]
    texts = [""] * len(gens)
    first, made, cpu = None, 0, 0.0
    while not all(g.done for g in gens):
        engine.step(gens)
        if first is None and any(g.produced for g in gens):
            first, made, cpu = time.perf_counter(), sum(g.produced for g in gens), time.process_time()
        for k, g in enumerate(gens):
            texts[k] += "".join(c.text for c in g.out)
            g.out.clear()
    end, cpu_end = time.perf_counter(), time.process_time()
    tokens = sum(g.produced for g in gens)
    engine.drafting = True
    assert first is not None
    return (tokens - made) / max(end - first, 1e-9), tokens, texts, (tokens - made) / max(cpu_end - cpu, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or embedded_model_path()
    engine = LlamaCppEngine(model, n_ctx=2048, n_threads=args.threads, n_batch=512, parallel=args.users,
                            cache_mb=64)
    engine.load()
    print(f"model {model.name}, {args.threads} threads, {args.rounds} rounds, draft_tokens {engine.draft_tokens}",
          flush=True)
    same = True
    results = []
    try:
        for label, make in (("quotes a passage", quote), ("repeats a code from history", follow_up)):
            for users in (1, args.users):
                on, off, on_cpu, off_cpu = [], [], [], []
                before = (engine.stats.draft_tokens, engine.stats.draft_accepted)
                for r in range(args.rounds):
                    prompts = [make(r * users + u) for u in range(users)]
                    # Each round both ways, in turn first: the box's speed drifts.
                    order = (True, False) if r % 2 == 0 else (False, True)
                    got = {}
                    # Both runs find the prompts read (a first token of each, drafting off): what is
                    # timed is the answers, not which run read the prompts.
                    run(engine, prompts, False, f"{label[:6]}-{users}-{r}-warm", 1)
                    for drafting in order:
                        got[drafting] = run(engine, prompts, drafting, f"{label[:6]}-{users}-{r}-{drafting}",
                                            args.max_tokens)
                    on.append(got[True][0])
                    off.append(got[False][0])
                    on_cpu.append(got[True][3])
                    off_cpu.append(got[False][3])
                    if got[True][2] != got[False][2]:
                        same = False
                        print(f"  TEXT DIFFERS ({label}, {users} users, round {r + 1}):\n    on:  {got[True][2]}\n"
                              f"    off: {got[False][2]}")
                guessed = engine.stats.draft_tokens - before[0]
                accepted = engine.stats.draft_accepted - before[1]
                ratio = statistics.median(on) / statistics.median(off)
                cpu_ratio = statistics.median(on_cpu) / statistics.median(off_cpu)
                goal = 1.5 if users == 1 else 0.98
                results.append((label, users, statistics.median(on), statistics.median(off), ratio, goal,
                                guessed, accepted, cpu_ratio))
                print(f"  {label}, {users} user(s): drafting {statistics.median(on):.1f} tokens/s, without "
                      f"{statistics.median(off):.1f}: {ratio:.2f} (goal >= {goal}); per CPU second {cpu_ratio:.2f}; "
                      f"{accepted} of {guessed} guessed tokens accepted", flush=True)
        print()
        print("(d) answer | users | tokens/s with drafting | without | ratio | goal | ratio per CPU second | "
              "guessed -> accepted")
        for label, users, a, b, ratio, goal, guessed, accepted, cpu_ratio in results:
            print(f"{label:28s} | {users:5d} | {a:22.1f} | {b:7.1f} | {ratio:5.2f} | >= {goal} | {cpu_ratio:20.2f} | "
                  f"{guessed} -> {accepted}  {'MET' if ratio >= goal else 'NOT MET'}")
        print(f"identical text with and without drafting, temperature 0: {'yes' if same else 'NO'}")
    finally:
        engine.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
