"""The durable inbox: every platform message botd has acknowledged, until its answer is delivered.

A connector calls :meth:`Inbox.accept` before it answers the platform "got it". One Lua
call both claims the platform's event id (dedupe) and records the message, so a message
is either recorded or refused as a duplicate, never half of each. The record stays in
Redis while the message waits, is generated and is shown; the connector removes it
(:meth:`done`) once the platform has the final answer. A daemon that starts finds the
records left by a previous run (SIGTERM, crash, ``kill -9``) and answers them.

Two companions make a replay exactly-once for the user:

* ``progress`` — what the connector has already posted (message ids, parts sent), so a
  replay edits the message it started instead of posting a second one;
* ``answer`` — the finished answer text, written in the same MULTI as the thread's
  history, so a replay after the history was stored re-shows that answer instead of
  generating (and storing) a second one.

Keys (hashes keyed by request id): ``{prefix}:inbox``, ``{prefix}:inbox:progress``,
``{prefix}:inbox:answer``. A plain hash rather than a stream: records are updated
(progress) and removed out of order, and replay order comes from ``seq``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any

import structlog
from redis.asyncio.client import Pipeline

from core import metrics
from core.messages import ChatTurn, InboundMessage
from core.redis_store import RedisManager, StoreUnavailable

log = structlog.get_logger("botd.inbox")

# KEYS: seen-key, inbox; ARGV: ttl, request id, record. Claims the event id and records the
# message atomically: 1 recorded, 0 a duplicate.
_ACCEPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""


def _encode(msg: InboundMessage, connector: str, owner: str, run: str) -> str:
    data = asdict(msg)
    for runtime_only in ("durable", "resumed", "progress", "final_answer"):
        data.pop(runtime_only)
    data["history"] = None if msg.history is None else [t.as_dict() for t in msg.history]
    data["stop"] = list(msg.stop)
    return json.dumps({"connector": connector, "owner": owner, "run": run, "seq": time.time_ns(), "msg": data},
                      ensure_ascii=False)


def _decode(raw: str) -> tuple[str, str, str, int, InboundMessage]:
    rec = json.loads(raw)
    data = dict(rec["msg"])
    if data.get("history") is not None:
        data["history"] = [ChatTurn(t["role"], t["content"]) for t in data["history"]]
    data["stop"] = tuple(data.get("stop") or ())
    known = InboundMessage.__dataclass_fields__
    msg = InboundMessage(**{k: v for k, v in data.items() if k in known})
    return rec["connector"], str(rec.get("owner", "")), str(rec.get("run", "")), int(rec["seq"]), msg


class Inbox:
    def __init__(self, redis: RedisManager, prefix: str, owner: str, seen_ttl_s: int = 24 * 3600) -> None:
        self.redis = redis
        self.prefix = prefix
        # Several daemons may share one Redis: each replays only what it accepted itself.
        self.owner = owner
        # This process's records: a replay takes only records an earlier run left, never a
        # message this run accepted a moment ago (it is being answered already).
        self.run = uuid.uuid4().hex
        self.seen_ttl_s = seen_ttl_s
        self.key = f"{prefix}:inbox"
        self.progress_key = f"{prefix}:inbox:progress"
        self.answer_key = f"{prefix}:inbox:answer"

    async def accept(self, msg: InboundMessage, connector: str) -> bool:
        """Record ``msg`` (claiming its event id); False when the platform delivered it before.

        With Redis unreachable the message is answered anyway (an answer beats none) but
        is not durable; that is logged.
        """
        seen = f"{self.prefix}:seen:{msg.platform}:{msg.event_id or msg.request_id}"
        try:
            fresh = await self.redis.run(
                "inbox accept", self.redis.client.eval, _ACCEPT, 2, seen, self.key,
                self.seen_ttl_s, msg.request_id, _encode(msg, connector, self.owner, self.run),
            )
        except StoreUnavailable:
            log.warning("inbox unavailable: redis unreachable; answering without a durable record",
                        platform=msg.platform)
            return True
        if not fresh:
            metrics.DUPLICATES.labels(msg.platform).inc()
            log.info("duplicate delivery dropped", platform=msg.platform, event_id=msg.event_id)
            return False
        msg.durable = True
        return True

    async def note_progress(self, msg: InboundMessage, progress: dict[str, Any]) -> None:
        """Remember what has been posted for ``msg`` (merged into ``msg.progress``)."""
        msg.progress.update(progress)
        if not msg.durable:
            return
        try:
            await self.redis.run("inbox progress", self.redis.client.hset, self.progress_key, msg.request_id,
                                 json.dumps(msg.progress))
        except StoreUnavailable:
            log.warning("could not record reply progress: redis unreachable", request_id=msg.request_id)

    def add_answer(self, pipe: Pipeline, msg: InboundMessage, text: str) -> None:
        """Queue "this message's answer is final" on a MULTI (the one that stores the history)."""
        if msg.durable:
            pipe.hset(self.answer_key, msg.request_id, text)

    async def done(self, msg: InboundMessage) -> None:
        """The platform has the final answer (or a final refusal): forget the record."""
        if not msg.durable:
            return

        try:
            await self.redis.run("inbox done", self._drop, msg.request_id)
        except StoreUnavailable:
            # It will be answered again after a restart; the recorded answer keeps the words the same.
            log.warning("could not clear the inbox record: redis unreachable", request_id=msg.request_id)
        msg.durable = False

    async def _drop(self, rid: str) -> None:
        async with self.redis.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.key, rid)
            pipe.hdel(self.progress_key, rid)
            pipe.hdel(self.answer_key, rid)
            await pipe.execute()

    async def pending(self) -> list[tuple[str, InboundMessage]]:
        """Records left by an earlier run of this daemon, oldest first, as (connector name, message)."""

        async def _read() -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]]:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.key)
                pipe.hgetall(self.progress_key)
                pipe.hgetall(self.answer_key)
                return tuple(await pipe.execute())

        records, progress, answers = await self.redis.run("inbox read", _read)
        found: list[tuple[int, str, InboundMessage]] = []
        for rid, raw in records.items():
            try:
                connector, owner, run, seq, msg = _decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("damaged inbox record dropped", request_id=rid, error=f"{type(exc).__name__}: {exc}")
                await self.redis.run("inbox drop", self._drop, rid)
                continue
            if owner and owner != self.owner:
                continue  # another daemon's message: it answers it when it restarts
            if run == self.run:
                continue  # accepted by this run: already being answered
            msg.durable, msg.resumed = True, True
            try:
                msg.progress = dict(json.loads(progress[rid])) if rid in progress else {}
            except (ValueError, TypeError):
                msg.progress = {}
            msg.final_answer = answers.get(rid)
            found.append((seq, connector, msg))
        found.sort(key=lambda t: t[0])
        return [(c, m) for _, c, m in found]
