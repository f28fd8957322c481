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

Ownership is checked, not assumed. A daemon cut off from Redis (a partition, a long pause)
cannot keep its entries fresh, and after the lease another daemon claims them and answers;
so before each post and edit the delivery asks :meth:`Inbox.fence` whether the entry is still
this daemon's. One Lua call checks that the consumer still holds the entry and resets its
idle time (never taking it back from another consumer); a confirmed ownership holds until
``lease_s`` has passed since the check was sent, so the answer is trusted for a short while
(:data:`RECHECK_S`) and, with Redis unreachable, for half the lease at most: past that, or
once the entry has moved, :class:`NotOwned` stops the delivery (nothing more is shown), and
the record is left to its owner. Clearing a record is fenced the same way.

An entry handed to daemons ``max_deliveries`` times without being finished (a message that
crashes the process would otherwise be replayed by every daemon forever) is not answered
again: it moves to the dead-letter list ``{prefix}:inbox:dead`` (its record, why and how
often; the newest :data:`DEAD_KEPT` are kept), with one log line and an admin alert.

Two companions make a replay exactly-once for the user, whichever daemon replays:

* ``progress`` — what has already been posted (message ids, parts sent), so a replay
  edits the message it started instead of posting a second one;
* ``answer`` — the finished answer text, written in the same MULTI as the thread's
  history, so a replay after the history was stored re-shows that answer instead of
  generating (and storing) a second one.

Keys: ``{prefix}:inbox`` (hash: request id -> record), ``{prefix}:inbox:progress``,
``{prefix}:inbox:answer`` (hashes keyed by request id), ``{prefix}:inbox:stream`` (the
stream; group ``botd``), ``{prefix}:inbox:dead`` (list: the dead letters, JSON).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from core import metrics
from core.errors import BotdError
from core.messages import Attachment, ChatTurn, InboundMessage
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


# KEYS: stream; ARGV: group, consumer, entry ids. The entries this consumer still holds, their
# idle time reset (so no other daemon claims them for another lease); an entry another consumer
# claimed meanwhile is left alone (a plain XCLAIM would take it back from the daemon answering it).
_REFRESH = """
local held = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held[#held + 1] = ARGV[i]
  end
end
return held
"""

# KEYS: stream, inbox, progress, answer; ARGV: group, consumer, entry, request id. Clears the
# record only while this consumer holds the entry: 1, else 0 (another daemon has it now).
_DONE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[4])
return 1
"""

# KEYS: stream, inbox, progress, answer; ARGV: group, consumer, lead request id, lead entry, lead's
# new record, then (request id, entry) of each message merged into it. A burst becomes one turn:
# the lead's record takes the merged text, the others' records and entries go, in one step, and
# only while this consumer holds every entry (else nothing changes: 0).
_MERGE = """
local function held(entry)
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1)
  return p[1] and p[1][2] == ARGV[2]
end
if not held(ARGV[4]) then
  return 0
end
for i = 6, #ARGV, 2 do
  if not held(ARGV[i + 1]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
for i = 6, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i + 1])
  redis.call('XDEL', KEYS[1], ARGV[i + 1])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
return 1
"""

# A confirmed ownership is trusted this long (at most a quarter of the lease) before each post or
# edit asks Redis again: about one Redis call per answer and second, however often it edits.
RECHECK_S = 1.0
# Dead letters kept (the newest); older ones are trimmed.
DEAD_KEPT = 1000


class NotOwned(BotdError):
    """This daemon no longer owns the message (another daemon took it over, or Redis was out of
    reach for longer than the lease allows): nothing more may be shown for it here."""


class _Held:
    """This daemon's hold on one stream entry, for one delivery of it."""

    __slots__ = ("confirmed_at", "lost")

    def __init__(self, confirmed_at: float | None) -> None:
        # monotonic time at which a check that found the entry ours was *sent* (None: never).
        self.confirmed_at = confirmed_at
        self.lost = False


_RUNTIME_ONLY = ("durable", "resumed", "progress", "final_answer", "entry")


def _encode(msg: InboundMessage, connector: str, owner: str) -> str:
    data = asdict(msg)
    for runtime_only in _RUNTIME_ONLY:
        data.pop(runtime_only)
    data["history"] = None if msg.history is None else [t.as_dict() for t in msg.history]
    data["stop"] = list(msg.stop)
    data["attachments"] = [a.as_dict() for a in msg.attachments]
    # "v": 2 — recorded with a stream entry (records of botd before 0.2 have none).
    return json.dumps({"v": 2, "connector": connector, "owner": owner, "seq": time.time_ns(), "msg": data},
                      ensure_ascii=False)


def _decode(raw: str) -> tuple[str, InboundMessage]:
    rec = json.loads(raw)
    data = dict(rec["msg"])
    if data.get("history") is not None:
        data["history"] = [ChatTurn(t["role"], t["content"]) for t in data["history"]]
    data["stop"] = tuple(data.get("stop") or ())
    data["attachments"] = [Attachment.from_dict(a) for a in data.get("attachments") or ()]
    known = InboundMessage.__dataclass_fields__
    msg = InboundMessage(**{k: v for k, v in data.items() if k in known and k not in _RUNTIME_ONLY})
    return str(rec["connector"]), msg


class Inbox:
    def __init__(self, redis: RedisManager, prefix: str, owner: str, seen_ttl_s: int = 24 * 3600,
                 lease_s: float = 30.0, max_deliveries: int = 5) -> None:
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
        self.dead_key = f"{prefix}:inbox:dead"
        # Times an entry may be handed to a daemon; at the next it goes to the dead letters.
        self.max_deliveries = max_deliveries
        # Entries this process is answering: kept fresh, never replayed by itself.
        self.mine: set[str] = set()
        # Its hold on each of them (the delivery under way checks it before every post and edit).
        self._held: dict[str, _Held] = {}
        # Told of each dead letter (the daemon sends an admin alert): fields of the alert.
        self.on_dead: Callable[..., None] | None = None

    async def accept(self, msg: InboundMessage, connector: str) -> bool:
        """Record ``msg`` (claiming its event id) as this daemon's to answer; False when the
        platform delivered it before (to any daemon).

        With Redis unreachable the message is answered anyway (an answer beats none) but
        is not durable; that is logged.
        """
        seen = f"{self.prefix}:seen:{msg.platform}:{msg.event_id or msg.request_id}"
        sent_at = time.monotonic()
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
        self._hold(msg.entry, sent_at)
        return True

    def _hold(self, entry: str, confirmed_at: float | None) -> None:
        """A new delivery of ``entry`` here: an earlier one still under way loses its hold."""
        old = self._held.get(entry)
        if old is not None:
            old.lost = True
        self._held[entry] = _Held(confirmed_at)
        self.mine.add(entry)

    def _let_go(self, entry: str) -> None:
        self.mine.discard(entry)
        held = self._held.pop(entry, None)
        if held is not None:
            held.lost = True

    def fence(self, msg: InboundMessage) -> Callable[[], Awaitable[None]] | None:
        """The check a delivery runs before each post and edit of ``msg``'s answer: it raises
        :class:`NotOwned` once the message is no longer this daemon's. None for a message with
        no stream entry (accepted while Redis was unreachable: nobody else can claim it)."""
        held = self._held.get(msg.entry) if msg.durable and msg.entry else None
        if held is None:
            return None
        entry = msg.entry

        async def check() -> None:
            await self._confirm(entry, held)

        return check

    async def _confirm(self, entry: str, held: _Held) -> None:
        if held.lost or self._held.get(entry) is not held or entry not in self.mine:
            raise NotOwned(f"inbox entry {entry} is no longer this daemon's")
        # Nobody can claim the entry before lease_s has passed since a check found it ours (it
        # reset its idle time); half of that is the most this daemon acts on an old answer,
        # the other half is the margin for the platform call it is about to make.
        window = self.lease_s / 2
        recheck = min(RECHECK_S, self.lease_s / 4)
        since = held.confirmed_at
        if since is not None and time.monotonic() - since < recheck:
            return
        sent_at = time.monotonic()
        try:
            owned = await self._refresh([entry], timeout_s=window)
        except StoreUnavailable as exc:
            if since is not None and time.monotonic() - since < window:
                return  # still within the lease of the last check: the entry cannot have moved
            self._lose(entry, held, "redis unreachable for longer than the lease allows")
            raise NotOwned(f"inbox entry {entry}: redis unreachable past the lease") from exc
        if entry not in owned:
            self._lose(entry, held, "another daemon took it over")
            raise NotOwned(f"inbox entry {entry} was taken over by another daemon")
        held.confirmed_at = sent_at

    def _lose(self, entry: str, held: _Held, why: str) -> None:
        held.lost = True
        if self._held.get(entry) is held:
            # Not kept fresh any more: its new owner (or, once Redis is back, whichever daemon
            # claims it after the lease) answers it, editing what was shown.
            self._let_go(entry)
            log.warning("stopped answering a message: it is no longer this daemon's", entry=entry, why=why)

    async def _refresh(self, entries: list[str], timeout_s: float) -> set[str]:
        """Those of ``entries`` this consumer still holds (their idle time reset). Waits at most
        ``timeout_s``: a call that hangs (Redis cut off) is left to time out on its own rather
        than cancelled (redis-py can swallow a cancellation mid-command)."""
        call = asyncio.ensure_future(self.redis.run(
            "inbox ownership", self.redis.client.eval, _REFRESH, 1, self.stream_key, GROUP, self.owner, *entries))
        done, _ = await asyncio.wait({call}, timeout=max(timeout_s, 0.0))
        if not done:
            call.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise StoreUnavailable("redis inbox ownership: no answer in time")
        return {str(e) for e in call.result() or []}

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
        """The platform has the final answer (or a final refusal): forget the record (unless
        another daemon holds the message now: then the record is its to clear)."""
        self._let_go(msg.entry)
        if not msg.durable:
            return

        try:
            if not msg.entry:
                await self.redis.run("inbox done", self._drop, msg.request_id)
            elif not await self.redis.run("inbox done", self.redis.client.eval, _DONE, 4, self.stream_key, self.key,
                                          self.progress_key, self.answer_key, GROUP, self.owner, msg.entry,
                                          msg.request_id):
                log.warning("inbox record left to the daemon that took the message over", request_id=msg.request_id)
        except StoreUnavailable:
            # It will be answered again after a restart; the recorded answer keeps the words the same.
            log.warning("could not clear the inbox record: redis unreachable", request_id=msg.request_id)
        msg.durable = False

    async def merge(self, lead: InboundMessage, merged: list[InboundMessage], connector: str) -> bool:
        """Record that ``merged`` (later messages of one burst) are answered as part of ``lead``,
        whose text and attachments already hold theirs: the lead's record is rewritten and the
        others' records removed, atomically, so that a restart answers the merged turn once and
        loses none of its words. False (nothing changed) when one of them is no longer this
        daemon's or Redis cannot be reached: then each is answered on its own."""
        if not lead.durable or not lead.entry:
            return not any(m.durable for m in merged)
        others = [(m.request_id, m.entry) for m in merged if m.durable and m.entry]
        try:
            ok = await self.redis.run(
                "inbox merge", self.redis.client.eval, _MERGE, 4, self.stream_key, self.key, self.progress_key,
                self.answer_key, GROUP, self.owner, lead.request_id, lead.entry, _encode(lead, connector, self.owner),
                *[x for pair in others for x in pair])
        except StoreUnavailable:
            log.warning("could not merge a burst of messages: redis unreachable; answering each", count=len(merged) + 1)
            return False
        if not ok:
            return False
        for m in merged:
            self._let_go(m.entry)
            m.durable = False
        return True

    def let_go(self, msg: InboundMessage) -> None:
        """This daemon stops answering ``msg`` without finishing it (it is no longer its own, or
        it waits for a daemon that runs its connector): not kept fresh any more."""
        self._let_go(msg.entry)

    def _forget(self, pipe: Pipeline, rid: str, entry: str = "") -> None:
        """Add to ``pipe`` what removes one message: its stream entry, record, progress and answer."""
        if entry:
            pipe.xack(self.stream_key, GROUP, entry)
            pipe.xdel(self.stream_key, entry)
        pipe.hdel(self.key, rid)
        pipe.hdel(self.progress_key, rid)
        pipe.hdel(self.answer_key, rid)

    async def _drop(self, rid: str, entry: str = "") -> None:
        async with self.redis.client.pipeline(transaction=True) as pipe:
            self._forget(pipe, rid, entry)
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
        takes them over (call more often than every ``lease_s``). An entry another daemon
        claimed meanwhile (this one was cut off past the lease) is not taken back: its
        delivery here stops at its next post or edit."""
        entries = list(self.mine)
        if not entries:
            return
        sent_at = time.monotonic()
        owned = await self._refresh(entries, timeout_s=self.lease_s / 2)
        for entry in entries:
            held = self._held.get(entry)
            if held is None or entry not in self.mine:
                continue  # finished meanwhile
            if entry in owned:
                held.confirmed_at = sent_at
            else:
                self._lose(entry, held, "another daemon took it over")

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
                for entry, _ in entries:
                    pipe.xpending_range(self.stream_key, GROUP, entry, entry, 1)
                return list(await pipe.execute())

        sent_at = time.monotonic()
        records, progress, answers, *pel = await self.redis.run("inbox read", _read)
        found: list[tuple[str, InboundMessage]] = []
        for (entry, _), rid, raw, prog, answer, state in zip(entries, rids, records, progress, answers, pel,
                                                            strict=True):
            try:
                connector, msg = _decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("damaged inbox record dropped", request_id=rid, error=f"{type(exc).__name__}: {exc}")
                await self.redis.run("inbox drop", self._drop, rid, entry)
                continue
            deliveries = int(state[0]["times_delivered"]) if state else 0
            if deliveries > self.max_deliveries:
                await self._dead_letter(entry, rid, raw, connector, msg, deliveries)
                continue
            msg.durable, msg.resumed, msg.entry = True, True, entry
            try:
                msg.progress = dict(json.loads(prog)) if prog else {}
            except (ValueError, TypeError):
                msg.progress = {}
            msg.final_answer = answer
            # Claimed or read just now: its idle time was reset by that call.
            self._hold(entry, sent_at)
            found.append((connector, msg))
        return found

    async def _dead_letter(self, entry: str, rid: str, raw: str, connector: str, msg: InboundMessage,
                           deliveries: int) -> None:
        """Handed out more than ``max_deliveries`` times and never finished: moved to the dead
        letters instead of being answered again (logged once, and the admins alerted)."""
        letter = json.dumps({"request_id": rid, "entry": entry, "connector": connector, "deliveries": deliveries,
                             "by": self.owner, "at": time.time(), "record": json.loads(raw)}, ensure_ascii=False)

        async def _move() -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.rpush(self.dead_key, letter)
                pipe.ltrim(self.dead_key, -DEAD_KEPT, -1)
                self._forget(pipe, rid, entry)
                await pipe.execute()

        await self.redis.run("inbox dead letter", _move)
        log.error("message moved to the dead letters: handed out too often without being answered",
                  request_id=rid, platform=msg.platform, connector=connector, bot=msg.bot, chat=msg.chat,
                  deliveries=deliveries, max_deliveries=self.max_deliveries, dead_letters=self.dead_key)
        if self.on_dead is not None:
            try:
                self.on_dead(platform=msg.platform, bot=msg.bot, chat=msg.chat, request_id=rid,
                             deliveries=deliveries, list_name=self.dead_key)
            except Exception:
                log.exception("dead letter listener failed")
