"""A department's test set and the saved runs of ``botd eval``: reading a set (``eval.toml`` with
``[[case]]`` tables, or ``eval.jsonl``), a run's results, saving and comparing runs, and what the
web console shows of them (the runs with their diffs; a question appended as a case).

Kept apart from the command (:mod:`bots.eval`), which runs a set through the answer service: the
console's backend reads runs and adds cases without importing the service it is part of.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bots.admin_texts import lang
from core.config import Config

SET_NAMES = ("eval.toml", "eval.jsonl")
KEEP_RUNS = 50  # saved runs kept per bot; older ones are removed

_TEXTS: dict[str, tuple[str, str]] = {  # key -> (Chinese, English)
    "NO_BOT": ("没有名为 {bot!r} 的机器人；机器人：{bots}", "no bot named {bot!r}; bots: {bots}"),
    "NO_SET": ("机器人 {bot} 没有测试集：在它的知识库目录中放一个 eval.toml 或 eval.jsonl，或用 --set 指定",
               "bot {bot} has no test set: put an eval.toml or eval.jsonl in a folder of its knowledge bases, "
               "or name one with --set"),
    "BAD_SET": ("测试集 {path} 无效：{error}", "test set {path} is invalid: {error}"),
    "NO_INDEX": ("知识库 {kb} 还没有索引：先运行 botd kb ingest {kb}",
                 "knowledge base {kb} has no index yet: run botd kb ingest {kb} first"),
    "BAD_MIN": ("--{name} 须在 0 到 1 之间（0.9 即 90%），而不是 {value}",
                "--{name} must be between 0 and 1 (0.9 is 90 %), not {value}"),
    "HEAD": ("botd eval：机器人 {bot}，测试集 {path}，{n} 个问题，模型 {model}",
             "botd eval: bot {bot}, set {path}, {n} question(s), model {model}"),
    "COLUMNS": ("  #  首位  前k  拒答  事实    延迟      变化    问题",
                "  #  hit@1 hit@k refuse facts   latency   change  question"),
    "BETTER": ("变好", "better"),
    "WORSE": ("变差", "worse"),
    "SAME": ("相同", "same"),
    "NEW": ("新增", "new"),
    "TOTAL": ("合计：首位命中 {hit1}，前k命中 {hitk}，拒答正确 {refusal}，事实 {facts}，延迟中位数 {latency} ms",
              "total: hit@1 {hit1}, hit@k {hitk}, refusal right {refusal}, facts {facts}, median latency {latency} ms"),
    "COMPARED": ("与上次运行（{when}）相比：{better} 个变好，{worse} 个变差，{same} 个相同",
                 "compared with the last run ({when}): {better} better, {worse} worse, {same} the same"),
    "FIRST": ("没有上次运行可比较", "no earlier run to compare with"),
    "WORSE_LINE": ("  变差：{q}（{what}）", "  worse: {q} ({what})"),
    "SAVED": ("已保存：{path}", "saved: {path}"),
    "MISSED": ("未达标：{name} {value} < {min}", "threshold missed: {name} {value} < {min}"),
    "BUSY": ("机器人忙：{reason}", "the bot is busy: {reason}"),
}


def say(key: str, **fields: object) -> str:
    """``key`` in the admin's language (BOTD_LANG or the locale)."""
    zh, en = _TEXTS[key]
    return (zh if lang() == "zh" else en).format(**fields)


class EvalSetError(ValueError):
    """A test set that cannot be read: the message says where and why."""


class Case(BaseModel):
    """One question of a test set and what its answer must show."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    q: str = Field(min_length=1, max_length=4000, description="The question, as a user would ask it.")
    source: str | list[str] | None = Field(
        default=None, description="The document that must be retrieved (its path in the knowledge base, as "
                                  "`botd kb search` shows it); a list: each must be (a question asking several "
                                  "things), one of them first.")
    heading: str | None = Field(default=None, description="The section of ``source`` that must be retrieved.")
    facts: list[str] = Field(default_factory=list, description="Words the answer must contain (any case).")
    refuse: bool = Field(default=False, description="The bot must refuse: no document answers it.")


def load_set(path: Path) -> list[Case]:
    """The cases of ``path`` (``.toml`` with ``[[case]]`` tables, or ``.jsonl``); :class:`EvalSetError`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EvalSetError(say("BAD_SET", path=path, error=exc.strerror or exc)) from None
    items: list[tuple[str, Any]] = []
    try:
        if path.suffix.lower() == ".jsonl":
            for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
                if line.strip():
                    items.append((f"line {n}", json.loads(line)))
        else:
            data = tomllib.loads(raw.decode("utf-8"))
            unknown = set(data) - {"case"}
            if unknown:
                raise EvalSetError(say("BAD_SET", path=path, error=f"unknown key(s) {sorted(unknown)}; use [[case]]"))
            items = [(f"case {n}", c) for n, c in enumerate(data.get("case", []), 1)]
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EvalSetError(say("BAD_SET", path=path, error=exc)) from None
    cases = []
    for where, item in items:
        try:
            case = Case.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            error = f"{where}: {'.'.join(str(p) for p in first['loc']) or 'case'}: {first['msg']}"
            raise EvalSetError(say("BAD_SET", path=path, error=error)) from None
        if case.heading is not None and not isinstance(case.source, str):
            raise EvalSetError(say("BAD_SET", path=path, error=f"{where}: a heading needs one source"))
        if case.refuse and (case.source or case.facts):
            raise EvalSetError(say("BAD_SET", path=path, error=f"{where}: a refusal has no source or facts"))
        cases.append(case)
    if not cases:
        raise EvalSetError(say("BAD_SET", path=path, error="no case"))
    if len({c.q for c in cases}) != len(cases):
        raise EvalSetError(say("BAD_SET", path=path, error="a question is there twice (runs compare by question)"))
    return cases


def find_set(cfg: Config, bot: str) -> Path | None:
    """The test set next to the bot's documents: the first eval.toml / eval.jsonl in its bases' folders."""
    for kb in cfg.bots[bot].knowledge:
        for folder in cfg.knowledge[kb].paths:
            for name in SET_NAMES:
                if (candidate := Path(folder) / name).is_file():
                    return candidate
    return None


@dataclass
class Result:
    """How one question went."""

    q: str
    hit1: bool | None  # None: the case names no section
    hitk: bool | None
    refused: bool
    refusal_ok: bool
    facts: list[str]  # those found
    facts_missing: list[str]
    latency_ms: int
    answer: str
    sources: list[str]

    @property
    def facts_share(self) -> float | None:
        n = len(self.facts) + len(self.facts_missing)
        return len(self.facts) / n if n else None

    def marks(self) -> tuple[float, ...]:
        """What is compared between runs (the latency is not: it depends on the machine's load)."""
        return tuple(-1.0 if x is None else float(x) for x in (self.hit1, self.hitk, self.refusal_ok, self.facts_share))


@dataclass
class Run:
    bot: str
    set: str
    model: str
    started: str
    results: list[Result] = field(default_factory=list)

    def totals(self) -> dict[str, float | None]:
        def share(values: list[bool | float | None]) -> float | None:
            known = [float(v) for v in values if v is not None]
            return sum(known) / len(known) if known else None

        rs = self.results
        return {
            "hit1": share([r.hit1 for r in rs]), "hitk": share([r.hitk for r in rs]),
            "refusal": share([r.refusal_ok for r in rs]), "facts": share([r.facts_share for r in rs]),
            "latency_ms": statistics.median(r.latency_ms for r in rs) if rs else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {"bot": self.bot, "set": self.set, "model": self.model, "started": self.started,
                "totals": self.totals(), "results": [asdict(r) for r in self.results]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        return cls(data["bot"], data["set"], data["model"], data["started"],
                   [Result(**r) for r in data["results"]])


# -- saved runs ------------------------------------------------------------------------------------

def runs_dir(cfg: Config, bot: str) -> Path:
    return cfg.server.state_dir / "eval" / bot


def last_run(cfg: Config, bot: str) -> Run | None:
    """The latest saved run of ``bot``; None when there is none (or it cannot be read)."""
    for path in sorted(runs_dir(cfg, bot).glob("*.json"), reverse=True):
        try:
            return Run.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def save_run(cfg: Config, run: Run) -> Path:
    folder = runs_dir(cfg, run.bot)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    for old in sorted(folder.glob("*.json"))[:-KEEP_RUNS]:
        old.unlink(missing_ok=True)
    return path


def compare(before: Run | None, now: Run) -> dict[str, str]:
    """Question -> "better", "worse", "same" or "new": worse when any mark went down."""
    prev = {r.q: r.marks() for r in before.results} if before is not None else {}
    out = {}
    for r in now.results:
        old = prev.get(r.q)
        if old is None:
            out[r.q] = "new"
            continue
        pairs = list(zip(old, r.marks(), strict=True))
        if any(b < a for a, b in pairs):
            out[r.q] = "worse"
        elif any(b > a for a, b in pairs):
            out[r.q] = "better"
        else:
            out[r.q] = "same"
    return out


def _what_changed(before: Run, now: Result) -> str:
    old = next(r for r in before.results if r.q == now.q)
    names = ("hit@1", "hit@k", "refusal", "facts")
    return ", ".join(n for n, a, b in zip(names, old.marks(), now.marks(), strict=True) if b < a)


# -- the console's view of the saved runs, and a case added from it --------------------------------

_RUN_NAME = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}$")


def list_runs(cfg: Config, bot: str, limit: int = KEEP_RUNS) -> list[dict[str, Any]]:
    """The saved runs of ``bot``, newest first: name, when, model, set, questions, totals,
    and how many questions went better / worse than in the run before (blocking)."""
    paths = sorted(runs_dir(cfg, bot).glob("*.json"), reverse=True)[: limit + 1]
    runs: list[tuple[str, Run]] = []
    for path in paths:
        try:
            runs.append((path.stem, Run.from_json(json.loads(path.read_text(encoding="utf-8")))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    out = []
    for i, (name, run) in enumerate(runs[:limit]):
        before = runs[i + 1][1] if i + 1 < len(runs) else None
        changes = compare(before, run) if before is not None else {}
        out.append({"name": name, "started": run.started, "model": run.model, "set": run.set,
                    "questions": len(run.results), "totals": run.totals(),
                    "better": sum(v == "better" for v in changes.values()),
                    "worse": sum(v == "worse" for v in changes.values()), "compared": before is not None})
    return out


def run_diff(cfg: Config, bot: str, name: str) -> dict[str, Any] | None:
    """One saved run of ``bot`` with, per question, what changed since the run before it (and
    which marks went down); None when there is no such run (blocking)."""
    if not _RUN_NAME.match(name):
        return None
    names = sorted(p.stem for p in runs_dir(cfg, bot).glob("*.json"))
    if name not in names:
        return None
    try:
        run = Run.from_json(json.loads((runs_dir(cfg, bot) / f"{name}.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    before: Run | None = None
    for older in reversed(names[: names.index(name)]):
        try:
            before = Run.from_json(json.loads((runs_dir(cfg, bot) / f"{older}.json").read_text(encoding="utf-8")))
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    changes = compare(before, run)
    prev = {r.q: r for r in before.results} if before is not None else {}
    rows = []
    for r in run.results:
        old = prev.get(r.q)
        rows.append({**asdict(r), "change": changes[r.q], "worse_in": _what_changed(before, r)
                     if before is not None and changes[r.q] == "worse" else "",
                     "before": None if old is None else {"hit1": old.hit1, "hitk": old.hitk,
                                                          "refusal_ok": old.refusal_ok, "facts": old.facts}})
    return {"name": name, "bot": run.bot, "started": run.started, "model": run.model, "set": run.set,
            "totals": run.totals(), "before": None if before is None else {
                "started": before.started, "model": before.model, "totals": before.totals()},
            "results": rows}


class CaseNotAdded(EvalSetError):
    """The case cannot go into the set: ``status`` 409 (already there, no folder) or 400."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_case(cfg: Config, bot: str, question: str, folder: str | None) -> Path:
    """Append ``question`` as a case to ``bot``'s test set (made as eval.toml in ``folder``, the
    first folder of its bases, when it has none): the set is read back before it replaces the
    old one, so a set that would not load is never written (blocking)."""
    question = " ".join(question.split())
    if not question or len(question) > 4000:
        raise CaseNotAdded(400, "the question is empty or longer than 4000 characters")
    path = find_set(cfg, bot)
    if path is None:
        if folder is None:
            raise CaseNotAdded(409, f"bot {bot} has no knowledge folder to keep a test set in")
        path = Path(folder) / SET_NAMES[0]
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if path.suffix.lower() == ".jsonl":
        new = old + ("" if not old or old.endswith("\n") else "\n") + json.dumps({"q": question}, ensure_ascii=False)
        new += "\n"
    else:
        # A JSON string is a TOML basic string (the same escapes).
        new = old + ("" if not old or old.endswith("\n") else "\n") + \
            f"\n# added from the console ({time.strftime('%Y-%m-%d', time.gmtime())})\n[[case]]\nq = " + \
            json.dumps(question, ensure_ascii=False) + "\n"
    try:
        data = new.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON "\ud800"
        raise CaseNotAdded(400, "the question is not valid text") from None
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}")  # read as the set is
    tmp.write_bytes(data)
    try:
        cases = load_set(tmp)
    except EvalSetError as exc:
        tmp.unlink(missing_ok=True)
        if old and any(c.q == question for c in _cases_or_none(path)):
            raise CaseNotAdded(409, "this question is already in the test set") from None
        # Said with the set's file name only: where it lives is the admin's business.
        raise CaseNotAdded(409, str(exc).replace(str(tmp), path.name)) from None
    assert cases
    tmp.replace(path)
    return path


def _cases_or_none(path: Path) -> list[Case]:
    try:
        return load_set(path)
    except EvalSetError:
        return []
