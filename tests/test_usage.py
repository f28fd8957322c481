"""Usage per bot and day (bots/usage.py): counters in a real Redis, bounded by days, the median
and p95 from the bucketed latencies, and the per-bot Prometheus metrics. (The console's page and
its roles, with answers through the real daemon: tests/test_usage_console.py.)"""

from __future__ import annotations

import asyncio
import re
import time

from bots import eval as botd_eval
from bots import usage
from bots.usage import BUCKETS_MS, UsageStore, quantile, summary
from core import metrics
from tests.helpers import running_daemon, wait_for
from tests.test_console import _ready, _signing_key, browsers
from tests.test_unanswered import quality_config

__all__ = ["_signing_key"]  # the autouse fixture: the console's signing key in the environment

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
    assert (metrics.REGISTRY.get_sample_value("botd_bot_tokens_total", {"bot": "sales", "kind": "out"}) or 0) >= 3
    assert (metrics.REGISTRY.get_sample_value("botd_bot_time_to_first_token_seconds_count",
                                              {"bot": "sales"}) or 0) >= 1
    text = metrics.render()[0].decode()
    assert 'botd_bot_queue_wait_seconds_bucket{bot="sales"' in text


# -- the console's usage and eval pages, through the real daemon ----------------------------------------

async def test_department_sees_its_own_usage_and_eval_runs(tmp_path, redis_server):
    cfg = quality_config(tmp_path, redis_server.url)
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan", "vera", "") as (alice, ivan, vera, anon):
        await wait_for(lambda: _ready(api), timeout=90)
        assert (await alice.chat("hr", "What is the parental leave bonus?", max_tokens=6))[0] == 200
        assert (await alice.chat("hr", "How do I book a meeting room?"))[0] == 200  # refused: no document
        assert (await ivan.chat("it", "How often does the VPN password rotate?", max_tokens=6))[0] == 200

        async def counted() -> bool:
            t = (await alice.get("/api/usage"))[1]["total"]
            return t["answers"] + t["errors"] == 1 and t["refusals"] == 1

        await wait_for(counted, timeout=20)
        status, u = await alice.get("/api/usage")
        assert status == 200 and set(u["bots"]) == {"hr"} and len(u["days"]) == usage.DAYS
        today = u["bots"]["hr"]["days"][-1]
        assert today["tokens_in"] > 0 and today["tokens_out"] > 0 and today["ttft_p50_ms"] is not None
        assert today["wait_p50_ms"] is not None and today["refusals"] == 1
        # Another department's bot: 403; no login: 401; a viewer of every bot sees both.
        assert (await alice.get("/api/usage?bot=it"))[0] == 403
        assert (await alice.get("/usage?bot=it"))[0] == 403
        assert (await anon.get("/api/usage"))[0] == 401
        for page in ("/unanswered", "/usage", "/eval", "/export"):  # no login: to the login page
            status, _ = await anon.get(page)
            assert status == 302, page
        for endpoint in ("/api/eval?bot=hr", "/api/eval/run?bot=hr&run=x", "/api/unanswered.csv", "/api/export"):
            assert (await anon.get(endpoint))[0] == 401, endpoint
        assert (await anon.post("/api/eval/case", csrf=False, json={"bot": "hr", "q": "x?"}))[0] == 401
        assert set((await ivan.get("/api/usage"))[1]["bots"]) == {"it"}
        assert {"hr", "it"} <= set((await vera.get("/api/usage"))[1]["bots"])
        status, html = await alice.get("/usage")
        assert status == 200 and 'id="chart-answers"' in html and "<rect" in html and ">it<" not in html
        # Prometheus, labelled by bot.
        async with alice.http.get(api.base + "/metrics") as r:
            text = await r.text()
        assert 'botd_bot_answers_total{bot="hr",outcome="refused"}' in text
        assert 'botd_bot_time_to_first_token_seconds_count{bot="it"}' in text
        # A vote through the bots' feedback desk (as every platform's buttons come in): counted by bot.
        from core.feedback import AnswerFacts, FeedbackEvent, Vote

        await api.daemon.runtime.feedback.record_answer(AnswerFacts("v1", "hr", ("hr",), "web", "", "c", "", "u",
                                                                    "q?", "a."))
        desk = api.daemon.service.feedback_desk

        async def votes() -> dict[str, float]:
            # The counters live in this process's registry: other tests' votes may be in them already.
            async with alice.http.get(api.base + "/metrics") as r:
                text = await r.text()
            found = dict(re.findall(r'^botd_bot_feedback_total\{bot="hr",vote="(\w+)"\} ([0-9.]+)$', text, re.M))
            return {v: float(found.get(v, 0)) for v in ("up", "down")}

        before = await votes()
        for vote in (Vote.DOWN, Vote.DOWN, Vote.UP):  # the same vote twice counts once; a changed one again
            await desk.handle(FeedbackEvent("web", "", "c", "u", "v1", vote))
        after = await votes()
        assert after["down"] - before["down"] == 1 and after["up"] - before["up"] == 1, (before, after)
        assert (await alice.get("/api/usage"))[1]["total"]["up"] == 1

        # botd eval's saved runs: a run, then one where a document went missing.
        def result(q: str, hit: bool) -> botd_eval.Result:
            return botd_eval.Result(q, hit, hit, False, True, ["1850"] if hit else [], [] if hit else ["1850"], 120,
                                    "answer", [])

        first = botd_eval.Run("hr", "eval.toml", "smollm2", "2026-12-01T10:00:00Z",
                              [result("bonus?", True), result("leave?", True)])
        botd_eval.save_run(cfg, first)
        await asyncio.sleep(1.1)  # the saved names hold the second
        botd_eval.save_run(cfg, botd_eval.Run("hr", "eval.toml", "smollm2", "2026-12-02T10:00:00Z",
                                              [result("bonus?", False), result("leave?", True)]))
        botd_eval.save_run(cfg, botd_eval.Run("it", "eval.toml", "smollm2", "2026-12-02T10:00:00Z",
                                              [result("IT secret vpn?", True)]))
        status, runs = await alice.get("/api/eval?bot=hr")
        assert status == 200 and [r["started"] for r in runs["runs"]] == ["2026-12-02T10:00:00Z",
                                                                          "2026-12-01T10:00:00Z"]
        assert (runs["runs"][0]["worse"], runs["runs"][0]["better"]) == (1, 0)
        status, run = await alice.get(f"/api/eval/run?bot=hr&run={runs['runs'][0]['name']}")
        assert status == 200 and {r["q"]: r["change"] for r in run["results"]} == {"bonus?": "worse",
                                                                                   "leave?": "same"}
        assert "hit@1" in run["results"][0]["worse_in"]
        assert (await alice.get("/api/eval?bot=it"))[0] == 403
        assert (await alice.get("/eval?bot=it"))[0] == 403
        it_run = (await ivan.get("/api/eval?bot=it"))[1]["runs"][0]["name"]
        assert (await alice.get(f"/api/eval/run?bot=it&run={it_run}"))[0] == 403
        assert (await alice.get("/api/eval/run?bot=hr&run=../../it/x"))[0] == 404
        status, html = await alice.get("/eval?bot=hr")
        assert status == 200 and "bonus?" in html and "change-worse" in html and "IT secret" not in html
