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

# Passages of 32-45 tokens (the goal's ~40), as a knowledge answer would copy them. The model does
# not always copy word for word: each run says which answers were the passage itself, and the ratio
# is given for those ("answers that quote") and for all of them.
PASSAGES = [
    "Employees may carry over up to five days of unused leave into the next year, but those days must be taken "
    "before the end of March of that year or they are lost for good, and they cannot be paid out.",
    "Travel is booked through the company portal at least two weeks ahead, and trains are preferred to flights for "
    "any journey shorter than six hundred kilometres, unless the manager agrees in writing.",
    "Invoices above ten thousand euros need the signature of a director and a purchase order number before the "
    "finance team can pay them, and they are paid within thirty days of their date.",
    "The north warehouse in Rotterdam opens at seven in the morning and closes at six in the evening on every "
    "working day of the week, and it is closed on public holidays.",
    "A new laptop is ordered by your manager through the IT desk, and it arrives at the office within five "
    "working days of the order, with the standard software already installed.",
    "Overtime is paid at one and a half times the normal rate, and it must be approved by your manager before "
    "the work is done, or it will not be paid at the end of the month.",
    "Parking spaces in the basement are given to staff who live more than thirty kilometres away or who work "
    "night shifts, and each space is marked with a number on the floor.",
    "The canteen serves lunch from half past eleven until two in the afternoon, and a hot meal costs four euros "
    "with a staff badge or six euros without one.",
    "Visitors sign in at the front desk on the ground floor, wear a visitor badge at all times, and are met there "
    "by the colleague they have come to see before they go upstairs.",
    "Expense claims are filed in the finance portal within sixty days of the purchase, with a photo of every "
    "receipt, and they are paid with the next monthly salary.",
    "The office network password is changed every ninety days, must be at least twelve characters long, and may "
    "not repeat any of the last five passwords you have used.",
    "Fire drills take place on the first Monday of every quarter at ten in the morning, and everyone leaves the "
    "building by the nearest stairs, never by the lifts.",
    "Meeting rooms are booked in the calendar for at most two hours at a time, and a booking that is not used "
    "within fifteen minutes of its start is released for others.",
    "New staff receive their badge, laptop and accounts on their first morning from the IT desk, and they meet "
    "their manager and their buddy before lunch on that day.",
]
CODES = ["INV-2024-88317-ZX", "PO-7731-KLM-0042", "TKT-55190-RTM-7", "HR-2025-0917-AB",
         "IT-44821-LPT-93", "FIN-3308-DIR-12", "PRK-0071-B2-NS", "CAN-1130-HOT-4"]
_SHOT_1 = ("The library on the second floor lends books for three weeks, and a book can be renewed twice online "
           "unless another reader has reserved it.")
_SHOT_2 = ("Printers on every floor print in black and white by default, and colour printing needs a code from the "
           "office manager, who keeps a list of the codes given.")
SYSTEM = {"role": "system", "content": "You repeat the user's text exactly, word for word."}
SHOTS = [{"role": "user", "content": _SHOT_1}, {"role": "assistant", "content": _SHOT_1},
         {"role": "user", "content": _SHOT_2}, {"role": "assistant", "content": _SHOT_2}]


def quote(i: int) -> list[dict[str, str]]:
    """The bot answers from a retrieved passage by repeating it."""
    return [SYSTEM, *SHOTS, {"role": "user", "content": PASSAGES[i % len(PASSAGES)]}]


def follow_up(i: int) -> list[dict[str, str]]:
    """A thread whose answer repeats a code and a sentence said earlier in it."""
    code = CODES[i % len(CODES)]
    said = f"Your ticket is {code} and it is handled by the finance team within three working days."
    return [SYSTEM, *SHOTS, {"role": "user", "content": said}, {"role": "assistant", "content": said},
            {"role": "user", "content": f"Again please: {said}"}]


def quoted(messages: list[dict[str, str]], text: str) -> bool:
    """Whether the answer is the last user turn's text, word for word."""
    return text.strip() == messages[-1]["content"].removeprefix("Again please: ").strip()


def run(engine: LlamaCppEngine, prompts: list[list[dict[str, str]]], drafting: bool, tag: str,
        max_tokens: int, repeat_penalty: float) -> tuple[int, float, list[str], float]:
    """Decode ``prompts`` together; (tokens after the first, seconds from the first token to the
    last, texts, CPU seconds of this process over the same stretch: less disturbed by other work)."""
    engine.drafting = drafting
    gens = [engine.open(GenerationRequest(ThreadKey("bench", "draft", f"{tag}-{k}"), p, max_tokens,
                                          temperature=0.0, repeat_penalty=repeat_penalty, seed=1), lambda: False)
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
    return tokens - made, end - first, texts, cpu_end - cpu


class Tally:
    """Tokens and seconds with and without drafting, over all answers and over those that quote."""

    def __init__(self) -> None:
        self.sums: dict[tuple[bool, bool], list[float]] = {(d, q): [0.0, 0.0, 0.0] for d in (True, False)
                                                            for q in (True, False)}

    def add(self, drafting: bool, quotes: bool, tokens: int, seconds: float, cpu: float) -> None:
        for q in {False, quotes}:  # (drafting, False) counts every answer
            row = self.sums[drafting, q]
            row[0] += tokens
            row[1] += seconds
            row[2] += cpu

    def rate(self, drafting: bool, quotes: bool, cpu: bool = False) -> float:
        tokens, seconds, cpu_seconds = self.sums[drafting, quotes]
        return tokens / max(cpu_seconds if cpu else seconds, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --users answers (one user: every passage "
                                                          "once a round)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--repeat-penalty", type=float, default=1.0,
                    help="1.0 (default): a quote repeats words by nature, and botd's default 1.1 makes this "
                         "small model drift off the passage")
    args = ap.parse_args()
    model = args.model or embedded_model_path()
    engine = LlamaCppEngine(model, n_ctx=2048, n_threads=args.threads, n_batch=512, parallel=args.users,
                            cache_mb=64)
    engine.load()
    print(f"model {model.name}, {args.threads} threads, {args.rounds} rounds, draft_tokens {engine.draft_tokens}, "
          f"temperature 0, repeat_penalty {args.repeat_penalty}", flush=True)
    same = True
    results = []
    try:
        for label, make in (("quotes a passage", quote), ("repeats a code from history", follow_up)):
            for users in (1, args.users):
                tally = Tally()
                before = (engine.stats.draft_tokens, engine.stats.draft_accepted)
                answers = quoting = 0
                rounds = args.rounds * (len(PASSAGES) if users == 1 and make is quote else 1)
                for r in range(rounds):
                    prompts = [make(r * users + u) for u in range(users)]
                    # Each round both ways, in turn first: the box's speed drifts.
                    order = (True, False) if r % 2 == 0 else (False, True)
                    got = {}
                    # Both runs find the prompts read (a first token of each, drafting off): what is
                    # timed is the answers, not which run read the prompts.
                    run(engine, prompts, False, f"{label[:6]}-{users}-{r}-warm", 1, args.repeat_penalty)
                    for drafting in order:
                        got[drafting] = run(engine, prompts, drafting, f"{label[:6]}-{users}-{r}-{drafting}",
                                            args.max_tokens, args.repeat_penalty)
                    texts = got[False][2]
                    quotes = all(quoted(p, t) for p, t in zip(prompts, texts, strict=True))
                    answers += len(prompts)
                    quoting += sum(quoted(p, t) for p, t in zip(prompts, texts, strict=True))
                    for drafting in (True, False):
                        tokens, seconds, _, cpu = got[drafting]
                        tally.add(drafting, quotes, tokens, seconds, cpu)
                    if got[True][2] != got[False][2]:
                        same = False
                        print(f"  TEXT DIFFERS ({label}, {users} users, round {r + 1}):\n    on:  {got[True][2]}\n"
                              f"    off: {got[False][2]}")
                guessed = engine.stats.draft_tokens - before[0]
                accepted = engine.stats.draft_accepted - before[1]
                goal = 1.5 if users == 1 else 0.98
                for quotes in (True, False):
                    if tally.sums[True, quotes][1] == 0:
                        continue
                    on, off = tally.rate(True, quotes), tally.rate(False, quotes)
                    cpu_ratio = tally.rate(True, quotes, cpu=True) / tally.rate(False, quotes, cpu=True)
                    which = "word for word" if quotes else "all answers"
                    results.append((label, users, which, on, off, on / off, goal, guessed, accepted, cpu_ratio))
                    print(f"  {label}, {users} user(s), {which}: drafting {on:.1f} tokens/s, without {off:.1f}: "
                          f"{on / off:.2f} (goal >= {goal}); per CPU second {cpu_ratio:.2f}", flush=True)
                print(f"    {quoting} of {answers} answers were the passage word for word; {accepted} of {guessed} "
                      "guessed tokens accepted", flush=True)
        print()
        print("(d) answer | users | which | tokens/s with drafting | without | ratio | goal | ratio per CPU second | "
              "guessed -> accepted")
        for label, users, which, a, b, ratio, goal, guessed, accepted, cpu_ratio in results:
            print(f"{label:28s} | {users:5d} | {which:13s} | {a:22.1f} | {b:7.1f} | {ratio:5.2f} | >= {goal} | "
                  f"{cpu_ratio:20.2f} | {guessed} -> {accepted}  {'MET' if ratio >= goal else 'NOT MET'}")
        print(f"identical text with and without drafting, temperature 0: {'yes' if same else 'NO'}")
    finally:
        engine.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
