"""The conversation export (bots/export.py, the console's /api/export), against the real daemon,
model and Redis over real HTTP: a department exports only its own bots' conversations (403 for
another's), by bot and date range, as JSON lines or as a CSV Excel opens safely (UTF-8 BOM, a
formula neutralised), and every export is in the audit log."""

from __future__ import annotations

import csv
import io
import json
import time

from bots.export import ExportError, day_range
from tests.helpers import running_daemon, wait_for
from tests.test_console import _ready, _signing_key, browsers, console_config

__all__ = ["_signing_key"]  # the autouse fixture: the console's signing key in the environment

FORMULA = '=HYPERLINK("http://evil.example","click")'


def test_day_range_is_checked() -> None:
    lo, hi = day_range("2026-12-01", "2026-12-01")
    assert hi - lo == 86400
    assert day_range("", "") == (0.0, float("inf"))
    for bad in (("2026-13-01", ""), ("yesterday", ""), ("", "2026-12-1"), ("2026-12-02", "2026-12-01")):
        try:
            day_range(*bad)
        except ExportError:
            continue
        raise AssertionError(bad)


async def test_department_exports_its_own_conversations_excel_safe(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url, knowledge=True)
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan", "vera", "") as (alice, ivan, vera, anon):
        await wait_for(lambda: _ready(api), timeout=90)
        assert (await alice.chat("hr", FORMULA, conversation="x1", max_tokens=4))[0] == 200
        assert (await alice.chat("hr", "育儿假奖金是多少？", conversation="x2", max_tokens=4))[0] == 200
        assert (await ivan.chat("it", "IT secret: the VPN?", conversation="y1", max_tokens=4))[0] == 200

        async def get(b, query: str) -> tuple[int, bytes, dict]:
            async with b.http.get(b.base + "/api/export" + query) as r:
                return r.status, await r.read(), dict(r.headers)

        status, body, headers = await get(alice, "?format=csv")
        assert status == 200 and body.startswith("\ufeff".encode()), body[:100]
        assert headers["Content-Type"].startswith("text/csv") and "attachment" in headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))
        assert {r["bot"] for r in rows} == {"hr"} and b"secret" not in body
        asked = [r["content"] for r in rows if r["role"] == "user"]
        assert "'" + FORMULA in asked and "育儿假奖金是多少？" in asked  # the formula quoted, Chinese intact
        assert {r["role"] for r in rows} == {"user", "assistant"} and all(r["ts"].endswith("Z") for r in rows)

        status, body, _ = await get(alice, "?format=jsonl&bot=hr")
        lines = [json.loads(x) for x in body.decode().splitlines()]
        assert status == 200 and len(lines) == len(rows) and FORMULA in [x["content"] for x in lines]

        # A range without them: nothing; another department's bot: 403; bad input: 400; no login: 401.
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert len((await get(alice, f"?format=jsonl&from={today}&to={today}"))[1].splitlines()) == len(rows)
        assert (await get(alice, "?format=jsonl&to=2020-01-01"))[1] == b""
        assert (await get(alice, "?bot=it"))[0] == 403
        assert (await get(alice, "?format=xlsx"))[0] == 400
        assert (await get(alice, "?from=2026-02-30"))[0] == 400
        assert (await get(anon, ""))[0] == 401
        status, body, _ = await get(ivan, "?format=jsonl")
        assert {json.loads(x)["bot"] for x in body.decode().splitlines()} == {"it"}
        status, body, _ = await get(vera, "?format=jsonl")  # a viewer of every bot reads them all
        assert {json.loads(x)["bot"] for x in body.decode().splitlines()} == {"hr", "it"}
        status, html = await alice.get("/export")
        assert status == 200 and 'id="export-form"' in html

        # Every export is a console action in the audit log: who, which bots, how many rows.
        def written() -> list[dict]:
            audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
            return [a for a in audit if a.get("action") == "conversation_export"]

        async def all_written() -> bool:  # the line is written once the download is over: a moment later
            return {a["user"] for a in written()} >= {"alice", "ivan", "vera"}

        await wait_for(all_written, timeout=10)
        exports = written()
        assert any(a["user"] == "alice" and a["bots"] == ["hr"] and a["rows"] == len(rows) for a in exports)
