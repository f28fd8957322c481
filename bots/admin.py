"""The web console's backend: what an admin reads and steers.

Conversations stored in Redis, the knowledge bases' state and their re-ingest, a search of
a base, the audit log's tail and the console's own actions in it, the last hour's figures,
and a config reload. Every read takes the bots the asking user may see; the console (an
edge, ``connectors/web_console``) decides who that is and declares what it needs of this
class in its own protocol; the daemon hands this object in.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog

from bots import feedback, notice, stats
from bots.answers import STORE_DOWN, JobAnswer, TextAnswer, answer_details, language, reset_thread
from bots.attachments import Download
from bots.pipeline import AnswerPipeline
from bots.quality_admin import QualityReads
from bots.tasks import TaskRegistry
from connectors import configured
from core.config import Config, Settings
from core.dispatch import Busy
from core.feedback import FeedbackEvent, FeedbackReply
from core.messages import InboundMessage, ThreadKey
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.service")


def thread_of(conversation_id: str) -> ThreadKey | None:
    """The thread a console conversation id (a history key's suffix, as
    :meth:`AdminBackend.conversations` gives it) names, or None when it is malformed."""
    parts = conversation_id.split(":")
    if len(parts) != 4:
        return None

    def unesc(part: str) -> str:
        return part.replace("%3A", ":").replace("%25", "%")

    platform, bot, chat, thread = (unesc(p) for p in parts)
    return ThreadKey(platform, bot, chat, thread)


def read_tail(path: str, max_bytes: int) -> list[str]:
    """The whole lines among a file's last ``max_bytes`` bytes (blocking); none when it is missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > max_bytes else lines  # the first may be cut


def _manifest(state_dir: Path, kb: str) -> dict[str, Any]:
    """The live index's manifest of ``kb`` (blocking); empty when there is none."""
    from core.knowledge.store import KnowledgeStore

    store = KnowledgeStore(state_dir, kb)
    version = store.current_name()
    if version is None:
        return {}
    try:
        return dict(json.loads((store.dir / version / "manifest.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


class AdminBackend(QualityReads):
    """The console's reads and actions, over the runtime and the answer pipeline."""

    def __init__(self, settings: Settings, runtime: Runtime, tasks: TaskRegistry, answers: AnswerPipeline) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tasks = tasks
        self.answers = answers
        # The console's re-ingests, by base: under way, or the last one finished.
        self.ingests: dict[str, dict[str, Any]] = {}
        # Set by the daemon: re-ingest one knowledge base.
        self.ingest_hook: Callable[[str], Coroutine[Any, Any, Any]] | None = None
        # Set by the daemon: reload config.toml as SIGHUP does (the console's "Reload"); returns
        # the reload's task (True: applied), or None when none could start.
        self.reload_hook: Callable[[], Awaitable[bool] | None] | None = None
        self.last = stats.LAST_HOUR

    @property
    def cfg(self) -> Config:
        return self.settings.config

    @property
    def n_ctx(self) -> int:
        return self.cfg.model.n_ctx

    def bot_names(self) -> list[str]:
        return sorted(self.cfg.bots)

    def health(self) -> dict[str, Any]:
        return self.runtime.health()

    def connector_names(self) -> list[str]:
        return configured(self.cfg)

    # -- the console's chat ------------------------------------------------------------------------

    async def dispatch(self, msg: InboundMessage, download: Download | None = None) -> JobAnswer | TextAnswer:
        return await self.answers.dispatch(msg, download)

    async def reset(self, thread: ThreadKey) -> bool:
        return await reset_thread(self.runtime, self.cfg, thread)

    @staticmethod
    def answer_details(answer: Any) -> dict[str, Any]:
        return answer_details(answer)

    def waiting_notice(self, msg: InboundMessage, answer: Any) -> str | None:
        st = notice.standing(self.runtime, answer)
        return None if st is None else notice.notice_text(st, language(self.cfg, msg))

    def feedback_id(self, msg: InboundMessage, answer: Any) -> str | None:
        return msg.request_id if isinstance(answer, JobAnswer) and feedback.enabled(self.cfg, msg.bot) else None

    async def feedback(self, event: FeedbackEvent) -> FeedbackReply:
        return await feedback.FeedbackDesk(self.settings, self.runtime).handle(event)

    # -- the last hour ------------------------------------------------------------------------------

    async def sample_stats(self, every_s: float) -> None:
        """Sample the figures every ``every_s`` seconds until cancelled (run while the console runs)."""
        await stats.run_sampler(self.health, every_s, self.last)

    def last_hour(self) -> dict[str, Any]:
        return self.last.snapshot()

    # -- conversations ------------------------------------------------------------------------------

    async def conversations(self, bots: Collection[str], platform: str | None = None,
                            limit: int = 500) -> list[dict[str, Any]]:
        """The threads with a history in Redis for ``bots`` (newest first): platform, bot, chat,
        thread, messages, last message time, seconds until they expire."""
        redis, prefix = self.runtime.redis, f"{self.runtime.history.prefix}:hist:"
        wanted = set(bots)

        async def scan() -> list[tuple[str, ThreadKey]]:
            found: list[tuple[str, ThreadKey]] = []
            seen = 0
            async for key in redis.client.scan_iter(match=prefix + "*", count=1000):
                seen += 1
                thread = thread_of(key[len(prefix):])
                if thread is not None and thread.bot in wanted and (not platform or thread.platform == platform):
                    found.append((key, thread))
                if seen >= 50_000 or len(found) >= 5 * limit:  # a bounded look, not a full walk
                    break
            return found

        async def details(keys: list[str]) -> list[Any]:
            async with redis.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                    pipe.lindex(key, -1)
                    pipe.ttl(key)
                return list(await pipe.execute())

        try:
            found = await redis.run("SCAN", scan)
            values = await redis.run("LLEN", details, [k for k, _ in found]) if found else []
        except StoreUnavailable as exc:
            raise Busy(STORE_DOWN, self.cfg.queue.retry_after_s) from exc
        out = []
        for i, (_key, t) in enumerate(found):
            length, last, ttl = values[3 * i: 3 * i + 3]
            if not length:
                continue
            try:
                ts = float(json.loads(last).get("ts", 0)) if last else None
            except (ValueError, AttributeError, TypeError):
                ts = None
            out.append({"id": t.redis_suffix(), "platform": t.platform, "bot": t.bot, "chat": t.chat,
                        "thread": t.thread, "messages": int(length), "last_ts": ts,
                        "expires_in_s": int(ttl) if ttl and int(ttl) >= 0 else None})
        out.sort(key=lambda c: -(c["last_ts"] or 0))
        return out[:limit]

    async def conversation(self, thread: ThreadKey) -> list[dict[str, Any]]:
        """One thread's stored messages, oldest first, with their times."""
        redis = self.runtime.redis
        try:
            raw = await redis.run("LRANGE", redis.client.lrange, self.runtime.history.key(thread), 0, -1)
        except StoreUnavailable as exc:
            raise Busy(STORE_DOWN, self.cfg.queue.retry_after_s) from exc
        out = []
        for item in raw:
            try:
                d = json.loads(item)
                if d.get("role") in ("user", "assistant") and isinstance(d.get("content"), str):
                    out.append({"role": d["role"], "content": d["content"], "ts": d.get("ts")})
            except (ValueError, AttributeError):
                continue
        return out

    @staticmethod
    def thread_of(conversation_id: str) -> ThreadKey | None:
        return thread_of(conversation_id)

    # -- knowledge ----------------------------------------------------------------------------------

    async def knowledge_status(self, bots: Collection[str]) -> list[dict[str, Any]]:
        """The knowledge bases granted to ``bots``: state, documents and chunk counts of the live
        index, when it was built, and the console's last re-ingest of it."""
        granted: dict[str, list[str]] = {}
        for name in sorted(bots):
            bot = self.cfg.bots.get(name)
            for kb in bot.knowledge if bot is not None else []:
                granted.setdefault(kb, []).append(name)
        out = []
        for kb in sorted(granted):
            if kb not in self.cfg.knowledge:
                continue
            m = await asyncio.to_thread(_manifest, self.cfg.server.state_dir, kb)
            files = m.get("files") or {}
            run = self.ingests.get(kb, {})
            out.append({
                "name": kb, "bots": granted[kb], "paths": list(self.cfg.knowledge[kb].paths),
                "state": "ingesting" if run.get("running") else self.runtime.knowledge_state.get(kb, "unknown"),
                "chunks": sum(int(f.get("count", 0)) for f in files.values()),
                "documents": [{"source": s, "chunks": int(f.get("count", 0))} for s, f in sorted(files.items())],
                "built_at": m.get("built_at") or None, "model": m.get("model", ""),
                "last_ingest": {k: v for k, v in run.items() if k != "running"} or None,
                "schedule": self.cfg.knowledge[kb].schedule,
            })
        return out

    def reingest(self, kb: str) -> bool:
        """Start re-ingesting ``kb`` in the background; False when one is already running (or none can)."""
        runs = self.ingests
        if self.ingest_hook is None or kb not in self.cfg.knowledge or runs.get(kb, {}).get("running"):
            return False
        hook = self.ingest_hook
        runs[kb] = {"running": True, "started_at": time.time()}

        async def run() -> None:
            report: Any = None
            try:
                report = await hook(kb)
            finally:
                runs[kb] = {"started_at": runs[kb]["started_at"], "finished_at": time.time(),
                            "ok": report is not None,
                            "summary": report.summary() if report is not None else "failed or already running; "
                                                                                   "see the daemon's log",
                            "skipped": [list(s) for s in report.skipped] if report is not None else []}

        self.tasks.spawn(run())
        return True

    def ingest_progress(self, kb: str) -> dict[str, Any] | None:
        """The console's re-ingest of ``kb`` under way or last finished (None: none yet)."""
        run = self.ingests.get(kb)
        if run is None:
            return None
        now = time.time()
        return {**run, "running": bool(run.get("running")),
                "elapsed_s": round((run.get("finished_at") or now) - run["started_at"], 1)}

    async def search_knowledge(self, kbs: Sequence[str], query: str) -> list[dict[str, Any]]:
        """The chunks a question retrieves from ``kbs``, best first, with their scores."""
        retriever = self.runtime.retriever
        if retriever is None or not kbs:
            return []
        hits = await asyncio.get_running_loop().run_in_executor(None, retriever.search, list(kbs), query)
        return [{"kb": h.kb, "source": h.source, "heading": h.heading, "cite": h.cite, "text": h.text,
                 "score": round(h.score, 4), "similarity": None if h.similarity is None else round(h.similarity, 3),
                 "coverage": round(h.coverage, 3)} for h in hits]

    def knowledge_folder(self, kb: str) -> str | None:
        """Where an uploaded document of ``kb`` goes: its first configured folder (not a file)."""
        for p in self.cfg.knowledge[kb].paths:
            if os.path.isdir(p):
                return os.path.realpath(p)
        return None

    def knowledge_document(self, kb: str, source: str) -> str | None:
        """The file behind a document's source label (as the index names it), or None: only a
        file that ingestion would find can be named, so no path outside the base's folders can
        (blocking)."""
        from core.knowledge.ingest import discover

        for label, path in discover([Path(p) for p in self.cfg.knowledge[kb].paths]):
            if label == source:
                return str(path)
        return None

    # -- audit and config ---------------------------------------------------------------------------

    async def audit_tail(self, bots: Collection[str] | None, *, user: str = "", day: str = "",
                         limit: int = 200, max_bytes: int = 2_000_000) -> list[dict[str, Any]] | None:
        """The newest audit lines (newest first) about ``bots`` (None: every line, console actions
        included), filtered by user (part of it) and day ("YYYY-MM-DD"); None without an audit log."""
        path = self.cfg.audit.file
        if not path:
            return None
        out: list[dict[str, Any]] = []
        wanted = None if bots is None else set(bots)
        for line in reversed(await asyncio.to_thread(read_tail, path, max_bytes)):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if wanted is not None and entry.get("bot") not in wanted:
                continue
            if user and user not in str(entry.get("user", "")):
                continue
            if day and not str(entry.get("ts", "")).startswith(day):
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out

    def audit_action(self, who: str, action: str, **details: Any) -> None:
        """One console action in the audit log (who, what, when) and in the daemon's log."""
        log.info("console action", who=who, action=action, **details)
        self.runtime.audit.record(question="", answer="", platform="console", user=who, action=action,
                                  finish="console", **details)

    async def reload_config(self, timeout_s: float = 60.0) -> bool | None:
        """Reload config.toml as SIGHUP does: True applied, False refused, None unknown (no hook,
        or still running after ``timeout_s``)."""
        if self.reload_hook is None:
            return None
        task = self.reload_hook()
        if task is None:
            return None
        try:
            return bool(await asyncio.wait_for(asyncio.shield(task), timeout_s))
        except TimeoutError:
            return None
