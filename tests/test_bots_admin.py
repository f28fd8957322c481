"""bots/admin.py alone: the web console's backend against a real Redis and real files (no
daemon, no model: the console's reads never reach the engine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bots.admin import AdminBackend, thread_of
from bots.service import ChatService
from connectors.web_console.backend import ConsoleBackend
from core.config import Settings
from core.dispatch import Busy
from core.messages import ThreadKey
from core.runtime import Runtime
from tests.helpers import RedisServer, make_config


@pytest.fixture
async def admin(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[AdminBackend]:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text("# Leave\n\n25 days.\n", encoding="utf-8")
    cfg = make_config(tmp_path, redis_server.url, redis={"socket_timeout_s": 0.5},
                      audit={"file": str(tmp_path / "audit.jsonl")}, api={"default_bot": "hr"},
                      knowledge={"handbook": {"paths": [str(docs)]}},
                      bots={"hr": {"knowledge": ["handbook"]}, "sales": {}, "finance": {}})
    runtime = Runtime(Settings(cfg))
    await runtime.redis.start()
    try:
        yield ChatService(runtime.settings, runtime).admin
    finally:
        await runtime.redis.close()


def test_the_backend_is_what_the_console_declares_it_needs(admin):
    # mypy checks the types (bots/service.py); here, that every declared member is there.
    wanted = {name for name in vars(ConsoleBackend) if not name.startswith("_")}
    assert len(wanted) > 15 and not [name for name in wanted if not hasattr(admin, name)]
    assert admin.connector_names() == ["http_api"]  # what the console's status page lists


async def test_conversations_are_the_asking_users_bots_newest_first(admin):
    history = admin.runtime.history
    hr = ThreadKey("telegram", "hr", "chat:1", "")  # a ':' in a chat id survives the id's round trip
    sales = ThreadKey("slack", "sales", "C1", "1700000000.1")
    finance = ThreadKey("api", "finance", "k/u", "")
    await history.append_exchange(hr, "How many days?", "25.")
    await asyncio.sleep(0.01)
    await history.append_exchange(sales, "Price?", "Ask sales.")
    await history.append_exchange(finance, "Budget?", "Secret.")
    found = await admin.conversations(["hr", "sales"])
    assert [(c["bot"], c["platform"], c["messages"]) for c in found] == [("sales", "slack", 2), ("hr", "telegram", 2)]
    assert all(c["expires_in_s"] and c["expires_in_s"] > 0 for c in found)
    assert [c["bot"] for c in await admin.conversations(["hr", "sales"], platform="telegram")] == ["hr"]
    assert await admin.conversations(["nobody"]) == []
    hr_id = next(c["id"] for c in found if c["bot"] == "hr")
    assert thread_of(hr_id) == hr
    messages = await admin.conversation(hr)
    assert [(m["role"], m["content"]) for m in messages] == [("user", "How many days?"), ("assistant", "25.")]
    assert await admin.reset(hr) is True and await admin.conversation(hr) == []


def test_a_malformed_conversation_id_names_no_thread():
    for bad in ("", "a:b:c", "a:b:c:d:e", "telegram:hr:1"):
        assert thread_of(bad) is None
    assert thread_of("web:hr:ann%3Ax:t%25") == ThreadKey("web", "hr", "ann:x", "t%")


async def test_conversations_while_redis_is_away_are_busy(admin, redis_server):
    redis_server.stop()
    with pytest.raises(Busy):
        await admin.conversations(["hr"])
    with pytest.raises(Busy):
        await admin.conversation(ThreadKey("telegram", "hr", "1", ""))


async def test_audit_tail_filters_by_bot_user_and_day_newest_first(admin, tmp_path):
    lines = [
        {"ts": "2026-12-05T10:00:00Z", "bot": "hr", "user": "ann", "finish": "stop"},
        {"ts": "2026-12-06T09:00:00Z", "bot": "finance", "user": "bob", "finish": "stop"},
        {"ts": "2026-12-06T10:00:00Z", "bot": "hr", "user": "bob", "finish": "stop"},
        {"ts": "2026-12-06T11:00:00Z", "platform": "console", "user": "root", "action": "login"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n[1, 2]\n"
    (tmp_path / "audit.jsonl").write_text(text, encoding="utf-8")
    hr = await admin.audit_tail(["hr"])
    assert [(e["user"], e["ts"][:10]) for e in hr] == [("bob", "2026-12-06"), ("ann", "2026-12-05")]
    assert [e["user"] for e in await admin.audit_tail(["hr"], user="an")] == ["ann"]
    assert [e["user"] for e in await admin.audit_tail(["hr", "finance"], day="2026-12-06")] == ["bob", "bob"]
    everything = await admin.audit_tail(None, limit=2)
    assert [e["user"] for e in everything] == ["root", "bob"]  # console actions too, for an admin
    # Only the last bytes are read; a line cut by the bound is skipped, not half-parsed.
    tail = await admin.audit_tail(None, max_bytes=len(json.dumps(lines[-1])) + 20)
    assert [e.get("action") for e in tail] == ["login"]


async def test_audit_tail_without_an_audit_log_is_none(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url)
    backend = ChatService(Settings(cfg), Runtime(Settings(cfg))).admin
    assert await backend.audit_tail(None) is None


async def test_reingest_runs_once_at_a_time_and_reports_its_outcome(admin):
    release = asyncio.Event()

    class Report:
        skipped = (("bad.pdf", "encrypted"),)

        def summary(self) -> str:
            return "1 document, 1 chunk"

    async def ingest(kb: str) -> Any:
        await release.wait()
        return Report()

    assert admin.reingest("handbook") is False  # no ingest hook: none can run
    admin.ingest_hook = ingest
    assert admin.reingest("nope") is False  # not a configured base
    assert admin.ingest_progress("handbook") is None
    assert admin.reingest("handbook") is True
    assert admin.reingest("handbook") is False  # one at a time
    assert admin.ingest_progress("handbook")["running"] is True
    status = await admin.knowledge_status(["hr", "sales"])
    assert [(b["name"], b["bots"], b["state"]) for b in status] == [("handbook", ["hr"], "ingesting")]
    assert await admin.knowledge_status(["sales"]) == []  # a base granted to none of the user's bots
    release.set()
    await admin.tasks.drain(5)
    done = admin.ingest_progress("handbook")
    assert done is not None and done["running"] is False and done["ok"] is True
    assert done["summary"] == "1 document, 1 chunk" and done["skipped"] == [["bad.pdf", "encrypted"]]


async def test_documents_are_named_only_as_ingestion_finds_them(admin, tmp_path):
    assert admin.knowledge_document("handbook", "leave.md") == str(tmp_path / "docs" / "leave.md")
    assert admin.knowledge_document("handbook", "../audit.jsonl") is None
    assert admin.knowledge_folder("handbook") == str((tmp_path / "docs").resolve())


async def test_reload_config_says_applied_refused_or_unknown(admin):
    assert await admin.reload_config() is None  # no hook: nothing could start
    admin.reload_hook = lambda: None
    assert await admin.reload_config() is None  # none could start

    async def applied() -> bool:
        return True

    async def slow() -> bool:
        await asyncio.sleep(5)
        return True

    admin.reload_hook = lambda: asyncio.ensure_future(applied())
    assert await admin.reload_config() is True
    task: asyncio.Future[bool] = asyncio.ensure_future(slow())
    admin.reload_hook = lambda: task
    assert await admin.reload_config(timeout_s=0.05) is None  # still running: unknown, and not cancelled
    assert not task.cancelled()
    task.cancel()
