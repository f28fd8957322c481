"""Bursts ([queue] debounce_s, on by default) in a cluster: three daemons behind a load balancer
share the work, every message is answered once, and a user's quick lines are one turn.

A message belongs to the daemon that recorded it first (the inbox's one atomic step); bursts
only ever gather that daemon's own messages and hold no lock or lease while they wait. So the
work follows the load balancer: each message's first delivery goes to the next box in turn,
and the platform's retries of it reach the two other boxes while the first is still gathering
its burst (they are dropped as duplicates). Three real ``botd run`` processes, one real
redis-server, the fake Bot API.

(The retry storm in tests/test_cluster.py delivers every message to all three boxes at the
same instant instead: whichever box is scheduled first records nearly all of them, with or
without bursts, so it says nothing about how a load balancer's traffic is shared.)
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.fakes import FakeTelegram, serve
from tests.helpers import wait_for
from tests.test_cluster import Cluster, inbox_empty, platform_env, telegram_update  # noqa: F401 (fixture)
from tests.test_service import post_update

N = 12  # messages of N users, each first delivered to box i % 3
RETRY_AFTER_S = 0.5  # the platform's retry reaches the other boxes within the 1.5 s gathering
LINES = ["My name is Ada.", "I work in sales.", "What is my name?"]
ADA = 777


async def test_bursts_on_three_daemons_share_a_load_balancers_work_and_answer_once(tmp_path, redis_server):
    tg = FakeTelegram()
    r = redis_server.client()
    async with serve(tg.app()) as tgb:
        # [queue] debounce_s is left at its default (1.5 s): bursts on.
        async with Cluster(tmp_path, redis_server.url, 3, tg=tgb, extra="\n[queue]\nnotice_after_s = 0\n") as cluster, \
                aiohttp.ClientSession() as s:
            ports = [d.port for d in cluster.daemons]

            async def deliver(update: dict, first: int) -> list[int]:
                """To box ``first`` now, then (the platform's retry) to the two others."""
                statuses = [await post_update(s, ports[first], update)]
                await asyncio.sleep(RETRY_AFTER_S)
                statuses += await asyncio.gather(*(post_update(s, ports[(first + k) % 3], update) for k in (1, 2)))
                return statuses

            async def ada() -> list[int]:
                """One user's question in three quick lines, all reaching box 0 (and retried elsewhere)."""
                out = []
                for j, line in enumerate(LINES):
                    out.append(asyncio.create_task(deliver(telegram_update(100 + j, line, chat=ADA), 0)))
                    await asyncio.sleep(0.2)
                return [x for got in await asyncio.gather(*out) for x in got]

            results = await asyncio.gather(*(deliver(telegram_update(i), i % 3) for i in range(N)), ada())
            assert {x for got in results for x in got} == {200}
            await wait_for(lambda: inbox_empty(r), timeout=180, interval=0.2)
            await asyncio.sleep(2.0)  # a duplicate, or a piece answered on its own, would come now
            await cluster.stop()
            answered_by = [sum(1 for x in cluster.logs(i) if x.get("event") == "answered") for i in range(3)]
    # Exactly once: one answer per user, Ada's three lines included.
    assert sorted(int(p["chat_id"]) for p in tg.of("sendMessage")) == sorted([9000 + i for i in range(N)] + [ADA])
    assert sum(answered_by) == N + 1, answered_by
    # Shared: every box answered what the load balancer gave it (not one box all, the others idle).
    assert all(answered_by), answered_by
    hist = [json.loads(h) for h in r.lrange(f"botd:hist:telegram:assistant:{ADA}:", 0, -1)]
    assert [h["role"] for h in hist] == ["user", "assistant"], hist
    assert hist[0]["content"] == "\n".join(LINES)
    print("answered by box:", answered_by)
