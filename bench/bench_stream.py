"""Benchmark: raw llama-cpp-python versus the same model streamed through botd's HTTP API.

One run, same model, prompts, thread count and token budget for both sides:

- raw:  ``Llama.create_chat_completion(stream=True)`` in this process;
- botd: ``botd run`` as a separate process, ``POST /v1/chat/completions`` with
  ``stream: true`` over real HTTP, read as server-sent events.

Rounds alternate raw/botd so that machine noise hits both alike. Each round uses a new
user message (the shared system prompt may be reused from the KV cache on both sides).
Printed: time to first token (request sent -> first content token received) and decode
rate (tokens after the first / time from the first to the last), medians, and the ratios.

Goal: botd within 5 % of raw on tokens/s and within 30 ms on time to first token.

    .venv/bin/python bench/bench_stream.py [--rounds 8] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.config import embedded_model_path  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and accurately."
TOPICS = ["the sea", "mountains", "a lighthouse keeper", "the moon", "a small village", "rivers",
          "a clockmaker", "winter", "a library", "trains", "bees", "the desert"]


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_raw(llm, i: int, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_chat_completion(prompt(i), stream=True, max_tokens=max_tokens, temperature=0.0):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    return first - t0, (n - 1) / (last - first), n


def run_botd(port: int, i: int, max_tokens: int) -> tuple[float, float, int]:
    body = json.dumps({"messages": prompt(i), "stream": True, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            obj = json.loads(line[6:])
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return first - t0, (n - 1) / (last - first), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()

    import llama_cpp

    model = embedded_model_path()
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="botd-bench-"))
    (work / "config.toml").write_text(
        f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\nlog_level = "warning"\n'
        f"[model]\nn_ctx = {args.n_ctx}\nn_threads = {args.threads}\nmax_tokens = {args.max_tokens}\n"
        f"temperature = 0.0\nrepeat_penalty = 1.0\n"
        f'[bots.assistant]\nsystem_prompt = "{SYSTEM}"\n'
    )
    botd = subprocess.Popen([sys.executable, "-m", "bots.cli", "run", "--config", str(work / "config.toml")],
                            cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or botd.poll() is not None:
                    print("botd did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)

        llm = llama_cpp.Llama(str(model), n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                              verbose=False)
        # warm-up both sides (page in the weights, first-call costs)
        run_raw(llm, 99, 16)
        run_botd(port, 99, 16)

        raw, via = [], []
        for i in range(args.rounds):
            raw.append(run_raw(llm, i, args.max_tokens))
            via.append(run_botd(port, i, args.max_tokens))

        def med(rows, k):
            return statistics.median(r[k] for r in rows)

        raw_ttft, via_ttft = med(raw, 0) * 1000, med(via, 0) * 1000
        raw_tps, via_tps = med(raw, 1), med(via, 1)
        print(f"model: {model.name}   threads: {args.threads}   max_tokens: {args.max_tokens}   rounds: {args.rounds}")
        print(f"tokens per run (median): raw {med(raw, 2):.0f}, botd {med(via, 2):.0f}")
        print(f"{'':24}{'raw llama-cpp-python':>22}{'botd HTTP stream':>20}{'botd vs raw':>14}")
        print(f"{'time to first token':24}{raw_ttft:>19.1f} ms{via_ttft:>17.1f} ms{via_ttft - raw_ttft:>+11.1f} ms")
        print(f"{'decode tokens/s':24}{raw_tps:>22.1f}{via_tps:>20.1f}{via_tps / raw_tps:>13.3f}x")
        ok_tps = via_tps >= 0.95 * raw_tps
        ok_ttft = via_ttft - raw_ttft <= 30
        print(f"goal tokens/s within 5%: {'met' if ok_tps else 'NOT met'}; "
              f"time to first token within 30 ms: {'met' if ok_ttft else 'NOT met'}")
    finally:
        botd.send_signal(signal.SIGTERM)
        botd.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
