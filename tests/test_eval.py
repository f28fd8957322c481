"""``botd eval`` (bots/eval.py) on the shipped example set (tests/data/eval), with real parts: the
embedded model, the default embedding model, a real Redis, the answer pipeline as ``botd chat``
builds it.

- the same set gives the same result twice (temperature 0, no history);
- a document removed (and the base re-ingested) is reported as worse on exactly the questions
  it answers, and a ``--min-hit1`` the run misses exits 1;
- a test set that cannot be used, or a threshold out of range, exits 2 and saves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bots import eval as evaluation
from bots.cli import _parser
from core.knowledge.embedder import Embedder
from core.knowledge.ingest import ingest
from tests.helpers import RedisServer, make_config

DATA = Path(__file__).parent / "data"


def department(tmp_path: Path, redis_url: str):
    """The retrieval set's documents, the eval example's three and its eval.toml, in one folder."""
    docs = tmp_path / "docs"
    shutil.copytree(DATA / "retrieval" / "docs", docs)
    for path in (DATA / "eval" / "docs" / "en").iterdir():
        shutil.copy(path, docs / "en" / path.name)
    shutil.copy(DATA / "eval" / "eval.toml", docs / "eval.toml")  # next to the documents
    cfg = make_config(tmp_path, redis_url, api={"default_bot": "hr"}, knowledge={"hr": {"paths": [str(docs)]}},
                      bots={"hr": {"knowledge": ["hr"], "no_match": "refuse", "max_tokens": 24}})
    return cfg, docs


def ingest_hr(cfg, docs: Path) -> None:
    report = ingest("hr", [docs], cfg.server.state_dir, Embedder(), cfg.knowledge["hr"].chunk_chars)
    assert not report.skipped


def botd_eval(cfg, *argv: str) -> int:
    """``botd eval`` as the command line parses it, on ``cfg``."""
    return evaluation.main(cfg, _parser().parse_args(["eval", "--bot", "hr", *argv]))


def saved_runs(cfg) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(evaluation.runs_dir(cfg, "hr").glob("*.json"))]


def test_same_result_twice_and_a_removed_document_is_worse_on_exactly_its_questions(
        tmp_path, redis_server: RedisServer, capsys):
    cfg, docs = department(tmp_path, redis_server.url)
    ingest_hr(cfg, docs)
    cases = evaluation.load_set(docs / "eval.toml")
    assert len(cases) >= 12 and any(c.refuse for c in cases)

    assert botd_eval(cfg, "--min-refusal", "1.0", "--min-hitk", "0.9") == 0
    first_out = capsys.readouterr().out
    assert "no earlier run to compare with" in first_out
    assert botd_eval(cfg) == 0
    second_out = capsys.readouterr().out
    first, second = saved_runs(cfg)
    for a, b in zip(first["results"], second["results"], strict=True):
        assert {k: v for k, v in a.items() if k != "latency_ms"} == {k: v for k, v in b.items() if k != "latency_ms"}
    assert first["totals"]["hitk"] >= 0.9 and first["totals"]["refusal"] == 1.0, first["totals"]
    assert f"0 better, 0 worse, {len(cases)} the same" in second_out
    # The three-things-at-once question retrieves all three documents.
    three = next(r for r in first["results"] if "locker combination" in r["q"])
    assert three["hitk"], three["sources"]

    # The handbook goes: its two questions get worse, nothing else does; hit@1 falls below 0.95.
    (docs / "en" / "handbook.md").unlink()
    ingest_hr(cfg, docs)
    assert botd_eval(cfg, "--min-hit1", "0.95") == 1
    out = capsys.readouterr()
    third = saved_runs(cfg)[-1]
    changes = evaluation.compare(evaluation.Run.from_json(second), evaluation.Run.from_json(third))
    affected = {c.q for c in cases if c.source == "en/handbook.md"}
    assert len(affected) == 2
    assert {q for q, change in changes.items() if change == "worse"} == affected
    assert "2 worse" in out.out and "threshold missed: hit1" in out.err
    for q in affected:
        assert f"worse: {q} (hit@1, hit@k" in out.out


def test_an_unusable_set_or_threshold_exits_2_and_saves_nothing(tmp_path, redis_server: RedisServer, capsys):
    cfg, docs = department(tmp_path, redis_server.url)
    bad = tmp_path / "bad.toml"
    for text, error in (('[[case]]\nq = "hi"\nanswer = "x"\n', "answer: Extra inputs are not permitted"),
                        ('[[case]]\nq = "hi"\nrefuse = true\nfacts = ["x"]\n', "a refusal has no source or facts"),
                        ('[[cases]]\nq = "hi"\n', "unknown key(s) ['cases']"),
                        ('[[case]]\nq = "hi"\nheading = "A > B"\n', "a heading needs one source"),
                        ("[[case]\n", "invalid")):
        bad.write_text(text, encoding="utf-8")
        assert botd_eval(cfg, "--set", str(bad)) == 2
        assert error in capsys.readouterr().err
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text('{"q": "hi"}\nnot json\n', encoding="utf-8")
    assert botd_eval(cfg, "--set", str(jsonl)) == 2
    assert "set.jsonl is invalid" in capsys.readouterr().err
    assert botd_eval(cfg, "--min-hit1", "90") == 2
    assert "--min-hit1 must be between 0 and 1" in capsys.readouterr().err
    # Not ingested yet: said so, nothing saved.
    assert botd_eval(cfg) == 2
    assert "run botd kb ingest hr first" in capsys.readouterr().err
    assert not evaluation.runs_dir(cfg, "hr").exists()


@pytest.mark.parametrize("zh", [True, False])
def test_every_text_exists_in_chinese_and_english(zh, monkeypatch):
    monkeypatch.setenv("BOTD_LANG", "zh" if zh else "en")
    for key, (chinese, english) in evaluation._TEXTS.items():
        assert chinese and english and chinese != english, key
    assert evaluation.say("SAME") == ("相同" if zh else "same")
