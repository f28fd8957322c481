"""core/inbox.py ``Inbox`` on a real redis-server alone (no daemon, no model).

Covers: ``accept`` records a message and claims its platform event id in one step (a second
delivery, even a concurrent one, is refused and records nothing; the claim is per platform);
``note_progress`` merges into ``msg.progress`` and persists the merged dict; ``add_answer``
queued on the history's MULTI (``HistoryStore.append_exchange(also=...)``) makes a replay carry
``final_answer``; ``done`` removes record, progress and answer together; ``pending`` returns
only records an earlier run of the same owner left, oldest first, every field intact, and
drops (and logs) a damaged record; with Redis stopped ``accept`` answers anyway (True) but
the message is not durable, and the other calls neither raise nor pretend.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from core.history import HistoryStore
from core.inbox import Inbox
from core.messages import ChatTurn, InboundMessage
from core.redis_store import RedisManager, StoreUnavailable
from tests.helpers import free_port, make_config

PREFIX = "ibx"
KEY, PROGRESS, ANSWER = f"{PREFIX}:inbox", f"{PREFIX}:inbox:progress", f"{PREFIX}:inbox:answer"


def message(text: str = "hi", event_id: str = "Ev1", platform: str = "slack", **extra) -> InboundMessage:
    return InboundMessage(platform=platform, bot="assistant", chat="C1", user="U1", text=text, event_id=event_id,
                          **extra)


async def test_accept_records_the_message_and_claims_its_event_id(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a", seen_ttl_s=600)
    msg = message(route={"channel": "C1", "ts": "1.2"})
    assert await inbox.accept(msg, "slack") is True
    assert msg.durable is True and msg.resumed is False
    client = redis_server.client()
    stored = json.loads(client.hget(KEY, msg.request_id))
    assert stored["connector"] == "slack" and stored["owner"] == "host-a"
    # Its stream entry is delivered to this daemon's consumer at once.
    assert client.xpending(f"{PREFIX}:inbox:stream", "botd")["consumers"] == [{"name": "host-a", "pending": 1}]
    assert stored["msg"]["text"] == "hi" and stored["msg"]["route"] == {"channel": "C1", "ts": "1.2"}
    # Runtime-only state is not written.
    assert not {"durable", "resumed", "progress", "final_answer"} & set(stored["msg"])
    # The claim: one key per platform and event id, expiring after seen_ttl_s.
    assert 590 <= client.ttl(f"{PREFIX}:seen:slack:Ev1") <= 600

    # The platform delivers the same event again (a new object, a new request id).
    again = message()
    assert await inbox.accept(again, "slack") is False
    assert again.durable is False
    assert client.hkeys(KEY) == [msg.request_id]
    # Another daemon on the same Redis refuses it too.
    assert await Inbox(manager, PREFIX, "host-b").accept(message(), "slack") is False
    assert client.hlen(KEY) == 1

    # The same event id from another platform is another message.
    other = message(platform="telegram")
    assert await inbox.accept(other, "telegram") is True
    assert client.hlen(KEY) == 2


async def test_a_claimed_event_id_records_nothing(manager, redis_server):
    # The claim and the record go together: an id claimed already (by anyone) adds no record.
    client = redis_server.client()
    client.set(f"{PREFIX}:seen:slack:EvTaken", "1")
    msg = message(event_id="EvTaken")
    assert await Inbox(manager, PREFIX, "host-a").accept(msg, "slack") is False
    assert client.exists(KEY) == 0 and msg.durable is False


async def test_concurrent_deliveries_of_one_event_record_it_once(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a")
    msgs = [message(event_id="EvRace") for _ in range(20)]
    results = await asyncio.gather(*(inbox.accept(m, "slack") for m in msgs))
    assert results.count(True) == 1
    winner = msgs[results.index(True)]
    assert [m.durable for m in msgs].count(True) == 1 and winner.durable
    assert redis_server.client().hkeys(KEY) == [winner.request_id]


async def test_without_an_event_id_the_request_id_is_the_claim(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a")
    a, b = message(event_id=""), message(event_id="")
    assert await inbox.accept(a, "api") and await inbox.accept(b, "api")
    assert redis_server.client().hlen(KEY) == 2
    # Accepting the very same message twice is still a duplicate.
    assert await inbox.accept(a, "api") is False


async def test_note_progress_merges_and_persists(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a")
    msg = message()
    assert await inbox.accept(msg, "slack")
    await inbox.note_progress(msg, {"ts": "111.1"})
    await inbox.note_progress(msg, {"parts": 2})
    await inbox.note_progress(msg, {"parts": 3})
    assert msg.progress == {"ts": "111.1", "parts": 3}
    assert json.loads(redis_server.client().hget(PROGRESS, msg.request_id)) == {"ts": "111.1", "parts": 3}
    # The next run reads it back.
    [(_, replay)] = await Inbox(manager, PREFIX, "host-a").pending()
    assert replay.progress == {"ts": "111.1", "parts": 3}

    # A message that is not durable keeps its progress in memory only.
    loose = message(event_id="Ev2")
    await inbox.note_progress(loose, {"ts": "9"})
    assert loose.progress == {"ts": "9"}
    assert not redis_server.client().hexists(PROGRESS, loose.request_id)


async def test_the_answer_stored_with_the_history_comes_back_on_replay(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a")
    history = HistoryStore(manager, PREFIX, 3600, 200)
    msg = message(text="What is a river?")
    assert await inbox.accept(msg, "slack")
    await history.append_exchange(msg.thread_key, msg.text, "Flowing water.",
                                  also=lambda pipe: inbox.add_answer(pipe, msg, "Flowing water."))
    client = redis_server.client()
    assert client.hget(ANSWER, msg.request_id) == "Flowing water."
    assert await history.load(msg.thread_key) == [ChatTurn("user", "What is a river?"),
                                                  ChatTurn("assistant", "Flowing water.")]
    [(connector, replay)] = await Inbox(manager, PREFIX, "host-a").pending()
    assert connector == "slack" and replay.final_answer == "Flowing water."

    # The same through a raw MULTI; a message that is not durable queues nothing.
    loose = message(event_id="Ev2")
    async with manager.client.pipeline(transaction=True) as pipe:
        inbox.add_answer(pipe, loose, "x")
        assert len(pipe) == 0
        await pipe.execute()
    assert not client.hexists(ANSWER, loose.request_id)


async def test_done_removes_record_progress_and_answer_together(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a")
    msg, keep = message(), message(event_id="Ev2")
    assert await inbox.accept(msg, "slack") and await inbox.accept(keep, "slack")
    for m in (msg, keep):
        await inbox.note_progress(m, {"ts": "1"})
        async with manager.client.pipeline(transaction=True) as pipe:
            inbox.add_answer(pipe, m, "answer")
            await pipe.execute()
    client = redis_server.client()
    await inbox.done(msg)
    assert msg.durable is False
    for key in (KEY, PROGRESS, ANSWER):
        assert client.hkeys(key) == [keep.request_id], key
    # Nothing of it is replayed; the other message still is.
    assert [m.request_id for _, m in await Inbox(manager, PREFIX, "host-a").pending()] == [keep.request_id]
    # done on a message that is no longer durable is a no-op, not an error.
    await inbox.done(msg)
    assert client.hlen(KEY) == 1


async def test_pending_returns_earlier_runs_of_this_owner_oldest_first(manager):
    earlier = Inbox(manager, PREFIX, "host-a")
    texts = ["first", "second", "third", "fourth"]
    sent = []
    for i, text in enumerate(texts):
        m = message(text=text, event_id=f"Ev{i}")
        assert await earlier.accept(m, "slack" if i % 2 else "telegram")
        sent.append(m)
    # Another owner's record and one of the current run's own are not for this run.
    assert await Inbox(manager, PREFIX, "host-b").accept(message(text="theirs", event_id="EvB"), "slack")
    now = Inbox(manager, PREFIX, "host-a")
    assert await now.accept(message(text="mine now", event_id="EvNow"), "slack")

    pending = await now.pending()
    assert [m.text for _, m in pending] == texts
    assert [c for c, _ in pending] == ["telegram", "slack", "telegram", "slack"]
    assert [m.request_id for _, m in pending] == [m.request_id for m in sent]
    assert all(m.durable and m.resumed and m.progress == {} and m.final_answer is None for _, m in pending)
    # The earlier run itself (still alive) does not take its own records.
    assert [m.text for _, m in await earlier.pending()] == ["mine now"]
    assert [m.text for _, m in await Inbox(manager, PREFIX, "host-b").pending()] == ["theirs"]


async def test_a_replayed_message_keeps_every_field(manager):
    msg = InboundMessage(platform="api", bot="helper", chat="c9", user="u9", text="and then?", thread="t1",
                         event_id="E9", history=[ChatTurn("user", "hi"), ChatTurn("assistant", "hello 你好")],
                         system="Be brief.", max_tokens=33, temperature=0.2, stop=("END", "\n\n"),
                         route={"reply_to": [1, 2], "n": None})
    assert await Inbox(manager, PREFIX, "h").accept(msg, "api")
    [(connector, got)] = await Inbox(manager, PREFIX, "h").pending()
    assert connector == "api"
    for name in ("platform", "bot", "chat", "user", "text", "thread", "event_id", "history", "system",
                 "max_tokens", "temperature", "stop", "request_id", "route"):
        assert getattr(got, name) == getattr(msg, name), name
    assert isinstance(got.stop, tuple) and all(isinstance(t, ChatTurn) for t in got.history)


async def test_a_damaged_record_is_dropped_and_logged(manager, redis_server):
    earlier = Inbox(manager, PREFIX, "host-a")
    good = message(text="good")
    assert await earlier.accept(good, "slack")
    client = redis_server.client()
    client.hset(KEY, "garbage", "{not json")
    client.hset(KEY, "nofields", json.dumps({"connector": "slack", "owner": "host-a", "run": "x", "seq": 1,
                                             "msg": {"text": "no platform"}}))
    client.hset(KEY, "notadict", json.dumps([1, 2, 3]))
    with capture_logs() as logs:
        pending = await Inbox(manager, PREFIX, "host-a").pending()
    assert [m.text for _, m in pending] == ["good"]
    dropped = sorted(e["request_id"] for e in logs if e["event"] == "damaged inbox record dropped")
    assert dropped == ["garbage", "nofields", "notadict"]
    assert all(e["log_level"] == "error" for e in logs if e["event"] == "damaged inbox record dropped")
    assert client.hkeys(KEY) == [good.request_id]


async def test_damaged_progress_reads_as_no_progress(manager, redis_server):
    msg = message()
    assert await Inbox(manager, PREFIX, "h").accept(msg, "slack")
    redis_server.client().hset(PROGRESS, msg.request_id, "{oops")
    [(_, got)] = await Inbox(manager, PREFIX, "h").pending()
    assert got.progress == {} and got.text == "hi"


async def test_with_redis_stopped_accept_answers_anyway_without_a_durable_record(manager, redis_server):
    inbox = Inbox(manager, PREFIX, "host-a")
    redis_server.stop()
    msg = message()
    with capture_logs() as logs:
        assert await inbox.accept(msg, "slack") is True
    assert msg.durable is False
    assert any(e["event"].startswith("inbox unavailable") and e["log_level"] == "warning" for e in logs)
    # The rest of the message's life neither raises nor claims durability.
    await inbox.note_progress(msg, {"ts": "1"})
    assert msg.progress == {"ts": "1"}
    await inbox.done(msg)
    with pytest.raises(StoreUnavailable):
        await inbox.pending()
    redis_server.start()
    assert redis_server.client().exists(KEY, PROGRESS) == 0


async def test_redis_lost_after_accept_keeps_the_record_for_a_later_run(manager, tmp_path):
    # Redis becomes unreachable after the record was written: progress and done fail softly
    # (logged), and the record, still in Redis, is answered again by the next run.
    msg = message()
    assert await Inbox(manager, PREFIX, "host-a").accept(msg, "slack")
    # The same daemon's view once Redis is out of reach: a manager whose server is gone.
    cfg = make_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0", redis={"socket_timeout_s": 0.5})
    unreachable = RedisManager(cfg.redis, tmp_path)
    await unreachable.start()
    try:
        assert not unreachable.healthy
        cut_off = Inbox(unreachable, PREFIX, "host-a")
        with capture_logs() as logs:
            await cut_off.note_progress(msg, {"ts": "5"})
            await cut_off.done(msg)
    finally:
        await unreachable.close()
    events = [e["event"] for e in logs]
    assert "could not record reply progress: redis unreachable" in events
    assert "could not clear the inbox record: redis unreachable" in events
    assert msg.durable is False and msg.progress == {"ts": "5"}
    [(_, replay)] = await Inbox(manager, PREFIX, "host-a").pending()
    assert replay.request_id == msg.request_id and replay.progress == {}


async def test_a_dead_daemons_messages_are_taken_over_after_the_lease_and_a_live_ones_are_not(manager):
    dead = Inbox(manager, PREFIX, "host-a", lease_s=0.3)
    alive = Inbox(manager, PREFIX, "host-b", lease_s=0.3)
    taker = Inbox(manager, PREFIX, "host-c", lease_s=0.3)
    lost, kept = message(text="lost", event_id="E-a"), message(text="kept", event_id="E-b")
    assert await dead.accept(lost, "slack") and await alive.accept(kept, "slack")
    await dead.note_progress(lost, {"sent": ["1.0"]})
    assert await taker.claim() == []  # nothing has been idle for the lease yet
    for _ in range(4):  # host-b keeps answering (keep-alive); host-a has died
        await asyncio.sleep(0.15)
        await alive.keep_alive()
    claimed = await taker.claim()
    assert [(c, m.text) for c, m in claimed] == [("slack", "lost")]
    got = claimed[0][1]
    assert got.resumed and got.durable and got.progress == {"sent": ["1.0"]}  # edits, never re-posts
    assert await taker.claim() == []  # taken once: it is host-c's now
    await taker.done(got)
    assert await Inbox(manager, PREFIX, "host-a").pending() == []  # host-a, restarted, finds nothing


async def test_records_of_an_inbox_without_a_stream_are_adopted(manager, redis_server):
    """An upgrade: records botd wrote before the inbox had a stream are answered after it."""
    old = {"connector": "telegram", "owner": "host-a", "run": "r1", "seq": 5,
           "msg": {"platform": "telegram", "bot": "assistant", "chat": "1", "user": "1", "text": "from before",
                   "request_id": "old1", "route": {"chat_id": 1}}}
    redis_server.client().hset(KEY, "old1", json.dumps(old))
    pending = await Inbox(manager, PREFIX, "host-a").pending()
    assert [(c, m.text) for c, m in pending] == [("telegram", "from before")]
    again = await Inbox(manager, PREFIX, "host-a").pending()  # a second restart: still pending, once
    assert [m.request_id for _, m in again] == ["old1"]


async def test_a_fresh_redis_is_no_error(manager, redis_server):
    """Before any message was accepted there is no stream: reading and claiming find nothing,
    log no error, and create no key (the daemon runs these every few seconds)."""
    inbox = Inbox(manager, PREFIX, "host-a")
    with capture_logs() as logs:
        assert await inbox.pending() == []
        assert await inbox.claim() == []
        await inbox.keep_alive()
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert manager.healthy
    assert redis_server.client().keys(f"{PREFIX}:*") == []


# -- ownership: a daemon cut off past the lease never acts on a message another daemon took ----------


async def _claimed_by_b(manager, lease_s: float = 0.3) -> tuple[Inbox, Inbox, InboundMessage, InboundMessage]:
    """host-a accepts a message and then goes quiet (cut off) past the lease; host-b claims it."""
    a = Inbox(manager, PREFIX, "host-a", lease_s=lease_s)
    b = Inbox(manager, PREFIX, "host-b", lease_s=lease_s)
    msg = message(text="contested", event_id="E-cut")
    assert await a.accept(msg, "slack")
    await a.note_progress(msg, {"sent": ["1.0"]})
    await asyncio.sleep(lease_s + 0.1)
    [(_, taken)] = await b.claim()
    return a, b, msg, taken


async def test_keep_alive_never_takes_back_a_message_another_daemon_claimed(manager, redis_server):
    a, b, msg, taken = await _claimed_by_b(manager)
    client = redis_server.client()
    stream = f"{PREFIX}:inbox:stream"
    # host-a is back and runs its keep-alive round: the entry stays host-b's.
    await a.keep_alive()
    [pel] = client.xpending_range(stream, "botd", "-", "+", 10)
    assert pel["consumer"] == "host-b"
    assert msg.entry not in a.mine
    # host-a's delivery stops at its next post or edit, whatever its cache says.
    fence = a.fence(msg)
    assert fence is None or await _raises_not_owned(fence)
    # host-b still owns it and goes on.
    fence_b = b.fence(taken)
    assert fence_b is not None
    await fence_b()
    await b.keep_alive()
    assert client.xpending_range(stream, "botd", "-", "+", 10)[0]["consumer"] == "host-b"


async def test_a_fence_stops_a_delivery_once_another_daemon_claimed_the_message(manager):
    a = Inbox(manager, PREFIX, "host-a", lease_s=0.3)
    b = Inbox(manager, PREFIX, "host-b", lease_s=0.3)
    msg = message(text="contested", event_id="E-fence")
    assert await a.accept(msg, "slack")
    fence = a.fence(msg)
    assert fence is not None
    await fence()  # fresh: this daemon's
    await asyncio.sleep(0.4)  # host-a paused past the lease (no keep-alive)
    assert [m.text for _, m in await b.claim()] == ["contested"]
    assert await _raises_not_owned(fence)
    assert await _raises_not_owned(fence)  # and stays stopped


async def test_a_fence_stops_a_delivery_when_redis_is_out_of_reach_past_the_lease(manager, redis_server):
    a = Inbox(manager, PREFIX, "host-a", lease_s=2.0)
    msg = message(text="cut off", event_id="E-down")
    assert await a.accept(msg, "slack")
    fence = a.fence(msg)
    assert fence is not None
    redis_server.stop()
    await fence()  # within half the lease of the last check: still this daemon's
    await asyncio.sleep(1.1)
    with capture_logs() as logs:
        assert await _raises_not_owned(fence)
    assert [e["event"] for e in logs if e["log_level"] == "warning"][-1] == (
        "stopped answering a message: it is no longer this daemon's")
    assert msg.entry not in a.mine  # not kept fresh: whoever claims it after the lease answers it


async def test_done_after_losing_the_message_leaves_the_new_owners_record(manager, redis_server):
    a, b, msg, taken = await _claimed_by_b(manager)
    client = redis_server.client()
    await a.done(msg)  # host-a finished its (stale) delivery anyway
    assert client.hkeys(KEY) == [msg.request_id]
    assert client.hget(PROGRESS, msg.request_id) is not None
    assert client.xpending(f"{PREFIX}:inbox:stream", "botd")["consumers"] == [{"name": "host-b", "pending": 1}]
    await b.done(taken)
    assert client.hlen(KEY) == 0 and client.xlen(f"{PREFIX}:inbox:stream") == 0


async def _raises_not_owned(fence) -> bool:
    from core.inbox import NotOwned

    with pytest.raises(NotOwned):
        await fence()
    return True


# -- dead letters: a message handed out max_deliveries times is not handed out again --------------------


async def test_a_message_handed_out_too_often_goes_to_the_dead_letters_once(manager, redis_server):
    alerts: list[dict] = []
    msg = message(text="crashes every daemon", event_id="E-poison")
    assert await Inbox(manager, PREFIX, "host-a", max_deliveries=3).accept(msg, "slack")  # delivery 1
    # The daemon dies while answering, restarts, dies again: deliveries 2 and 3 (a restart reads its own).
    for _ in range(2):
        [(_, again)] = await Inbox(manager, PREFIX, "host-a", max_deliveries=3).pending()
        assert again.request_id == msg.request_id
    await asyncio.sleep(0.35)
    # The next daemon to pick it up (another one taking it over, here) does not answer it.
    taker = Inbox(manager, PREFIX, "host-b", lease_s=0.3, max_deliveries=3)
    taker.on_dead = lambda **fields: alerts.append(fields)
    with capture_logs() as logs:
        assert await taker.claim() == []
    client = redis_server.client()
    assert client.hlen(KEY) == 0 and client.xlen(f"{PREFIX}:inbox:stream") == 0
    assert client.xpending(f"{PREFIX}:inbox:stream", "botd")["pending"] == 0
    [letter] = [json.loads(x) for x in client.lrange(f"{PREFIX}:inbox:dead", 0, -1)]
    assert letter["request_id"] == msg.request_id and letter["deliveries"] == 4 and letter["by"] == "host-b"
    assert letter["record"]["msg"]["text"] == "crashes every daemon"
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == [
        "message moved to the dead letters: handed out too often without being answered"]
    assert errors[0]["request_id"] == msg.request_id and errors[0]["deliveries"] == 4
    assert alerts == [{"platform": "slack", "bot": "assistant", "chat": "C1", "request_id": msg.request_id,
                       "deliveries": 4, "list_name": f"{PREFIX}:inbox:dead"}]
    # The daemon's alert text takes exactly these fields, in both languages.
    from bots import texts

    text = texts.alert("dead_letter", "both", instance="node-1", **alerts[0])
    assert "死信" in text and "dead-letter list ibx:inbox:dead" in text and "4" in text
    # Not replayed: by no daemon, at no restart.
    await asyncio.sleep(0.35)
    for owner in ("host-a", "host-b", "host-c"):
        assert await Inbox(manager, PREFIX, owner, lease_s=0.3).pending() == []
        assert await Inbox(manager, PREFIX, owner, lease_s=0.3).claim() == []
    assert client.llen(f"{PREFIX}:inbox:dead") == 1 and len(alerts) == 1
