"""How the retriever ranks and cuts, with the default embedding model (multilingual-e5-small).

- The fused ranking (meaning + words) puts a question's own section first at least as often as
  the meaning ranking alone, on the shipped retrieval set (``tests/data/retrieval``): at equal
  weight BM25's first place used to outweigh close dense places (78 % against 89 % top-1).
- A question that asks three things at once finds the three sections that answer them: each
  holds a third of the question's words and sits below the calibrated cut for the whole
  question, so one of them used to be dropped.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from core.knowledge.embedder import Embedder
from core.knowledge.ingest import ingest
from core.knowledge.retriever import Retriever, question_parts
from core.knowledge.store import KnowledgeStore

SET = Path(__file__).parent / "data" / "retrieval"

# Three documents (the eval example's), each answering one part of the question inside a longer section.
THREE = Path(__file__).parent / "data" / "eval" / "docs" / "en"
THREE_IN_ONE = "What are the dental plan identifier, the relocation voucher code and the onboarding locker combination?"


@pytest.fixture(scope="module")
def company(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped set's documents plus the three above, ingested as one base."""
    root = tmp_path_factory.mktemp("ranking")
    docs = root / "docs"
    shutil.copytree(SET / "docs", docs)
    for name in ("benefits", "relocation", "onboarding"):
        shutil.copy(THREE / f"{name}.md", docs / "en" / f"{name}.md")
    report = ingest("company", [docs], root / "state", Embedder(), 800)
    assert report.files == 11 and not report.skipped
    return root / "state"


def test_a_question_asking_three_things_finds_the_three_documents(company):
    r = Retriever(company, Embedder())  # the default cut, calibrated for the model
    r.refresh(["company"])
    hits = r.search(["company"], THREE_IN_ONE)
    assert {h.source for h in hits[:3]} == {"en/benefits.md", "en/relocation.md", "en/onboarding.md"}, hits
    # The whole question is too far from the dental section for the cut, and holds a third of its words.
    whole = Retriever(company, Embedder(), min_similarity=-1.0, min_coverage=0.0, top_k=50)
    whole.refresh(["company"])
    qvec = whole.embedder.encode([THREE_IN_ONE], query=True)[0]
    index = whole._indexes["company"][1]
    assert index is not None
    row = next(i for i, c in enumerate(index.chunks) if c.source == "en/benefits.md" and "dental" in c.text)
    assert float(index.faiss.reconstruct(row) @ qvec) < r.threshold(THREE_IN_ONE)
    # A single question is one part; a list of topics is several.
    assert question_parts("How many days a week can I work from home?") == []
    assert len(question_parts(THREE_IN_ONE)) == 3
    assert question_parts("牙科计划编号、搬家券代码和入职储物柜密码分别是什么？") == [
        "牙科计划编号", "搬家券代码", "入职储物柜密码分别是什么"]


def test_the_fused_ranking_puts_the_right_section_first_as_often_as_meaning_alone(tmp_path):
    with (SET / "questions.toml").open("rb") as f:
        answers = tomllib.load(f)["answer"]
    embedder = Embedder()
    ingest("set", [SET / "docs"], tmp_path, embedder, 800)
    chunks = KnowledgeStore(tmp_path, "set").load().chunks
    vectors = embedder.encode([c.embed_text() for c in chunks])
    r = Retriever(tmp_path, embedder, min_similarity=-1.0, min_coverage=0.0, top_k=50)  # ranking only, no cut
    r.refresh(["set"])
    dense = fused = 0
    for a in answers:
        want = (a["source"], a["heading"])
        best = chunks[int(np.argmax(vectors @ embedder.encode([a["q"]], query=True)[0]))]
        dense += (best.source, best.heading) == want
        hits = r.search(["set"], a["q"])
        fused += bool(hits) and (hits[0].source, hits[0].heading) == want
    # 40 of 45 by meaning alone with the default model; the fusion used to put 35 first.
    assert fused >= dense >= 39, (fused, dense)
