"""/metrics parses with prometheus-client's own parser and its counters match the traffic sent."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeTelegram, serve
from tests.helpers import make_config, running_daemon, wait_for

SECRET = "wh-secret_123"


async def scrape(api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with api.session.get(api.base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_count_the_traffic(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("TG_TOKEN", "123:abc")
    monkeypatch.setenv("TG_SECRET", SECRET)
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = make_config(tmp_path, f"redis://127.0.0.1:{redis_server.port}/0", telegram={"assistant": {
            "token": "env:TG_TOKEN", "mode": "webhook", "webhook_secret": "env:TG_SECRET",
            "api_base": base + "/bot", "edit_interval_private_s": 0.2}}, model={"max_tokens": 16})
        async with running_daemon(cfg) as api:
            before = await scrape(api)
            completion_tokens = 0
            for text in ("One.", "Two.", "Three."):
                completion_tokens += (await api.chat(text))["usage"]["completion_tokens"]
            update = {"update_id": 555, "message": {
                "message_id": 1, "date": int(time.time()), "text": "Hello there",
                "chat": {"id": 42, "type": "private", "first_name": "A"},
                "from": {"id": 42, "is_bot": False, "first_name": "A"}}}
            for _ in range(2):  # Telegram delivers it twice
                status, _, _ = await api.post("/telegram/assistant", update,
                                              headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
                assert status == 200

            async def telegram_answered() -> bool:
                after = await scrape(api)
                return sum(delta(after, before, "botd_messages_total", platform="telegram", outcome=o)
                           for o in ("stop", "length")) == 1

            await wait_for(telegram_answered, timeout=30)
            after = await scrape(api)

    api_answers = sum(delta(after, before, "botd_messages_total", platform="api", outcome=o)
                      for o in ("stop", "length"))
    assert api_answers == 3
    assert delta(after, before, "botd_duplicates_dropped_total", platform="telegram") == 1
    assert delta(after, before, "botd_queue_wait_seconds_count") == 4
    assert delta(after, before, "botd_generation_seconds_count") == 4
    assert delta(after, before, "botd_time_to_first_token_seconds_count") == 4
    assert delta(after, before, "botd_tokens_total", kind="completion") >= completion_tokens + 1
    assert after[("botd_tokens_per_second", ())] > 0
    assert ("botd_queue_depth", ()) in after and ("botd_redis_errors_total", ()) in after
