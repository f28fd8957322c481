"""Benchmark (issue 28, item 4): how many generations answering bursts as one turn saves.

Counts, not timings. A seeded workload of chat users: each asks ``--questions`` questions, tens
of seconds apart; a share of the questions (``--burst-share``, 35 % by default: the peers' issue
threads describe people who "send a question in three quick lines") are typed as 2-4 lines,
the gaps between the lines drawn from a log-normal around 0.8 s (some past 2 s: a slow typist's
lines fall apart into two turns, as they do in botd). Each message is then gathered exactly as
:class:`bots.bursts.Bursts` does: one sender's lines join while each comes within ``debounce_s``
of the previous, a burst closes at :data:`~bots.bursts.MAX_PIECES` lines or after
:data:`~bots.bursts.MAX_SPAN` x ``debounce_s``. Printed per ``debounce_s``: messages, generations
(turns answered), generations saved, and questions split in two (lines that came too slowly) or
merged across questions (never, with questions tens of seconds apart).

    .venv/bin/python bench/bench_bursts.py [--users 500] [--questions 6] [--burst-share 0.35] [--seed 28]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bots.bursts import MAX_PIECES, MAX_SPAN


def workload(users: int, questions: int, burst_share: float, seed: int) -> list[list[tuple[float, int]]]:
    """Per user: (arrival time in s, question number) of each message, in order."""
    rng = random.Random(seed)
    out = []
    q_id = 0
    for _ in range(users):
        t = rng.uniform(0, 60)
        msgs: list[tuple[float, int]] = []
        for _ in range(questions):
            lines = rng.choices([2, 3, 4], weights=[50, 35, 15])[0] if rng.random() < burst_share else 1
            for i in range(lines):
                if i:
                    t += rng.lognormvariate(-0.22, 0.55)  # median 0.8 s; about 5 % past 2 s
                msgs.append((t, q_id))
            q_id += 1
            t += rng.uniform(20, 120)  # reading the answer, thinking, typing the next question
        out.append(msgs)
    return out


def turns(msgs: list[tuple[float, int]], debounce_s: float) -> list[list[int]]:
    """The turns one user's messages become: each a list of question numbers (one per line)."""
    if debounce_s <= 0:
        return [[q] for _, q in msgs]
    out: list[list[int]] = []
    start = last = -1e9
    for t, q in msgs:
        joins = out and t - last <= debounce_s and len(out[-1]) < MAX_PIECES and t <= start + MAX_SPAN * debounce_s
        if joins:
            out[-1].append(q)
        else:
            out.append([q])
            start = t
        last = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--burst-share", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=28)
    args = ap.parse_args()
    load = workload(args.users, args.questions, args.burst_share, args.seed)
    messages = sum(len(m) for m in load)
    n_questions = args.users * args.questions
    print(f"{args.users} users, {n_questions} questions, {messages} messages "
          f"({args.burst_share:.0%} of questions sent as 2-4 lines; seed {args.seed})")
    print(f"{'debounce_s':>10} {'generations':>12} {'saved':>7} {'saved %':>8} {'split':>6} {'merged across':>14}")
    for debounce in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0):
        all_turns = [turn for msgs in load for turn in turns(msgs, debounce)]
        gens = len(all_turns)
        saved = messages - gens
        across = sum(1 for turn in all_turns if len(set(turn)) > 1)
        # A question answered in more than one turn: its lines came too slowly to be read as one.
        per_q: dict[int, int] = {}
        for turn in all_turns:
            for q in set(turn):
                per_q[q] = per_q.get(q, 0) + 1
        split = sum(1 for n in per_q.values() if n > 1)
        mark = "  <- default" if debounce == 1.5 else ""
        print(f"{debounce:>10.1f} {gens:>12} {saved:>7} {saved / messages:>8.1%} {split:>6} {across:>14}{mark}")


if __name__ == "__main__":
    main()
