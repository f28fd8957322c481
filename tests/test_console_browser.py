"""The web console in a real browser: headless Chromium (Debian's ``chromium`` package) driven
by Playwright for Python, against the real daemon, model and Redis.

Skipped, with the reason, where chromium or playwright is missing (.ci/run installs both).
Screenshots at 1280 and 375 px wide go to ``screenshots/`` (ignored by git; BOTD_SCREENSHOTS
names another folder).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest

from core.auth import CONSOLE_AUDIENCE, Tokens
from core.messages import ThreadKey
from tests.helpers import running_daemon, wait_for
from tests.test_console import KEY, PASSWORDS, _ready, _signing_key, browsers, console_config

__all__ = ["_signing_key"]  # the autouse fixture: the console's signing key in the environment

CHROMIUM = os.environ.get("BOTD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium) or set BOTD_CHROMIUM",
                allow_module_level=True)
try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
except ImportError:
    pytest.skip("Playwright for Python is not installed (pip install -e '.[test]')", allow_module_level=True)

SHOTS = Path(os.environ.get("BOTD_SCREENSHOTS") or Path(__file__).resolve().parent.parent / "screenshots")
SABBATICAL = ("# Sabbatical\n\n## Who may take one\n\nAfter five years every employee may take a sabbatical "
              "of 3 months, paid at 60 percent.\n")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


async def login(context: BrowserContext, base: str, user: str) -> Page:
    page = await context.new_page()
    await page.goto(base + "/console/login")
    await page.fill("input[name=user]", user)
    await page.fill("input[name=password]", PASSWORDS[user])
    await page.click("form button[type=submit]")
    await page.wait_for_url(re.compile(r"/console/chat"))
    return page


async def shot(page: Page, name: str) -> None:
    """The page at a desktop's and a phone's width."""
    os.makedirs(SHOTS, exist_ok=True)
    for width, height in ((1280, 800), (375, 740)):
        await page.set_viewport_size({"width": width, "height": height})
        await page.wait_for_timeout(150)  # the charts redraw on resize
        await page.screenshot(path=str(SHOTS / f"console-{name}-{width}.png"), full_page=width == 375)
    await page.set_viewport_size({"width": 1280, "height": 800})


async def test_chat_streams_upload_search_and_cite_with_screenshots(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url, knowledge=True)
    async with running_daemon(cfg) as api, chromium() as browser:
        await wait_for(lambda: _ready(api), timeout=90)
        context = await browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
        page = await login(context, api.base, "alice")

        # Chat: the answer grows in the page in several steps, then its timings show.
        await page.evaluate("""() => {
            window.__growth = [];
            new MutationObserver(() => {
                const t = document.querySelector('#log .msg.assistant .text');
                if (t && t.textContent.length && window.__growth.at(-1) !== t.textContent.length)
                    window.__growth.push(t.textContent.length);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        }""")
        await page.fill("#text", "Tell me a short story about a cat.")
        await page.press("#text", "Enter")
        await expect(page.locator("#log .msg.assistant .timings")).to_contain_text("ms", timeout=60_000)
        growth = await page.evaluate("window.__growth")
        assert len(growth) >= 2 and growth == sorted(growth), growth
        await shot(page, "chat")

        # Knowledge: upload a Markdown file into alice's base; it is ingested and listed.
        doc = tmp_path / "sabbatical.md"
        doc.write_text(SABBATICAL)
        await page.goto(api.base + "/console/knowledge")
        card = page.locator("section.card", has=page.locator("h2", has_text="hr"))
        await card.locator("input[type=file]").set_input_files(str(doc))
        await card.locator("form.upload button[type=submit]").click()
        await page.wait_for_url(re.compile(r"notice=uploaded"))
        # The page follows the re-ingest and reloads once it is over.
        await expect(page.locator("#knowledge")).to_contain_text("sabbatical.md", timeout=60_000)
        await expect(page.locator(".progress-line")).to_have_count(0, timeout=60_000)
        assert (tmp_path / "docs" / "hr" / "sabbatical.md").read_text() == SABBATICAL

        # The search box shows the chunk a question retrieves, with its score.
        await page.fill("#kb-search input[name=q]", "How long is a sabbatical?")
        await page.click("#kb-search button[type=submit]")
        first = page.locator("#hits li").first
        await expect(first).to_contain_text("sabbatical.md")
        await expect(first).to_contain_text("3 months")
        await expect(first).to_contain_text("score")
        await shot(page, "knowledge")

        # The chat cites it.
        await page.goto(api.base + "/console/chat?bot=hr")
        await page.fill("#text", "How long is a sabbatical, and how is it paid?")
        await page.click("#send")
        await expect(page.locator("#log .msg.assistant .sources")).to_contain_text("sabbatical.md", timeout=60_000)

        # The other pages, for the screenshots (the admin's view).
        admin = await login(await browser.new_context(viewport={"width": 1280, "height": 800}), api.base, "root")
        await admin.goto(api.base + "/console/status")
        await expect(admin.locator("#chart-tps")).to_be_visible()
        await shot(admin, "status")
        await admin.goto(api.base + "/console/conversations")
        await shot(admin, "conversations")
        await admin.goto(api.base + "/console/audit")
        await expect(admin.locator("#csv")).to_be_visible()
        await shot(admin, "audit")
        await admin.goto(api.base + "/console/config")
        await expect(admin.locator("#config")).to_contain_text("********")
        assert KEY not in await admin.content()
        await shot(admin, "config")


async def test_departments_csrf_expiry_and_the_chinese_ui(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url, knowledge=True)
    async with running_daemon(cfg) as api, browsers(api, "ivan") as (ivan,), chromium() as browser:
        await wait_for(lambda: _ready(api), timeout=90)
        status, events, _ = await ivan.chat("it", "Say hi.", conversation="secret", max_tokens=4)
        assert status == 200 and events[-1]["done"]
        it_id = ThreadKey("web", "it", "ivan/secret", "").redis_suffix()
        base = api.base + "/console"

        context = await browser.new_context(locale="en-US")
        page = await login(context, api.base, "alice")
        # Another department's conversation, documents and search: 403 by link ...
        for link in (f"/conversation?id={it_id}", "/conversations?bot=it", "/knowledge?q=VPN+password&kb=it",
                     "/chat?bot=it", "/config"):
            response = await page.goto(base + link)
            assert response is not None and response.status == 403, link
            await expect(page.locator("main")).to_contain_text("You may not see or do this.")
            assert "rotates" not in await page.content()
        # ... and by direct request, with the login's cookie and CSRF token.
        csrf = await page.get_attribute('meta[name="csrf-token"]', "content")
        assert csrf
        headers = {"X-CSRF-Token": csrf}
        for method, path, body in (("GET", f"/api/conversation?id={it_id}", None),
                                   ("GET", "/api/knowledge?bot=it", None),
                                   ("GET", "/api/knowledge/search?q=VPN&kb=it", None),
                                   ("POST", "/api/knowledge/delete", {"kb": "it", "source": "it-policy.md"}),
                                   ("POST", "/api/conversation/delete", {"id": it_id}),
                                   ("POST", "/api/chat", {"bot": "it", "text": "VPN?"})):
            r = await page.request.fetch(base + path, method=method, headers=headers, data=body)
            assert r.status == 403, (path, r.status, await r.text())
        assert (tmp_path / "docs" / "it" / "it-policy.md").exists()
        assert redis_server.client().exists("botd:hist:" + it_id)

        # A POST without the CSRF token: 403, nothing sent to the model.
        r = await page.request.post(base + "/api/chat", data={"bot": "hr", "text": "hi"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "csrf"
        r = await page.request.post(base + "/api/knowledge/delete", data={"kb": "hr", "source": "hr-policy.md"})
        assert r.status == 403 and (tmp_path / "docs" / "hr" / "hr-policy.md").exists()

        # An expired login: back to the login page, which says why.
        now = int(time.time())
        token = Tokens(KEY).issue("alice", CONSOLE_AUDIENCE, 60)
        claims: dict[str, Any] = jwt.decode(token, KEY, algorithms=["HS256"], audience=CONSOLE_AUDIENCE)
        expired = jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, KEY, algorithm="HS256")
        host = api.base.split("//", 1)[1].split(":")[0]
        await context.add_cookies([{"name": "botd_console", "value": expired, "domain": host,
                                    "path": "/console"}])
        await page.goto(base + "/status")
        assert "/console/login" in page.url and "expired=1" in page.url
        await expect(page.locator("main")).to_contain_text("Your session has ended")

        # The Chinese UI, from the browser's language.
        zh = await browser.new_context(locale="zh-CN", viewport={"width": 375, "height": 740})
        zpage = await zh.new_page()
        await zpage.goto(base + "/login")
        await expect(zpage.locator("h1, h2").first).to_contain_text("登录 botd 控制台")
        assert await zpage.get_attribute("html", "lang") == "zh-CN"
        await shot(zpage, "login-zh")
        zpage = await login(zh, api.base, "alice")
        await expect(zpage.locator("nav.nav")).to_contain_text("知识库")
        await expect(zpage.locator("#send")).to_have_text("发送")
        await zpage.goto(base + "/knowledge")
        await expect(zpage.locator("#kb-search button")).to_have_text("检索")
        await shot(zpage, "knowledge-zh")
        # No horizontal scrolling at a phone's width.
        assert await zpage.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
