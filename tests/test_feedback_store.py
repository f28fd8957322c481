"""core/feedback.py ``FeedbackStore`` on a real redis-server alone (no daemon, no model)."""

from __future__ import annotations

import time

import pytest

from core.feedback import AnswerFacts, ChunkRef, FeedbackEvent, FeedbackStore, Vote, VoteStatus, chunk_id
from core.redis_store import RedisManager

DAY = 86400


def facts(answer_id: str, bot: str = "hr", bases: tuple[str, ...] = ("hr_docs",), at: float | None = None,
          chat: str = "c1") -> AnswerFacts:
    return AnswerFacts(
        answer_id=answer_id, bot=bot, bases=bases, platform="telegram", account="hr", chat=chat, thread="",
        user="u1", question="How many days of leave?", answer="25 days.",
        chunks=(ChunkRef(chunk_id("hr_docs", "leave.md", "Leave", "25 days"), "hr_docs", "leave.md › Leave",
                         0.0325, 0.91),),
        model="smollm2", adapters=("/x/lora.gguf",), latency_ms=420, at=time.time() if at is None else at)


@pytest.fixture
def store(manager: RedisManager) -> FeedbackStore:
    return FeedbackStore(manager, "t", 30 * DAY)


async def test_facts_round_trip_with_chunk_ids(store: FeedbackStore) -> None:
    f = facts("a1")
    await store.record_answer(f)
    rec = await store.get("a1")
    assert rec is not None and rec.facts == f
    assert rec.facts.chunks[0].id.startswith("hr_docs:leave.md#")
    assert rec.votes == {} and rec.up == 0 and rec.down == 0
    assert await store.get("nope") is None
    assert await store.get("../../etc") is None


async def test_votes_one_per_user_and_day_counts(store: FeedbackStore) -> None:
    now = time.time()
    await store.record_answer(facts("a1", at=now))
    await store.record_answer(facts("a1", at=now))  # recorded twice: counted once
    await store.record_answer(facts("a2", at=now))
    assert await store.vote("a1", "u1", Vote.UP) == VoteStatus.RECORDED
    assert await store.vote("a1", "u1", Vote.UP) == VoteStatus.SAME
    assert await store.vote("a1", "u2", Vote.DOWN) == VoteStatus.RECORDED
    assert await store.vote("a1", "u1", Vote.DOWN) == VoteStatus.CHANGED
    assert await store.vote("a2", "u1", Vote.UP) == VoteStatus.RECORDED
    assert await store.vote("zz", "u1", Vote.UP) == VoteStatus.UNKNOWN
    rec = await store.get("a1")
    assert rec is not None and (rec.up, rec.down) == (0, 2)
    today = (await store.daily(bot="hr", days=3))[-1]
    assert (today.answers, today.up, today.down) == (2, 1, 2)
    kb_today = (await store.daily(base="hr_docs", days=1))[-1]
    assert (kb_today.answers, kb_today.up, kb_today.down) == (2, 1, 2)
    # 👎 answers listed per bot and per base; taking the 👎 back removes it from the list.
    assert [r.facts.answer_id for r in await store.answers(base="hr_docs", vote="down")] == ["a1"]
    await store.vote("a1", "u1", Vote.NONE)
    await store.vote("a1", "u2", Vote.UP)
    assert await store.answers(bot="hr", vote="down") == []
    today = (await store.daily(bot="hr", days=1))[-1]
    assert (today.up, today.down) == (2, 0)


async def test_time_range_and_bases_and_export(store: FeedbackStore) -> None:
    now = time.time()
    await store.record_answer(facts("old", at=now - 3 * DAY))
    await store.record_answer(facts("new", at=now))
    await store.record_answer(facts("it", bot="it", bases=("it_docs",), at=now))
    assert [r.facts.answer_id for r in await store.answers(bot="hr")] == ["new", "old"]
    assert [r.facts.answer_id for r in await store.answers(bot="hr", since=now - DAY)] == ["new"]
    assert [r.facts.answer_id for r in await store.answers(bot="hr", until=now - DAY)] == ["old"]
    assert [r.facts.answer_id for r in await store.answers(base="it_docs")] == ["it"]
    await store.add_reason("new", "u1", "  wrong   number ")
    rows = [row async for row in store.export(bot="hr", batch=1)]
    assert [r["answer_id"] for r in rows] == ["new", "old"]
    assert rows[0]["reasons"][0]["text"] == "wrong number"
    assert rows[0]["chunks"][0]["id"].startswith("hr_docs:")
    with pytest.raises(ValueError):
        await store.answers()


async def test_retention_forgets(manager: RedisManager) -> None:
    store = FeedbackStore(manager, "t", 2 * DAY)
    now = time.time()
    await store.record_answer(facts("ancient", at=now - 5 * DAY))
    await store.record_answer(facts("fresh", at=now))
    assert [r.facts.answer_id for r in await store.answers(bot="hr")] == ["fresh"]
    ttl = await manager.client.ttl("t:fb:a:fresh")
    assert 0 < ttl <= 2 * DAY


async def test_check_refuses_other_chat_and_replay(store: FeedbackStore) -> None:
    await store.record_answer(facts("a1"))
    ev = FeedbackEvent("telegram", "hr", "c1", "u9", "a1", Vote.UP, event_id="cb-1")
    assert (await store.check(ev))[0] == VoteStatus.RECORDED
    assert (await store.check(ev))[0] == VoteStatus.REPLAYED
    other = FeedbackEvent("telegram", "hr", "c2", "u9", "a1", Vote.UP, event_id="cb-2")
    assert (await store.check(other))[0] == VoteStatus.WRONG_CHAT
    assert (await store.check(FeedbackEvent("telegram", "hr", "c1", "u9", "a1")))[0] == VoteStatus.INVALID
