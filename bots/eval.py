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
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bots import texts
from bots.answers import JobAnswer, TextAnswer
from bots.eval_set import (  # noqa: F401  (the set and run API: the command's, its tests', the console's)
    _TEXTS,
    KEEP_RUNS,
    SET_NAMES,
    Case,
    CaseNotAdded,
    EvalSetError,
    Result,
    Run,
    _what_changed,
    add_case,
    compare,
    find_set,
    last_run,
    list_runs,
    load_set,
    run_diff,
    runs_dir,
    save_run,
    say,
)
from core.config import Config, Settings
from core.dispatch import Busy, Rejected
from core.messages import InboundMessage

PLATFORM = "eval"


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
