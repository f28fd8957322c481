"""core/history.py ``HistoryStore`` on a real redis-server alone (no daemon, no model).

Covers: an exchange appended with ``append_exchange`` reads back with ``load`` as ``ChatTurn``
objects in order (``limit`` included, foreign entries skipped); the list is trimmed to
``max_messages`` and given the idle TTL on every append; ``reset`` is True once, then False;
threads (``ThreadKey``) never see each other's turns, ids holding ``:`` included; the ``also``
hook runs in the same MULTI; and with Redis down every call raises ``StoreUnavailable``
(and works again once Redis is back).
"""

from __future__ import annotations

import json

import pytest
from redis.exceptions import ResponseError

from core.history import HistoryStore
from core.messages import ChatTurn, ThreadKey
from core.redis_store import RedisManager, StoreUnavailable

PREFIX = "hx"
TTL_S = 3600


def store(mgr: RedisManager, max_messages: int = 200) -> HistoryStore:
    return HistoryStore(mgr, PREFIX, TTL_S, max_messages)


THREAD = ThreadKey("telegram", "assistant", "42", "7")


async def test_an_exchange_round_trips_as_chat_turns_in_order(manager, redis_server):
    h = store(manager)
    assert await h.load(THREAD) == []
    await h.append_exchange(THREAD, "Hello, who are you?", "I am botd. 你好！")
    await h.append_exchange(THREAD, "What is 2+2?", "4")
    turns = await h.load(THREAD)
    assert turns == [
        ChatTurn("user", "Hello, who are you?"), ChatTurn("assistant", "I am botd. 你好！"),
        ChatTurn("user", "What is 2+2?"), ChatTurn("assistant", "4"),
    ]
    # Stored where the docstring says, one JSON object per turn, non-ASCII kept as is.
    raw = redis_server.client().lrange(f"{PREFIX}:hist:telegram:assistant:42:7", 0, -1)
    assert len(raw) == 4
    assert json.loads(raw[1])["content"] == "I am botd. 你好！" and "你好" in raw[1]
    assert all(isinstance(json.loads(r)["ts"], float) for r in raw)
    # ``limit``: the most recent turns, still oldest first.
    assert await h.load(THREAD, limit=2) == [ChatTurn("user", "What is 2+2?"), ChatTurn("assistant", "4")]


async def test_foreign_or_damaged_entries_are_skipped_on_load(manager, redis_server):
    h = store(manager)
    await h.append_exchange(THREAD, "q", "a")
    redis_server.client().rpush(h.key(THREAD), "not json", json.dumps({"role": "system", "content": "x"}),
                                json.dumps({"role": "user", "content": 5}), json.dumps([1, 2]))
    assert await h.load(THREAD) == [ChatTurn("user", "q"), ChatTurn("assistant", "a")]


async def test_the_list_is_trimmed_to_max_messages_keeping_the_newest(manager, redis_server):
    h = store(manager, max_messages=4)
    for i in range(5):
        await h.append_exchange(THREAD, f"q{i}", f"a{i}")
    assert redis_server.client().llen(h.key(THREAD)) == 4
    assert [t.content for t in await h.load(THREAD)] == ["q3", "a3", "q4", "a4"]
    # A limit above max_messages is capped by it.
    assert len(await h.load(THREAD, limit=100)) == 4


async def test_every_append_sets_the_idle_ttl(manager, redis_server):
    h = store(manager)
    await h.append_exchange(THREAD, "q", "a")
    client = redis_server.client()
    assert TTL_S - 5 <= client.ttl(h.key(THREAD)) <= TTL_S
    # The expiry is renewed: an append after a shortened TTL puts it back to the full idle time.
    client.expire(h.key(THREAD), 10)
    await h.append_exchange(THREAD, "q2", "a2")
    assert client.ttl(h.key(THREAD)) > 10


async def test_reset_is_true_when_there_was_history_then_false(manager, redis_server):
    h = store(manager)
    other = ThreadKey("telegram", "assistant", "42", "8")
    await h.append_exchange(THREAD, "q", "a")
    await h.append_exchange(other, "q", "a")
    assert await h.reset(THREAD) is True
    assert await h.load(THREAD) == []
    assert await h.reset(THREAD) is False
    # Only that thread was forgotten.
    assert await h.load(other) == [ChatTurn("user", "q"), ChatTurn("assistant", "a")]


async def test_threads_are_isolated_including_ids_that_hold_colons(manager):
    h = store(manager)
    # Joined naively with ':' these two would be the same key.
    a = ThreadKey("slack", "bot", "C1:x", "")
    b = ThreadKey("slack", "bot", "C1", "x:")
    assert h.key(a) != h.key(b)
    keys = [ThreadKey("slack", "bot", "C1"), ThreadKey("slack", "bot", "C1", "t1"),
            ThreadKey("slack", "other", "C1"), ThreadKey("telegram", "bot", "C1"), a, b]
    for i, k in enumerate(keys):
        await h.append_exchange(k, f"q{i}", f"a{i}")
    for i, k in enumerate(keys):
        assert await h.load(k) == [ChatTurn("user", f"q{i}"), ChatTurn("assistant", f"a{i}")], k
    # Another prefix (another deployment on the same Redis) sees nothing.
    assert await HistoryStore(manager, "other", TTL_S, 200).load(keys[0]) == []


async def test_also_runs_in_the_same_multi_as_the_append(manager, redis_server):
    h = store(manager)
    await h.append_exchange(THREAD, "q", "a", also=lambda pipe: pipe.set(f"{PREFIX}:marker", "1"))
    client = redis_server.client()
    assert client.get(f"{PREFIX}:marker") == "1"
    assert client.llen(h.key(THREAD)) == 2

    def boom(pipe) -> None:
        pipe.set(f"{PREFIX}:marker2", "1")
        raise RuntimeError("hook failed")

    # A hook that fails before EXEC leaves nothing behind: neither the exchange nor its own commands.
    with pytest.raises(RuntimeError):
        await h.append_exchange(THREAD, "q2", "a2", also=boom)
    assert client.llen(h.key(THREAD)) == 2
    assert client.get(f"{PREFIX}:marker2") is None

    # A hook command Redis refuses makes EXEC abort the whole MULTI: the exchange is not half stored.
    with pytest.raises((StoreUnavailable, ResponseError)):
        await h.append_exchange(THREAD, "q3", "a3", also=lambda pipe: pipe.execute_command("HSET", "lonely"))
    assert client.llen(h.key(THREAD)) == 2


async def test_redis_down_raises_store_unavailable_and_recovers(manager, redis_server):
    h = store(manager)
    await h.append_exchange(THREAD, "q", "a")
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await h.load(THREAD)
    assert manager.healthy is False and manager.last_error
    with pytest.raises(StoreUnavailable):
        await h.append_exchange(THREAD, "q2", "a2")
    with pytest.raises(StoreUnavailable):
        await h.reset(THREAD)
    # The client reconnects by itself once Redis is back (an empty one: no persistence in the fixture).
    redis_server.start()
    await h.append_exchange(THREAD, "q3", "a3")
    assert await h.load(THREAD) == [ChatTurn("user", "q3"), ChatTurn("assistant", "a3")]
    assert manager.healthy is True
