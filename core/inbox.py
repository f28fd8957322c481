"""The durable inbox: every platform message botd has acknowledged, until its answer is delivered,
shared by every daemon on one Redis.

A connector's message is recorded before the platform hears "got it". One Lua call
claims the platform's event id (dedupe, the same key space for every daemon), records
the message and adds it to a Redis Stream read by one consumer group, one consumer per
daemon (``[server] instance``), delivering the entry to the daemon that accepted it; a
message is either recorded and owned, or refused as a duplicate, never half of each.
While a daemon answers, it keeps its entries fresh (``XCLAIM ... JUSTID`` resets their
idle time); the entries of a daemon that died go idle, and after ``[redis] lease_s``
another daemon claims them (``XAUTOCLAIM``) and answers them. A daemon that starts
answers what its own consumer left (SIGTERM, crash, ``kill -9``). The record is removed
(:meth:`done`: ``XACK`` + ``XDEL`` + the record) once the platform has the final answer.

Two companions make a replay exactly-once for the user, whichever daemon replays:

* ``progress`` — what has already been posted (message ids, parts sent), so a replay
  edits the message it started instead of posting a second one;
* ``answer`` — the finished answer text, written in the same MULTI as the thread's
  history, so a replay after the history was stored re-shows that answer instead of
  generating (and storing) a second one.

Keys: ``{prefix}:inbox`` (hash: request id -> record), ``{prefix}:inbox:progress``,
``{prefix}:inbox:answer`` (hashes keyed by request id), ``{prefix}:inbox:stream`` (the
stream; group ``botd``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from core import metrics
from core.messages import ChatTurn, InboundMessage
from core.redis_store import RedisManager, StoreUnavailable

log = structlog.get_logger("botd.inbox")

GROUP = "botd"

# KEYS: seen-key, inbox, stream; ARGV: ttl, request id, record, group, consumer. Claims the
# event id, records the message and hands its stream entry to this daemon, atomically:
# the entry id, or 0 for a duplicate. Every entry is delivered inside the script that adds
# it, so ">" returns exactly this one.
_ACCEPT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[4], '$', 'MKSTREAM')
redis.call('XADD', KEYS[3], '*', 'rid', ARGV[2])
local got = redis.call('XREADGROUP', 'GROUP', ARGV[4], ARGV[5], 'COUNT', 1, 'STREAMS', KEYS[3], '>')
return got[1][2][1][1]
"""


_RUNTIME_ONLY = ("durable", "resumed", "progress", "final_answer", "entry")


def _encode(msg: InboundMessage, connector: str, owner: str) -> str:
    data = asdict(msg)
    for runtime_only in _RUNTIME_ONLY:
        data.pop(runtime_only)
    data["history"] = None if msg.history is None else [t.as_dict() for t in msg.history]
    data["stop"] = list(msg.stop)
    # "v": 2 — recorded with a stream entry (records of botd before 0.2 have none).
    return json.dumps({"v": 2, "connector": connector, "owner": owner, "seq": time.time_ns(), "msg": data},
                      ensure_ascii=False)


def _decode(raw: str) -> tuple[str, InboundMessage]:
    rec = json.loads(raw)
    data = dict(rec["msg"])
    if data.get("history") is not None:
        data["history"] = [ChatTurn(t["role"], t["content"]) for t in data["history"]]
    data["stop"] = tuple(data.get("stop") or ())
    known = InboundMessage.__dataclass_fields__
    msg = InboundMessage(**{k: v for k, v in data.items() if k in known and k not in _RUNTIME_ONLY})
    return str(rec["connector"]), msg


class Inbox:
    def __init__(self, redis: RedisManager, prefix: str, owner: str, seen_ttl_s: int = 24 * 3600,
                 lease_s: float = 30.0) -> None:
        self.redis = redis
        self.prefix = prefix
        # This daemon's consumer in the group: several daemons share one Redis.
        self.owner = owner
        self.seen_ttl_s = seen_ttl_s
        # How long an entry may go untouched before another daemon takes it over.
        self.lease_s = lease_s
        self.key = f"{prefix}:inbox"
        self.progress_key = f"{prefix}:inbox:progress"
        self.answer_key = f"{prefix}:inbox:answer"
        self.stream_key = f"{prefix}:inbox:stream"
        # Entries this process is answering: kept fresh, never replayed by itself.
        self.mine: set[str] = set()

    async def accept(self, msg: InboundMessage, connector: str) -> bool:
        """Record ``msg`` (claiming its event id) as this daemon's to answer; False when the
        platform delivered it before (to any daemon).

        With Redis unreachable the message is answered anyway (an answer beats none) but
        is not durable; that is logged.
        """
        seen = f"{self.prefix}:seen:{msg.platform}:{msg.event_id or msg.request_id}"
        try:
            entry = await self.redis.run(
                "inbox accept", self.redis.client.eval, _ACCEPT, 3, seen, self.key, self.stream_key,
                self.seen_ttl_s, msg.request_id, _encode(msg, connector, self.owner), GROUP, self.owner,
            )
        except StoreUnavailable:
            log.warning("inbox unavailable: redis unreachable; answering without a durable record",
                        platform=msg.platform)
            return True
        if not entry:
            metrics.DUPLICATES.labels(msg.platform).inc()
            log.info("duplicate delivery dropped", platform=msg.platform, event_id=msg.event_id)
            return False
        msg.durable, msg.entry = True, str(entry)
        self.mine.add(msg.entry)
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
        self.mine.discard(msg.entry)
        if not msg.durable:
            return

        try:
            await self.redis.run("inbox done", self._drop, msg.request_id, msg.entry)
        except StoreUnavailable:
            # It will be answered again after a restart; the recorded answer keeps the words the same.
            log.warning("could not clear the inbox record: redis unreachable", request_id=msg.request_id)
        msg.durable = False

    async def _drop(self, rid: str, entry: str = "") -> None:
        async with self.redis.client.pipeline(transaction=True) as pipe:
            if entry:
                pipe.xack(self.stream_key, GROUP, entry)
                pipe.xdel(self.stream_key, entry)
            pipe.hdel(self.key, rid)
            pipe.hdel(self.progress_key, rid)
            pipe.hdel(self.answer_key, rid)
            await pipe.execute()

    async def pending(self) -> list[tuple[str, InboundMessage]]:
        """What this daemon's consumer left unfinished in an earlier run, oldest first, as
        (connector name, message)."""
        got = await self.redis.run("inbox read", self._read_own)
        entries = [(eid, fields) for _, items in got for eid, fields in items]
        found = await self._load([e for e in entries if e[0] not in self.mine])
        return await self._sweep() + found

    async def _sweep(self) -> list[tuple[str, InboundMessage]]:
        """Records with no stream entry: a damaged one is dropped (and logged); one this daemon
        wrote before the inbox had a stream (botd < 0.2) gets an entry and is answered."""
        records: dict[str, str] = await self.redis.run("inbox read", self.redis.client.hgetall, self.key)
        adopted: list[tuple[int, str]] = []
        for rid, raw in records.items():
            try:
                rec = json.loads(raw)
                _decode(raw)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("damaged inbox record dropped", request_id=rid, error=f"{type(exc).__name__}: {exc}")
                await self.redis.run("inbox drop", self._drop, rid)
                continue
            if rec.get("v") is None and rec.get("owner", "") in ("", self.owner):
                adopted.append((int(rec.get("seq", 0)), rid))
                records[rid] = json.dumps({**rec, "v": 2}, ensure_ascii=False)
        if not adopted:
            return []

        async def _adopt() -> list[str]:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                for _, rid in sorted(adopted):
                    pipe.xadd(self.stream_key, {"rid": rid})
                    pipe.hset(self.key, rid, records[rid])
                return [str(e) for e in (await pipe.execute())[::2]]

        await self.redis.run("inbox group", self._create_group)
        ids = await self.redis.run("inbox adopt", _adopt)
        # Delivered to this daemon's consumer like any accepted message (nothing else is ever
        # left undelivered, so ">" reads exactly these).
        await self.redis.run("inbox adopt", self.redis.client.xreadgroup, GROUP, self.owner, {self.stream_key: ">"},
                             count=len(ids))
        log.info("inbox records of an earlier botd version adopted", count=len(ids))
        return await self._load([(eid, {"rid": rid}) for eid, (_, rid) in zip(ids, sorted(adopted), strict=True)])

    async def _read_own(self) -> Any:
        try:
            return await self.redis.client.xreadgroup(GROUP, self.owner, {self.stream_key: "0"}, count=10_000)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []  # nothing was accepted on this Redis yet
            raise

    async def _create_group(self) -> None:
        try:
            await self.redis.client.xgroup_create(self.stream_key, GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, count: int = 50) -> list[tuple[str, InboundMessage]]:
        """Take over the entries of daemons that stopped answering them (idle past the lease)."""
        async def _claim() -> Any:
            try:
                return await self.redis.client.xautoclaim(self.stream_key, GROUP, self.owner,
                                                          int(self.lease_s * 1000), "0-0", count=count)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return ["0-0", []]  # nothing was accepted on this Redis yet
                raise

        got = await self.redis.run("inbox claim", _claim)
        entries = [e for e in got[1] if e[0] not in self.mine]
        found = await self._load(entries)
        if found:
            log.warning("taking over messages another daemon did not finish", count=len(found))
        return found

    async def keep_alive(self) -> None:
        """Reset the idle time of the entries this daemon is answering, so that no other daemon
        takes them over (call more often than every ``lease_s``)."""
        if self.mine:
            await self.redis.run("inbox keep-alive", self.redis.client.xclaim, self.stream_key, GROUP,
                                 self.owner, 0, list(self.mine), justid=True)

    async def _load(self, entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, InboundMessage]]:
        """The messages of stream entries, with their progress and stored answers; entries whose
        record is gone or damaged are dropped."""
        if not entries:
            return []
        rids = [(fields or {}).get("rid", "") for _, fields in entries]

        async def _read() -> list[Any]:
            async with self.redis.client.pipeline(transaction=False) as pipe:
                pipe.hmget(self.key, rids)
                pipe.hmget(self.progress_key, rids)
                pipe.hmget(self.answer_key, rids)
                return list(await pipe.execute())

        records, progress, answers = await self.redis.run("inbox read", _read)
        found: list[tuple[str, InboundMessage]] = []
        for (entry, _), rid, raw, prog, answer in zip(entries, rids, records, progress, answers, strict=True):
            try:
                connector, msg = _decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("damaged inbox record dropped", request_id=rid, error=f"{type(exc).__name__}: {exc}")
                await self.redis.run("inbox drop", self._drop, rid, entry)
                continue
            msg.durable, msg.resumed, msg.entry = True, True, entry
            try:
                msg.progress = dict(json.loads(prog)) if prog else {}
            except (ValueError, TypeError):
                msg.progress = {}
            msg.final_answer = answer
            self.mine.add(entry)
            found.append((connector, msg))
        return found
