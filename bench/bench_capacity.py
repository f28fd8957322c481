"""Benchmark (issue 26, goal (h)): how many people one box serves — the figure an admin sizes a box by.

A department's day, replayed against a server: ``N`` users, each sending a message every 60-180 s
(uniform, seeded; ``--time-scale`` shrinks the day: 0.1 makes it 6-18 s), each message either a
new question to a knowledge bot (a new thread: its prompt carries retrieved passages, ~1.5k
tokens, all of it new) or, with probability ``1 - --new-share``, a follow-up in the user's latest
thread (its history kept). A trial runs ``--duration`` seconds of wall time (the answers in
flight at the end are awaited). ``N`` passes when

- follow-ups: p95 time to first token <= 3 s;
- a knowledge thread's cold first turn: p95 time to first token <= 10 s;
- every answer streams at >= 8 tokens/s (its tokens after the first over the time they took);
- nothing is refused or fails.

The largest passing ``N`` is found by doubling from ``--start-n``, then halving the gap. Printed
for each server, side by side in one run, same model file and threads:

- **botd** as a knowledge bot (it retrieves and builds the prompt itself; threads kept server-side
  by ``conversation_id``), ``[model] parallel`` 8;
- **llama-server** ``--parallel 8 --cache-reuse 256`` (prompt cache on) built from the same
  vendored llama.cpp (``bench/bench_concurrency.py --llama-server`` builds it), with a thin client
  that does what botd does for it: picks passages from the same documents by the words they
  share with the question (the bench's own retrieval), puts them in the user's turn, keeps
  each thread's history and sends it whole.

Goal: botd's ``N`` >= 1.5x llama-server's. What a chat daemon has that a generic server lacks
(each thread's KV state kept, shared system prompts, the next turn's opening read while idle)
is what should show.

    .venv/bin/python bench/bench_capacity.py                          # both servers, ~40-60 min on 2 cores
    .venv/bin/python bench/bench_capacity.py --servers botd --max-n 4 --duration 60 --smollm   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import bench_concurrency as bc  # noqa: E402
import qwen_shaped  # noqa: E402

from core.config import embedded_model_path  # noqa: E402

QUESTIONS = ["How many days of {w} do I get?", "Who approves {w} requests?", "What is the rule for {w}?",
             "When is the deadline for {w}?", "Can I claim {w} after a promotion?", "Where do I send {w} forms?"]
FOLLOW_UPS = ["And what if I am part-time?", "Does that hold for contractors too?", "Which section says so?",
              "What about the year after?", "Is there an exception for managers?", "Can you say it shorter?"]
KB_SYSTEM = ("Answer only from the documents given. Say which document each fact comes from. If they do not say, "
             "answer that you do not know.")


@dataclass
class Turn:
    kind: str  # "first": a new knowledge thread; "follow": a follow-up in the user's thread
    ttft: float
    rate: float | None  # tokens/s after the first token; None for a one-token answer
    error: str = ""


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] if ordered else 0.0


class Passages:
    """The documents cut into sections, for the thin client's retrieval."""

    def __init__(self, folder: Path, tok, tokens: int) -> None:
        self.sections: list[tuple[str, set[str]]] = []
        for path in sorted(folder.glob("*.md")):
            for part in path.read_text().split("\n## ")[1:]:
                text = f"{path.name} › {part.strip()}"
                self.sections.append((text, set(text.lower().split())))
        self.tok = tok
        self.tokens = tokens

    def for_question(self, question: str) -> str:
        words = set(question.lower().replace("?", "").split())
        ranked = sorted(self.sections, key=lambda s: -len(words & s[1]))
        picked: list[str] = []
        used = 0
        for text, _ in ranked:
            n = len(self.tok.tokenize(text.encode(), add_bos=False))
            if used + n > self.tokens:
                break
            picked.append(f"[{len(picked) + 1}] {text}")
            used += n
        return "\n\n".join(picked)


async def trial(target: bc.Target, n: int, args: argparse.Namespace, passages: Passages, tag: str) -> list[Turn]:
    """``n`` users for ``--duration`` seconds; every answer's first-token time and rate."""
    rng = random.Random(f"{args.seed}-{n}")
    turns: list[Turn] = []
    end = time.perf_counter() + args.duration
    lo, hi = 60 * args.time_scale, 180 * args.time_scale
    async with bc.Client(target) as client:
        async def user(u: int) -> None:
            urng = random.Random(rng.random())
            await asyncio.sleep(urng.uniform(0, hi))  # users arrive spread over one interval
            thread: list[dict[str, str]] | None = None  # the thin client's history (llama-server)
            conv = ""
            k = 0
            while time.perf_counter() < end:
                word = urng.choice(bc.WORDS)
                new = thread is None or urng.random() < args.new_share
                if new:
                    k += 1
                    conv = f"{tag}-u{u}-t{k}"
                    question = urng.choice(QUESTIONS).format(w=word)
                else:
                    question = urng.choice(FOLLOW_UPS)
                kind = "first" if new else "follow"
                try:
                    if target.server_history:  # botd: retrieval and history are the daemon's
                        reply = await client.chat([{"role": "user", "content": question}], user=f"{tag}-u{u}",
                                                  max_tokens=args.answer_tokens, conversation_id=conv, model="kb")
                    else:
                        if new:
                            thread = [{"role": "system", "content": KB_SYSTEM}]
                        assert thread is not None
                        content = f"Documents:\n{passages.for_question(question)}\n\nQuestion: {question}"
                        thread.append({"role": "user", "content": content})
                        reply = await client.chat(thread, user=f"{tag}-u{u}", max_tokens=args.answer_tokens)
                        thread.append({"role": "assistant", "content": reply.text})
                    rate = ((reply.tokens - 1) / (reply.t_last - reply.t_first)
                            if reply.tokens > 1 and reply.t_first and reply.t_last and reply.t_last > reply.t_first
                            else None)
                    turns.append(Turn(kind, reply.ttft, rate))
                except Exception as exc:  # a refusal or a failure fails the trial; the user goes on
                    turns.append(Turn(kind, 0.0, None, str(exc)[:200]))
                if thread is None and target.server_history:
                    thread = []  # botd: only marks that the user has a thread to follow up in
                await asyncio.sleep(urng.uniform(lo, hi))

        await asyncio.gather(*(user(u) for u in range(n)))
    return turns


def verdict(turns: list[Turn], args: argparse.Namespace) -> tuple[bool, str]:
    errors = [t for t in turns if t.error]
    first = [t.ttft for t in turns if t.kind == "first" and not t.error]
    follow = [t.ttft for t in turns if t.kind == "follow" and not t.error]
    rates = [t.rate for t in turns if t.rate is not None]
    slowest = min(rates) if rates else 0.0
    ok = (not errors and bool(first) and p95(first) <= args.first_p95 and (not follow or p95(follow) <= args.follow_p95)
          and slowest >= args.min_rate)
    text = (f"{len(turns)} turns ({len(first)} cold first, {len(follow)} follow-ups, {len(errors)} failed); "
            f"p95 first token: cold first {p95(first):.2f} s, follow-ups {p95(follow):.2f} s; slowest stream "
            f"{slowest:.1f} tokens/s")
    if errors:
        text += f"; first failure: {errors[0].error}"
    return ok, text


def capacity(target: bc.Target, args: argparse.Namespace, passages: Passages) -> int:
    """The largest N that passes (0: not even one user)."""
    results: dict[int, bool] = {}

    def run(n: int) -> bool:
        if n not in results:
            turns = asyncio.run(trial(target, n, args, passages, f"cap-{target.name}-{n}"))
            ok, text = verdict(turns, args)
            results[n] = ok
            bc.say(f"  {target.name}, N = {n}: {'pass' if ok else 'FAIL'}: {text}")
        return results[n]

    n = args.start_n
    if not run(n):
        while n > 1 and not run(n // 2):
            n //= 2
        return n // 2 if n > 1 else 0
    good = n
    while good * 2 <= args.max_n and run(good * 2):
        good *= 2
    bad = good * 2
    if bad > args.max_n:
        return good
    while bad - good > max(1, good // 8):  # to within an eighth
        mid = (good + bad) // 2
        if run(mid):
            good = mid
        else:
            bad = mid
    return good


def main() -> int:
    # `timeout` and Ctrl-C alike: leave through the finally blocks, which stop botd and llama-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the Qwen2.5-0.5B-shaped Q4_0 file)")
    ap.add_argument("--smollm", action="store_true", help="the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=8, help="botd [model] parallel; llama-server --parallel")
    ap.add_argument("--docs", type=int, default=20, help="documents in the knowledge base")
    # botd's own budget for a question's documents is [retrieval] context_tokens (1024 by default, not set
    # here): the thin client fills the same budget, so that both servers read prompts of the same size.
    ap.add_argument("--kb-tokens", type=int, default=1024,
                    help="the thin client's retrieved passages, in tokens (botd's [retrieval] context_tokens)")
    ap.add_argument("--answer-tokens", type=int, default=96)
    ap.add_argument("--new-share", type=float, default=0.5, help="share of messages that start a knowledge thread")
    ap.add_argument("--time-scale", type=float, default=0.1, help="60-180 s between a user's messages, times this")
    ap.add_argument("--duration", type=float, default=180, help="seconds of each trial")
    ap.add_argument("--start-n", type=int, default=4)
    ap.add_argument("--max-n", type=int, default=64)
    ap.add_argument("--first-p95", type=float, default=10.0)
    ap.add_argument("--follow-p95", type=float, default=3.0)
    ap.add_argument("--min-rate", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--servers", default="botd,llama-server", help="which to measure, comma-separated")
    args = ap.parse_args()
    # bench_concurrency's helpers read these.
    args.users, args.cache_mb = args.parallel, None
    model = embedded_model_path() if args.smollm else args.model or qwen_shaped.build()
    import llama_cpp

    with bc.quiet_fds():
        tok = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    work = Path(tempfile.mkdtemp(prefix="botd-bench-capacity-"))
    folder = work / "kb-docs"
    bc.write_docs(folder, args.docs, random.Random(args.seed))
    passages = Passages(folder, tok, args.kb_tokens)
    bc.say(f"model {model.name}, {args.threads} threads, parallel {args.parallel}; {args.docs} documents; a message "
           f"every {60 * args.time_scale:.0f}-{180 * args.time_scale:.0f} s per user, {args.new_share:.0%} new "
           f"knowledge threads; {args.duration:.0f} s a trial; goals: p95 first token cold <= {args.first_p95} s, "
           f"follow-ups <= {args.follow_p95} s, every stream >= {args.min_rate} tokens/s")
    found: dict[str, int] = {}
    servers = args.servers.split(",")
    if "botd" in servers:
        botd, _ = bc.start_botd(work, model, args, None, folder)
        try:
            if not bc.wait_http(botd, "/healthz", 300):
                bc.say("botd did not start; its log:\n  " + botd.tail())
                return 1
            asyncio.run(ingest(botd))
            found["botd"] = capacity(botd, args, passages)
        finally:
            botd.stop()
    binary = bc.LLAMA_SERVER_BIN
    if "llama-server" not in servers:
        pass
    elif not binary.exists():
        bc.say("llama-server is not built (bench/bench_concurrency.py --llama-server builds it): skipped")
    else:
        server = start_server(binary, work, model, args)
        try:
            if not bc.wait_http(server, "/health", 300, lambda body: b"ok" in body):
                bc.say("llama-server did not start; its log:\n  " + server.tail())
                return 1
            found["llama-server"] = capacity(server, args, passages)
        finally:
            server.stop()
    bc.say("")
    bc.say("users served within the goals (largest N):")
    for name, n in found.items():
        bc.say(f"  {name}: {n}")
    if "llama-server" in found and "botd" in found:
        ratio = found["botd"] / max(found["llama-server"], 1)
        bc.say(f"(h) botd's N ÷ llama-server's: {ratio:.2f} (goal >= 1.5): {'MET' if ratio >= 1.5 else 'NOT MET'}")
    return 0


async def ingest(botd: bc.Target) -> None:
    """Read the knowledge base in (the admins' ``/kb ingest``) and wait for it to finish."""
    before = await asyncio.to_thread(bc.ingests_done, botd)
    async with bc.Client(botd) as c:
        answer = await c.command("/kb ingest", user="bench-admin", model="kb")
    if "started" not in answer.lower():
        raise RuntimeError(f"/kb ingest answered: {answer!r}")
    t0 = time.perf_counter()
    while await asyncio.to_thread(bc.ingests_done, botd) <= before:
        if time.perf_counter() - t0 > 1800:
            raise RuntimeError("the ingest did not finish in 30 minutes")
        await asyncio.sleep(0.5)
    if await asyncio.to_thread(bc.ingest_failed, botd):
        raise RuntimeError("the ingest failed; see botd's log")
    bc.say(f"knowledge base ingested in {time.perf_counter() - t0:.0f} s")


def start_server(binary: Path, work: Path, model: Path, args: argparse.Namespace) -> bc.Target:
    """llama-server --parallel N --cache-reuse 256, prompt cache on (its default)."""
    import subprocess

    port = bc.free_port()
    log = work / "llama-server.log"
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "-np", str(args.parallel), "-c", str(args.parallel * args.n_ctx), "-b", "512",
           "-ub", "512", "--cache-prompt", "--cache-reuse", "256", "--no-webui", "--offline", "--seed", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    bc.say("llama-server " + " ".join(cmd[1:]))
    return bc.Target("llama-server", f"http://127.0.0.1:{port}", {}, False, proc, log)


if __name__ == "__main__":
    sys.exit(main())
