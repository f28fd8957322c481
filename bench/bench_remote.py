"""Benchmark: the remote engine's overhead — llama-server streamed through botd versus the same
llama-server asked directly.

One run, one llama.cpp ``llama-server`` (one slot), the same prompts, ``max_tokens`` and
sampling (greedy) for both sides:

- direct: ``POST {llama-server}/v1/chat/completions`` with ``stream: true``;
- botd:   ``botd run`` as a separate process with ``[model] engine = "openai"`` pointed at that
  llama-server, ``POST /v1/chat/completions`` with ``stream: true`` over real HTTP. botd's path
  includes everything it does per request: the prompt's token count (llama-server's
  /apply-template + /tokenize), the queue, the worker and its remote stream, the SSE re-send.

Rounds alternate direct/botd (and which goes first) so that machine noise hits both alike.
Each request's user message is new (a number in front) and the pair of a round has the same
topic, so llama-server's prompt cache reuses the same prefix (the system prompt) for both.
Printed: time to first token (request sent -> first content piece received) and decode rate
(completion tokens after the first / time from the first to the last piece), medians, and
the ratios.

Goal: botd/direct decode tokens/s >= 0.97 and time-to-first-token overhead <= 30 ms.

The model: the Qwen2.5-0.5B-shaped file (bench/qwen_shaped.py) when it is in bench/.cache
(closer to a real deployment), else the embedded SmolLM2-135M; ``--model`` picks another.
llama-server: bench/.cache/llama-server-build/bin/llama-server, built first if absent (see
bench/bench_concurrency.py; ~5-10 minutes on 2 cores, once).

    .venv/bin/python bench/bench_remote.py [--rounds 8] [--max-tokens 128] [--threads 2] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import qwen_shaped  # noqa: E402
from bench_concurrency import LLAMA_SERVER_BIN, build_llama_server, free_port  # noqa: E402

from core.config import embedded_model_path  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and accurately."
TOPICS = ["the sea", "mountains", "a lighthouse keeper", "the moon", "a small village", "rivers",
          "a clockmaker", "winter", "a library", "trains", "bees", "the desert"]
SEED = 1
TOP_P = 1.0
# No proxy from the environment: both servers are on 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def prompt(i: int, side: int) -> list[dict[str, str]]:
    """Round ``i``'s messages for ``side`` (0 direct, 1 botd): the same topic, a number of its own
    (three digits, so the same token count) so that nothing past the system prompt is cached."""
    n = 100 + 2 * i + side
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{n}. Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]


def stream(url: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int, int]:
    """One streamed answer: (time to first token s, decode tokens/s, completion tokens, prompt tokens)."""
    body = json.dumps({"messages": messages, "stream": True, "stream_options": {"include_usage": True},
                       "max_tokens": max_tokens, "temperature": 0.0, "top_p": TOP_P, "seed": SEED}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    pieces = 0
    usage: dict = {}
    with OPENER.open(req, timeout=600) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("error"):
                raise RuntimeError(f"{url}: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces += 1
    if first is None:
        raise RuntimeError(f"{url}: no text in the answer")
    n = int(usage.get("completion_tokens") or pieces)
    rate = (n - 1) / (last - first) if last > first else float("nan")
    return first - t0, rate, n, int(usage.get("prompt_tokens") or 0)


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with OPENER.open(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.2)
    return False


def tail(log: Path, n: int = 15) -> str:
    return "\n  ".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server -t and -tb")
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama-server -c (one slot) and botd's n_ctx")
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the Qwen2.5-0.5B-shaped file if built, "
                    "else the embedded SmolLM2-135M)")
    args = ap.parse_args()

    if args.model:
        model = args.model.resolve()
    elif qwen_shaped.model_path().exists():
        model = qwen_shaped.model_path()
    else:
        model = embedded_model_path()
        print(f"(the Qwen2.5-0.5B-shaped file is not built, {qwen_shaped.model_path().name}: "
              "using the embedded model; `.venv/bin/python bench/qwen_shaped.py` builds it)")
    binary = LLAMA_SERVER_BIN if LLAMA_SERVER_BIN.exists() else build_llama_server()
    if binary is None:
        print("llama-server is not built and cannot be built here", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="botd-bench-remote-"))
    server = botd = None
    try:
        # llama-server: one slot (one stream at a time, as each side sends), prompt cache on (its default).
        srv_port = free_port()
        srv_log = work / "llama-server.log"
        srv_args = ["-t", str(args.threads), "-tb", str(args.threads), "-np", "1", "-c", str(args.n_ctx)]
        server = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(srv_port),
                                   *srv_args, "--no-webui", "--offline", "--seed", str(SEED)],
                                  stdout=srv_log.open("w"), stderr=subprocess.STDOUT)
        direct = f"http://127.0.0.1:{srv_port}"
        if not wait_http(f"{direct}/health", server, 300):
            print(f"llama-server did not start:\n  {tail(srv_log)}", file=sys.stderr)
            return 1

        port = free_port()
        botd_log = work / "botd.log"
        (work / "config.toml").write_text(
            f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\nlog_level = "warning"\n'
            f'[model]\nengine = "openai"\nbase_url = "{direct}/v1"\nn_ctx = {args.n_ctx}\n'
            f"max_tokens = {args.max_tokens}\ntemperature = 0.0\ntop_p = {TOP_P}\nseed = {SEED}\n"
            f"max_concurrent = 1\ntimeout_s = 600\n"
            f'[bots.assistant]\nsystem_prompt = "{SYSTEM}"\n'
        )
        botd = subprocess.Popen([sys.executable, "-m", "bots.cli", "run", "--config", str(work / "config.toml")],
                                cwd=REPO, stdout=botd_log.open("w"), stderr=subprocess.STDOUT)
        via = f"http://127.0.0.1:{port}"
        if not wait_http(f"{via}/healthz", botd, 120):
            print(f"botd did not start:\n  {tail(botd_log)}", file=sys.stderr)
            return 1

        urls = (f"{direct}/v1/chat/completions", f"{via}/v1/chat/completions")
        # Warm-up of both paths (first-call costs, the system prompt into llama-server's cache).
        for side in (0, 1):
            stream(urls[side], prompt(99, side), 16)

        rows: list[list[tuple[float, float, int, int]]] = [[], []]
        for i in range(args.rounds):
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                rows[side].append(stream(urls[side], prompt(i, side), args.max_tokens))

        def med(side: int, k: int) -> float:
            return statistics.median(r[k] for r in rows[side])

        d_ttft, b_ttft = med(0, 0) * 1000, med(1, 0) * 1000
        d_tps, b_tps = med(0, 1), med(1, 1)
        print(f"model: {model.name}   llama-server: {' '.join(srv_args)}   max_tokens: {args.max_tokens}   "
              f"rounds: {args.rounds}")
        print(f"per answer (median): completion tokens direct {med(0, 2):.0f}, botd {med(1, 2):.0f}; "
              f"prompt tokens direct {med(0, 3):.0f}, botd {med(1, 3):.0f}")
        print(f"{'':24}{'direct llama-server':>22}{'through botd':>18}{'botd vs direct':>17}")
        print(f"{'time to first token':24}{d_ttft:>19.1f} ms{b_ttft:>15.1f} ms{b_ttft - d_ttft:>+14.1f} ms")
        print(f"{'decode tokens/s':24}{d_tps:>22.1f}{b_tps:>18.1f}{b_tps / d_tps:>16.3f}x")
        ok_tps = b_tps >= 0.97 * d_tps
        ok_ttft = b_ttft - d_ttft <= 30
        print(f"goal botd/direct tokens/s >= 0.97: {'met' if ok_tps else 'NOT met'}; "
              f"time-to-first-token overhead <= 30 ms: {'met' if ok_ttft else 'NOT met'}")
    finally:
        stop(botd)
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
