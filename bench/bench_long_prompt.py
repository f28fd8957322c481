"""Benchmark (issue 26, item 4, goal (e)): a long knowledge prompt arrives while seven answers stream.

The real engine in this process (no daemon: what is measured is how the engine shares its steps;
the daemon's own costs are the same with and without the long prompt), driven as the worker
drives it: one ``step`` over every running answer, again and again. Each round:

- alone: a ~``--prompt-tokens`` knowledge prompt (rules, retrieved notes and a question in the
  user's turn, fresh notes every round so nothing is found read) with nothing else running:
  time to its first token;
- beside seven streams: ``--streams`` answers are streaming (their prompts read, each a few
  tokens in), then the same kind of prompt comes: time to its first token, and every gap
  between two tokens of the seven while it was being read.

Printed: the ratio of the medians of the two first-token times (goal <= 1.5), the p99 of the
streams' gaps over every round (goal <= 250 ms), and the engine's own counters (its last chunk
beside the streams, the budget, and the step costs it fitted: per pass over the weights, per
prompt row, per row with logits, per thousand KV cells attended, per pass per thousand cells
of its longest KV stream; core/engines/step_budget.py). ``--flash-attn off`` runs the engine
without flash attention: on a CPU its kernel makes a small chunk of a prompt far into a long
context cost several times a row of it (measured here: 16 rows at 3,000 tokens 433 ms with it,
225 ms without, one thread), which is what a chunk beside streaming answers is. The trade-off the config sets:
``[model] step_budget_ms`` is the longest a step should take while answers stream; a larger
budget gives the long prompt bigger chunks (first token sooner) and the streams longer gaps.
``--budgets 100,200,400`` prints one row per budget to show it.

The model: by default the Qwen2.5-0.5B-shaped Q4_0 file with random weights (``bench/qwen_shaped.py``,
built once into ``bench/.cache``; its answers never stop early); ``--smollm`` the embedded
SmolLM2-135M; ``--model PATH`` any GGUF.

    .venv/bin/python bench/bench_long_prompt.py                       # ~2-3 min on 2 cores, alone
    .venv/bin/python bench/bench_long_prompt.py --budgets 100,200,400 --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import structlog  # noqa: E402

from core.config import embedded_model_path  # noqa: E402
from core.engines.base import GenerationRequest  # noqa: E402
from core.engines.llamacpp import LlamaCppEngine  # noqa: E402
from core.messages import ThreadKey  # noqa: E402

# The engine's own log lines (llama.cpp's loading chatter) would bury the figures.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

RULES = ("Answer only from the documents below. Say which document each fact comes from. If the documents do "
         "not say, answer that you do not know; never invent a document.")
WORDS = ("leave holiday salary invoice budget travel expense laptop onboarding insurance dental pension "
         "contract overtime bonus parking canteen security password printer office training review "
         "promotion payroll tax receipt meeting project deadline vendor approval manager policy river "
         "garden window morning letter station market bridge harbour engine lantern valley").split()
TOPICS = ["the sea", "mountains", "a lighthouse keeper", "the moon", "a small village", "rivers", "a clockmaker",
          "winter", "a library", "trains", "bees", "the desert"]


def knowledge_prompt(engine: LlamaCppEngine, tokens: int, seed: int) -> list[dict[str, str]]:
    """Rules, then a user turn of retrieved notes and a question, about ``tokens`` tokens in all."""
    assert engine._template is not None
    rng = random.Random(seed)
    notes: list[str] = []
    while True:
        for _ in range(8):
            notes.append(f"[{len(notes) + 1}] handbook.md › section {rng.randint(1, 99)}: "
                         + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 18))) + ".")
        messages = [{"role": "system", "content": RULES},
                    {"role": "user", "content": "Documents:\n" + "\n".join(notes)
                     + f"\n\nQuestion {seed}: how many days of leave do I have after a promotion?"}]
        if len(engine._template.render(messages)[0]) >= tokens:
            return messages


def stream_prompt(i: int, r: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Round {r}: write a long story about {TOPICS[i % len(TOPICS)]}."}]


def request(thread: str, messages: list[dict[str, str]], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(ThreadKey("bench", "long", thread), messages, max_tokens, temperature=0.0,
                             repeat_penalty=1.0, seed=1)


def empty_slots(engine: LlamaCppEngine) -> None:
    for s in engine._slots:
        engine._trim(s, 0)
        s.owner, s.adapters, s.ahead = None, (), []
    engine.cache.clear()


def alone(engine: LlamaCppEngine, messages: list[dict[str, str]], thread: str) -> float:
    empty_slots(engine)
    start = time.perf_counter()
    gen = engine.open(request(thread, messages, 4), lambda: False)
    while not (gen.produced or gen.done):
        engine.step([gen])
    ttft = time.perf_counter() - start
    engine.release(gen)
    return ttft


def within_budget(engine: LlamaCppEngine, messages: list[dict[str, str]], budget_s: float) -> float:
    """The prompt alone, read in chunks that each keep within ``budget_s`` (a chunk that took longer
    halves the next, one that took under half doubles it): no stream runs, so no step budget can
    do better beside streams. The bound that the chunk size alone puts on (e)'s ratio."""
    from core.engines.llamacpp import _put

    empty_slots(engine)
    tokens = engine._template.render(messages)[0]  # type: ignore[union-attr]
    slot, batch = engine._slots[0], engine._batch.batch
    chunk, read = 16, 0
    start = time.perf_counter()
    while read < len(tokens):
        take = min(chunk, len(tokens) - read, engine.n_batch)
        for n in range(take):
            _put(batch, n, slot, tokens[read + n], read + n == len(tokens) - 1)
        batch.n_tokens = take
        began = time.perf_counter()
        engine._ctx.decode(engine._batch)
        took = time.perf_counter() - began
        read += take
        if took > budget_s:
            chunk = max(1, chunk // 2)
        elif took < budget_s / 2:
            chunk = min(chunk * 2, engine.n_batch)
    seconds = time.perf_counter() - start
    empty_slots(engine)
    return seconds


def beside(engine: LlamaCppEngine, messages: list[dict[str, str]], thread: str, streams: int, r: int,
           warm_tokens: int) -> tuple[float, list[float]]:
    """Time to the long prompt's first token while ``streams`` answers stream, and the streams'
    gaps between tokens meanwhile."""
    empty_slots(engine)
    stop = {"now": False}
    gens = [engine.open(request(f"{thread}-s{i}", stream_prompt(i, r), engine.n_ctx // 2), lambda: stop["now"])
            for i in range(streams)]
    while min(g.produced for g in gens) < warm_tokens:  # every stream is running
        engine.step(gens)
    last = {id(g): time.perf_counter() for g in gens}
    made = {id(g): g.produced for g in gens}
    gaps: list[float] = []
    start = time.perf_counter()
    long = engine.open(request(thread, messages, 4), lambda: False)
    running = [*gens, long]
    while not (long.produced or long.done):
        engine.step(running)
        now = time.perf_counter()
        for g in gens:
            g.out.clear()
            if g.produced > made[id(g)]:
                gaps.append(now - last[id(g)])
                last[id(g)], made[id(g)] = now, g.produced
    ttft = time.perf_counter() - start
    stop["now"] = True
    engine.step(running)  # the stop check ends them
    for g in running:
        if not g.done:
            engine.release(g)
    return ttft, gaps


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the Qwen2.5-0.5B-shaped Q4_0 file)")
    ap.add_argument("--smollm", action="store_true", help="the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prompt-tokens", type=int, default=3000)
    ap.add_argument("--streams", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm-tokens", type=int, default=4, help="tokens each stream has made before the prompt comes")
    ap.add_argument("--budgets", default="200", help="[model] step_budget_ms values, comma-separated")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="[model] flash_attn (auto: llama.cpp decides, on for a CPU)")
    args = ap.parse_args()
    if args.smollm:
        model = embedded_model_path()
    elif args.model:
        model = args.model
    else:
        import qwen_shaped

        model = qwen_shaped.build()
    budgets = [float(b) for b in args.budgets.split(",")]
    engine = LlamaCppEngine(model, n_ctx=4096, n_threads=args.threads, n_batch=args.n_batch,
                            parallel=args.streams + 1, cache_mb=64, step_budget_ms=budgets[0],
                            flash_attn={"auto": None, "on": True, "off": False}[args.flash_attn])
    engine.load()
    engine.share_prefixes = False  # the prompts share nothing worth copying; keep both runs alike
    try:
        n_prompt = len(engine._template.render(knowledge_prompt(engine, args.prompt_tokens, 0))[0])  # type: ignore[union-attr]
        print(f"model {model.name}, {args.threads} threads, n_batch {args.n_batch}, flash_attn {args.flash_attn}, "
              f"a {n_prompt}-token prompt, {args.streams} streams, {args.rounds} rounds", flush=True)
        seed = 1
        rows = []
        for budget in budgets:
            engine._budget.budget_s = budget / 1000
            alone_t, beside_t, gaps, bound_t = [], [], [], []
            for r in range(args.rounds):
                alone_t.append(alone(engine, knowledge_prompt(engine, args.prompt_tokens, seed), f"alone-{seed}"))
                seed += 1
                bound_t.append(within_budget(engine, knowledge_prompt(engine, args.prompt_tokens, seed), budget / 1000))
                seed += 1
                ttft, g = beside(engine, knowledge_prompt(engine, args.prompt_tokens, seed), f"beside-{seed}",
                                 args.streams, r, args.warm_tokens)
                seed += 1
                beside_t.append(ttft)
                gaps += g
                print(f"  budget {budget:.0f} ms, round {r + 1}: first token alone {alone_t[-1]:.2f} s, alone in "
                      f"chunks within the budget {bound_t[-1]:.2f} s, "
                      f"beside {args.streams} streams {ttft:.2f} s; streams' longest gap {max(g) * 1000:.0f} ms",
                      flush=True)
            state = engine.state()
            ratio = statistics.median(beside_t) / statistics.median(alone_t)
            bound = statistics.median(bound_t) / statistics.median(alone_t)
            rows.append((budget, ratio, p99(gaps), statistics.median(alone_t), statistics.median(beside_t),
                         state["prompt_chunk_last"], state["prompt_token_ms"], bound))
            print(f"  the engine's fitted step costs: {state['step_pass_ms']:.1f} ms a pass, "
                  f"{state['prompt_token_ms']:.2f} ms a prompt row, {state['logits_row_ms']:.2f} ms a row with logits, "
                  f"{state['attention_kcell_ms']:.2f} ms per 1k cells attended, {state['pass_kcell_ms']:.2f} ms a pass "
                  "per 1k cells of its longest KV stream", flush=True)
        print()
        print("step_budget_ms | first token beside ÷ alone (goal <= 1.5) | streams' p99 gap (goal <= 250 ms) "
              "| alone, beside (s) | last chunk, ms/prompt token | bound: alone in chunks within the budget ÷ alone")
        for budget, ratio, gap, a, b, chunk, per, bound in rows:
            verdict = "MET" if ratio <= 1.5 and gap <= 0.25 else "NOT MET"
            print(f"{budget:14.0f} | {ratio:40.2f} | {gap * 1000:30.0f} ms | {a:6.2f}, {b:6.2f} | "
                  f"{chunk:5d}, {per:.3f} | {bound:.2f}  -> (e) {verdict}")
        print("bound: with no stream running at all, reading the prompt in chunks that each keep within the budget "
              "already takes this many times as long as reading it alone in full batches (small chunks deep in a "
              "long prompt cost more per token); beside streams the ratio cannot be lower.")
        print("trade-off: a larger step_budget_ms reads the long prompt in bigger chunks (its first token sooner) "
              "and makes the running answers wait longer between tokens.")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
