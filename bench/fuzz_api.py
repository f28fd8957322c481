"""Fuzz the HTTP API for as long as asked: every JSON route, and above all the fields that take a
JSON schema (``tools``, ``tool_choice``, ``tool_calls``), whose schemas become grammars that
llama.cpp parses inside the daemon's own process (issue 25 item 1: one request segfaulted it).

The strategies and checks are tests/test_api_hostile.py's (the test suite runs them with a
short, fixed budget); here they run in fresh random batches until ``--seconds`` are spent,
against one real daemon (the embedded model, a real redis-server, real sockets). A request
passes when it gets a 4xx or an answer: never a 5xx, an SSE server error, an unhandled error
in the log, a crash of the process, or a peak RSS over ``--rss-mb`` during the request (the
peak is reset before each one: Linux's clear_refs).

    .venv/bin/python bench/fuzz_api.py --seconds 300
    .venv/bin/python bench/fuzz_api.py --seconds 3600 --rss-mb 1536 --batch 50

Prints the requests run, their statuses and the highest peak RSS seen; exits 1 at the first
failure, with the request that failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests import test_api_hostile as fuzz  # noqa: E402
from tests.helpers import RedisServer, captured, make_config, running_daemon  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="how long to fuzz (default 300)")
    ap.add_argument("--rss-mb", type=float, default=fuzz.RSS_CEILING_MB,
                    help=f"peak RSS ceiling per request, MB (default {fuzz.RSS_CEILING_MB})")
    ap.add_argument("--batch", type=int, default=40, help="requests per hypothesis run (default 40)")
    args = ap.parse_args()
    fuzz.RSS_CEILING_MB = args.rss_mb

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-daemon", daemon=True)
    thread.start()
    statuses: collections.Counter[str] = collections.Counter()
    peak = 0.0

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    with tempfile.TemporaryDirectory(prefix="botd-fuzz-") as tmp, captured("info") as log:
        redis = RedisServer(Path(tmp))
        redis.start()
        stack = contextlib.AsyncExitStack()
        try:
            os.environ["TEST_BOTD_KEY"] = fuzz.KEY
            cfg = make_config(Path(tmp), redis.url, api={"keys": ["env:TEST_BOTD_KEY"]}, model={"max_tokens": 2})
            api = run(stack.enter_async_context(running_daemon(cfg)))

            async def schema_request(body: dict[str, Any]) -> None:
                await fuzz.check_schema_request(api, log, body)
                statuses["tools"] += 1

            async def any_request(req: Any) -> None:
                await fuzz.check_request(api, log, req)
                statuses["other"] += 1

            @settings(max_examples=args.batch, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(kind=st.sampled_from(["tools", "tools", "tools", "other"]), data=st.data())
            def batch(kind: str, data: st.DataObject) -> None:
                nonlocal peak
                if kind == "tools":
                    body = data.draw(st.one_of(fuzz.HOSTILE_TOOLS, fuzz.HOSTILE_TOOLS, fuzz.GOOD_TOOLS))
                    run(schema_request(body))
                else:
                    run(any_request(data.draw(fuzz.requests())))
                peak = max(peak, fuzz.peak_rss_mb())

            start = time.monotonic()
            rounds = 0
            while time.monotonic() - start < args.seconds:
                try:
                    batch()
                except Exception as exc:  # hypothesis printed the failing example above
                    print(f"FAILED after {sum(statuses.values())} requests: {type(exc).__name__}: {exc}"[:2000])
                    return 1
                rounds += 1
                print(f"{time.monotonic() - start:7.1f} s  requests {sum(statuses.values()):6d} "
                      f"(tools {statuses['tools']}, other {statuses['other']})  peak RSS {peak:.0f} MB", flush=True)
            print(f"OK: {sum(statuses.values())} requests in {time.monotonic() - start:.0f} s, no 5xx, no crash, "
                  f"peak RSS {peak:.0f} MB (ceiling {args.rss_mb:.0f} MB)")
            return 0
        finally:
            run(stack.aclose())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
