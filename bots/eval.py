"""``botd eval``: a bot's test set run through the real answer pipeline, scored, saved and compared.

A department keeps its test set next to its documents: ``eval.toml`` (``[[case]]`` tables) or
``eval.jsonl`` (one case a line) in a folder of one of the bot's knowledge bases, or names it
with ``--set``. A case is a question and what its answer must show::

    [[case]]
    q = "How many days a week can I work from home?"
    source = "en/handbook.md"                  # the document that must be retrieved (or a list)
    heading = "Employee Handbook > Remote work" # and its section (optional)
    facts = ["two days"]                        # words the answer must contain
    # refuse = true                             # or: the bot must refuse (no document answers it)

Each question goes through :meth:`bots.service.ChatService.dispatch`, exactly as a chat message
would (the bot's grants, retrieval, prompt and model from the config), with no history, at
temperature 0; the retrieved sections are the ones the model was given. Printed per question
and in total: hit@1 / hit@k (the expected section first / among those given), refusal right,
facts present, latency. The run is saved as JSON under ``<state_dir>/eval/<bot>/`` and compared
with the last saved run: each question is better, worse or the same. The exit status is 1 when
a ``--min-*`` threshold is missed, 2 when the set or the bot cannot be used, so a deployment
script can run it before a reload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bots import texts
from bots.admin_texts import lang
from bots.answers import JobAnswer, TextAnswer
from core.config import Config, Settings
from core.dispatch import Busy, Rejected
from core.messages import InboundMessage

SET_NAMES = ("eval.toml", "eval.jsonl")
KEEP_RUNS = 50  # saved runs kept per bot; older ones are removed
PLATFORM = "eval"

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


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def _refusals(cfg: Config, bot: str) -> list[str]:
    b = cfg.bots[bot]
    return [t for t in {b.no_match_text, texts.say("NO_DOCUMENT", "zh"), texts.say("NO_DOCUMENT", "en")} if t]


async def ask(service: Any, cfg: Config, bot: str, case: Case) -> Result:
    """``case`` through the pipeline as a chat message with no history, at temperature 0."""
    msg = InboundMessage(platform=PLATFORM, bot=bot, chat="eval", user="eval", thread=uuid.uuid4().hex,
                         text=case.q, history=[], temperature=0.0)
    t0 = time.monotonic()
    for _ in range(20):
        try:
            answer = await service.dispatch(msg)
            break
        except Busy as exc:  # a per-user limit or a full queue: wait as a client would
            print(say("BUSY", reason=exc.reason), file=sys.stderr)
            await asyncio.sleep(min(exc.retry_after, 30))
    else:
        raise Busy("still busy after 20 tries", 0)
    text = ""
    async for ev in answer.events():
        if ev.done:
            text = ev.text or ""
    latency = round((time.monotonic() - t0) * 1000)
    hits = answer.hits if isinstance(answer, JobAnswer) else []
    refused = isinstance(answer, TextAnswer) or any(_normal(t) in _normal(text) for t in _refusals(cfg, bot))

    wanted = [case.source] if isinstance(case.source, str) else list(case.source or [])

    def matches(h: Any, source: str) -> bool:
        return h.source == source and (case.heading is None or h.heading == case.heading)

    hit1 = hitk = None
    if wanted:
        hit1 = bool(hits) and any(matches(hits[0], s) for s in wanted)
        hitk = all(any(matches(h, s) for h in hits) for s in wanted)
    said = _normal(text)
    found = [f for f in case.facts if _normal(f) in said]
    return Result(case.q, hit1, hitk, refused, refused == case.refuse, found,
                  [f for f in case.facts if f not in found], latency, text, [h.cite for h in hits])


async def run_eval(cfg: Config, bot: str, cases: list[Case], set_path: Path,
                   on_result: Callable[[int, Result], None] | None = None) -> Run:
    """Every case through a started runtime (Redis, the model, the knowledge indexes); raises
    :class:`EvalSetError` when one of the bot's bases has no index."""
    from bots.service import ChatService
    from core.runtime import Runtime

    async with Runtime(Settings(cfg)) as runtime:
        retriever = runtime.retriever
        for kb in cfg.bots[bot].knowledge:
            if retriever is None or not retriever.has_index(kb):
                raise EvalSetError(say("NO_INDEX", kb=kb))
        service = ChatService(runtime.settings, runtime)
        run = Run(bot, str(set_path), cfg.named_model(cfg.bots[bot].model).name,
                  time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for i, case in enumerate(cases, 1):
            result = await ask(service, cfg, bot, case)
            run.results.append(result)
            if on_result is not None:
                on_result(i, result)
        # Answers finish their bookkeeping (audit, stats) before the runtime stops.
        await service.tasks.drain()
    return run


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


# -- the command -----------------------------------------------------------------------------------

THRESHOLDS = ("hit1", "hitk", "refusal", "facts")


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    sp = with_config(sub.add_parser("eval", help="run a bot's test set and compare with the last run"))
    sp.add_argument("--bot", required=True, help="which bot")
    sp.add_argument("--set", type=Path, help="the test set (default: eval.toml or eval.jsonl next to its documents)")
    for name in THRESHOLDS:
        sp.add_argument(f"--min-{name}", type=float, metavar="X",
                        help=f"exit 1 when the total {name} is below X (0..1)")
    sp.add_argument("--no-save", action="store_true", help="do not save this run (still compared)")


def _mark(value: bool | None) -> str:
    return "-" if value is None else ("✓" if value else "✗")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main(cfg: Config, args: argparse.Namespace) -> int:
    """``botd eval``: 0 all thresholds met, 1 one missed, 2 the set, bot or index is unusable."""
    if args.bot not in cfg.bots:
        print(f"botd: {say('NO_BOT', bot=args.bot, bots=', '.join(sorted(cfg.bots)))}", file=sys.stderr)
        return 2
    mins = {name: getattr(args, f"min_{name}") for name in THRESHOLDS}
    for name, value in mins.items():
        if value is not None and not 0.0 <= value <= 1.0:
            print(f"botd: {say('BAD_MIN', name=f'min-{name}', value=value)}", file=sys.stderr)
            return 2
    path = args.set or find_set(cfg, args.bot)
    if path is None:
        print(f"botd: {say('NO_SET', bot=args.bot)}", file=sys.stderr)
        return 2
    try:
        cases = load_set(path)
    except EvalSetError as exc:
        print(f"botd: {exc}", file=sys.stderr)
        return 2
    before = last_run(cfg, args.bot)
    print(say("HEAD", bot=args.bot, path=path, n=len(cases), model=cfg.named_model(cfg.bots[args.bot].model).name))

    def show(i: int, r: Result) -> None:  # progress, while the questions are answered
        print(f"  {i}/{len(cases)}  {r.latency_ms} ms", file=sys.stderr, flush=True)

    try:
        run = asyncio.run(run_eval(cfg, args.bot, cases, path, show))
    except EvalSetError as exc:
        print(f"botd: {exc}", file=sys.stderr)
        return 2
    except Rejected as exc:
        print(f"botd: {exc.message}", file=sys.stderr)
        return 2
    changes = compare(before, run)
    print(say("COLUMNS"))
    for i, r in enumerate(run.results, 1):
        facts = "-" if r.facts_share is None else f"{len(r.facts)}/{len(r.facts) + len(r.facts_missing)}"
        change = say(changes[r.q].upper())
        print(f"{i:3}  {_mark(r.hit1):5} {_mark(r.hitk):5} {_mark(r.refusal_ok):6} {facts:7} "
              f"{r.latency_ms:6} ms  {change:6}  {r.q}")
    totals = run.totals()
    print(say("TOTAL", hit1=_pct(totals["hit1"]), hitk=_pct(totals["hitk"]), refusal=_pct(totals["refusal"]),
              facts=_pct(totals["facts"]), latency=totals["latency_ms"]))
    if before is None:
        print(say("FIRST"))
    else:
        counts = {k: sum(v == k for v in changes.values()) for k in ("better", "worse", "same")}
        print(say("COMPARED", when=before.started, **counts))
        for r in run.results:
            if changes[r.q] == "worse":
                print(say("WORSE_LINE", q=r.q, what=_what_changed(before, r)))
    if not args.no_save:
        print(say("SAVED", path=save_run(cfg, run)))
    missed = False
    for name, minimum in mins.items():
        value = totals[name]
        if minimum is not None and (value is None or value < minimum):
            print(say("MISSED", name=name, value=_pct(value), min=_pct(minimum)), file=sys.stderr)
            missed = True
    return 1 if missed else 0


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
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}")  # read as the set is
    tmp.write_text(new, encoding="utf-8")
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
