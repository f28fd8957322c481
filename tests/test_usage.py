"""Usage per bot and day (bots/usage.py): counters in a real Redis, bounded by days, the median
and p95 from the bucketed latencies, and the per-bot Prometheus metrics. (The console's page and
its roles, with answers through the real daemon: tests/test_usage_console.py.)"""

from __future__ import annotations

import time

from bots import usage
from bots.usage import BUCKETS_MS, UsageStore, quantile, summary
from core import metrics

DAY = 86400.0


def test_quantiles_from_buckets() -> None:
    counts = [0] * (len(BUCKETS_MS) + 1)
    assert quantile(counts, 0.5) is None
    counts[usage.bucket_of(80)] = 50  # 50..100 ms
    counts[usage.bucket_of(4000)] = 50  # 3000..5000 ms
    assert 50 <= quantile(counts, 0.5) <= 100  # type: ignore[operator]
    assert 3000 <= quantile(counts, 0.95) <= 5000  # type: ignore[operator]
    counts[-1] = 1000  # above the last bound
    assert quantile(counts, 0.95) == BUCKETS_MS[-1]


async def test_counters_per_bot_and_day_bounded(manager) -> None:
    store = UsageStore(manager, "botd")
    now = time.time()
    for i in range(20):
        await store.answered("hr", complete=True, tokens_in=100, tokens_out=10, ttft_ms=40 + i * 10, wait_ms=5,
                             now=now)
    await store.answered("hr", complete=False, tokens_in=50, tokens_out=0, ttft_ms=None, wait_ms=9000, now=now)
    await store.refused("hr", now=now)
    await store.answered("hr", complete=True, tokens_in=1, tokens_out=1, ttft_ms=10, wait_ms=1, now=now - 2 * DAY)
    await store.answered("it", complete=True, tokens_in=7, tokens_out=3, ttft_ms=10, wait_ms=1, now=now)
    # 31 days ago: outside the 30 days shown.
    await store.answered("hr", complete=True, tokens_in=999, tokens_out=999, ttft_ms=10, wait_ms=1, now=now - 31 * DAY)

    days = await store.days(["hr", "it"], now=now)
    hr = days["hr"]
    assert len(hr) == usage.DAYS and hr[-1].day == usage.day_of(now)
    today = hr[-1].to_json()
    assert (today["answers"], today["errors"], today["refusals"]) == (20, 1, 1)
    assert (today["tokens_in"], today["tokens_out"]) == (2050, 200)
    assert 40 <= today["ttft_p50_ms"] <= 300 and today["ttft_p95_ms"] >= today["ttft_p50_ms"]
    assert today["wait_p95_ms"] <= 50 and hr[-1].wait[usage.bucket_of(9000)] == 1  # 1 of 21: above p95
    assert hr[-3].answers == 1
    s = summary(days, {"hr"})
    assert set(s["bots"]) == {"hr"} and s["total"]["tokens_in"] == 2051  # not the 31-day-old one, not it's
    # Bounded: every key expires after the window.
    keys = [k async for k in manager.client.scan_iter(match="botd:usage:*")]
    ttls = [await manager.client.ttl(k) for k in keys]
    assert keys and all(0 < t <= (usage.DAYS + 1) * DAY for t in ttls)


async def test_prometheus_metrics_labelled_by_bot(manager) -> None:
    store = UsageStore(manager, "botd")
    before = metrics.REGISTRY.get_sample_value("botd_bot_answers_total", {"bot": "sales", "outcome": "refused"}) or 0
    await store.refused("sales")
    await store.answered("sales", complete=True, tokens_in=12, tokens_out=3, ttft_ms=200, wait_ms=30)
    assert metrics.REGISTRY.get_sample_value("botd_bot_answers_total",
                                             {"bot": "sales", "outcome": "refused"}) == before + 1
    assert metrics.REGISTRY.get_sample_value("botd_bot_tokens_total", {"bot": "sales", "kind": "out"}) >= 3
    assert metrics.REGISTRY.get_sample_value("botd_bot_time_to_first_token_seconds_count", {"bot": "sales"}) >= 1
    text = metrics.render()[0].decode()
    assert 'botd_bot_queue_wait_seconds_bucket{bot="sales"' in text
