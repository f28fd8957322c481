"""The quality pages in a real browser (headless Chromium driven by Playwright, as in
tests/test_console_browser.py), against the real daemon, model and Redis, in English and in
Chinese: the unanswered questions grouped with the one-click test case, usage with its charts,
the eval runs with their diff, the export form's download. Screenshots go to ``screenshots/``
(BOTD_SCREENSHOTS names another folder); the ones in docs/images/ were taken by this test.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from bots import eval as botd_eval
from tests.helpers import running_daemon, wait_for
from tests.test_console import _ready, _signing_key, browsers
from tests.test_console_browser import SHOTS, chromium, expect, login
from tests.test_unanswered import PARKING, ROOM, ROOM_ZH, quality_config

__all__ = ["_signing_key"]  # the autouse fixture: the console's signing key in the environment


DOWN = ["Is the parental leave bonus taxed?", "Is the parental leave bonus subject to income tax?"]


async def _shot(page, name: str) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"quality-{name}.png"), full_page=True)


async def _seed(api, cfg) -> None:
    """Two weeks of usage (the real store, back-dated) and two saved eval runs, for the pictures."""
    store = api.daemon.service.answers.quality.usage
    now = time.time()
    for day in range(14):
        for i in range(3 + (day * 7) % 11):
            await store.answered("hr", complete=i % 9 != 8, tokens_in=600 + 40 * i, tokens_out=80 + 9 * i,
                                 ttft_ms=180 + 35 * ((i + day) % 9), wait_ms=20 + 150 * (i % 4),
                                 now=now - day * 86400)
        for _ in range(day % 3):
            await store.refused("hr", now=now - day * 86400)

    # Votes on answers (the feedback store, as the platforms' buttons record them), two rated down.
    from core.feedback import AnswerFacts, Vote

    feedback = api.daemon.runtime.feedback
    for day in range(14):
        for i in range(2 + day % 4):
            answer, q = f"seed-{day}-{i}", DOWN[day % 2] if i == 3 else "Who approves parental leave?"
            await feedback.record_answer(AnswerFacts(answer, "hr", ("hr",), "web", "", "c", "", "u", q, "a.",
                                                     at=now - day * 86400))
            await feedback.vote(answer, "u", Vote.DOWN if i == 3 else Vote.UP)
    for i, q in enumerate(DOWN):
        await feedback.record_answer(AnswerFacts(f"down-{i}", "hr", ("hr",), "web", "", "c", "", "u", q, "No."))
        await feedback.vote(f"down-{i}", "u", Vote.DOWN)

    def result(q: str, hit: bool, facts: bool) -> botd_eval.Result:
        return botd_eval.Result(q, hit, hit, False, True, ["1850"] if facts else [], [] if facts else ["1850"],
                                640, "answer", [])

    qs = ["What is the parental leave bonus?", "育儿假奖金是多少？", "Who approves parental leave?"]
    botd_eval.save_run(cfg, botd_eval.Run("hr", "docs/hr/eval.toml", "SmolLM2-135M", "2026-12-05T09:00:00Z",
                                          [result(q, True, True) for q in qs]))
    await asyncio.sleep(1.1)
    botd_eval.save_run(cfg, botd_eval.Run("hr", "docs/hr/eval.toml", "SmolLM2-135M", "2026-12-06T09:00:00Z",
                                          [result(qs[0], False, False), result(qs[1], True, True),
                                           result(qs[2], True, True)]))


async def test_quality_pages_in_chromium_in_both_languages(tmp_path, redis_server):
    cfg = quality_config(tmp_path, redis_server.url)
    async with running_daemon(cfg) as api, browsers(api, "alice") as (alice,), chromium() as browser:
        await wait_for(lambda: _ready(api), timeout=90)
        for q in ROOM + ROOM_ZH + PARKING[:2] + ["Can I bring my dog to the office?"]:
            assert (await alice.chat("hr", q))[0] == 200
        # An answered question (stored in the conversation; refusals are not): for the export.
        assert (await alice.chat("hr", "What is the parental leave bonus?", max_tokens=6))[0] == 200
        await _seed(api, cfg)
        base = api.base + "/console"

        for lang, locale in (("en", "en-US"), ("zh", "zh-CN")):
            context = await browser.new_context(viewport={"width": 1100, "height": 760}, locale=locale,
                                                accept_downloads=True)
            page = await login(context, api.base, "alice")
            await page.goto(base + "/unanswered")
            first = page.locator("section.unanswered tr.group").first
            # Rated down on six days and twice today: the paraphrases are one line, the first.
            await expect(first.locator("td.count")).to_have_text("8", timeout=30_000)
            await expect(first.locator(".kind-down")).to_be_visible()
            await expect(page.locator("nav.nav")).to_contain_text("未答问题" if lang == "zh" else "Unanswered")
            assert await page.locator("section.unanswered tr.group").count() == 5
            await expect(page.locator("section.unanswered .kind-down")).to_have_count(1)
            await expect(page.locator("section.unanswered td.count", has_text="3")).to_have_count(2)  # en, zh
            await first.locator("details summary").click()
            if lang == "en":
                # One click: the most asked question becomes a case of hr's test set.
                await first.locator("form.make-case button").click()
                await page.wait_for_url(re.compile(r"notice=case_added"))
                await expect(page.locator(".alert.info")).to_contain_text("eval.toml")
                cases = botd_eval.load_set(tmp_path / "docs" / "hr" / "eval.toml")
                assert len(cases) == 1 and cases[0].q in DOWN
                await page.locator("section.unanswered tr.group").first.locator("details summary").click()
            await _shot(page, f"unanswered-{lang}")

            await page.goto(base + "/usage")
            await expect(page.locator("#chart-answers rect").first).to_be_attached()
            assert await page.locator("#chart-answers rect").count() >= 14
            await expect(page.locator("#usage-bots")).to_contain_text("hr")
            await _shot(page, f"usage-{lang}")

            await page.goto(base + "/eval?bot=hr")
            await expect(page.locator("#eval-run tr.change-worse")).to_have_count(1)
            await expect(page.locator("#eval-run")).to_contain_text("变差" if lang == "zh" else "worse")
            await _shot(page, f"eval-{lang}")

            await page.goto(base + "/export")
            await _shot(page, f"export-{lang}")
            async with page.expect_download() as info:
                await page.click("#export-form button[type=submit]")
            download = await info.value
            data = await asyncio.to_thread(Path(await download.path()).read_bytes)
            assert data.startswith("\ufeff".encode()) and b"parental leave bonus" in data

            # Another department's base: the error page, nothing of it shown.
            response = await page.goto(base + "/unanswered?kb=it")
            assert response is not None and response.status == 403
            # No horizontal scrolling at a phone's width.
            await page.set_viewport_size({"width": 375, "height": 740})
            await page.goto(base + "/unanswered")
            assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
            await context.close()
