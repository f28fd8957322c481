"""The console backend's reads for a department's quality loop: usage, unanswered questions,
conversation export, ``botd eval`` runs and a test case added from a 👎.

A part of :class:`bots.admin.AdminBackend` (mixed in): every read takes the bots (or bases)
the console has already decided the asking user may see; nothing here checks a login.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bots import eval_set, export, unanswered, usage
from connectors.web_console.backend import BackendRefusal
from core.config import Config

if TYPE_CHECKING:
    from bots.pipeline import AnswerPipeline
    from core.runtime import Runtime

_ADDING = threading.Lock()  # two clicks at once append one after the other


def _add_case(cfg: Config, bot: str, question: str) -> Path:
    """(blocking) The case appended; a new set goes into the first folder of the bot's bases."""
    folder = next((p for kb in cfg.bots[bot].knowledge if kb in cfg.knowledge for p in cfg.knowledge[kb].paths
                   if os.path.isdir(p)), None)
    with _ADDING:
        return eval_set.add_case(cfg, bot, question, folder)


class QualityReads:
    """Mixed into the console backend (which has ``runtime``, ``answers`` and ``cfg``)."""

    runtime: Runtime
    answers: AnswerPipeline

    @property
    def cfg(self) -> Config:
        raise NotImplementedError

    def _feedback(self) -> Any:
        return getattr(self.runtime, "feedback", None)

    async def usage(self, bots: Collection[str]) -> dict[str, Any]:
        """The last 30 days of ``bots``, per bot and together, 👍 / 👎 from the feedback store."""
        per_bot = await self.answers.quality.usage.days(sorted(bots))
        feedback = self._feedback()
        if feedback is not None:
            for bot, days in per_bot.items():
                counts = await feedback.daily(bot=bot, days=len(days))
                votes = {c.day: c for c in counts}
                for d in days:
                    c = votes.get(d.day)
                    if c is not None:
                        d.up, d.down = c.up, c.down
        return usage.summary(per_bot)

    async def unanswered(self, bots: Collection[str], kbs: Collection[str],
                         days: int = unanswered.DAYS) -> dict[str, list[dict[str, Any]]]:
        """For each base of ``kbs``: the questions ``bots`` answered badly, grouped by meaning."""
        since = time.time() - days * 86400
        entries = await self.answers.quality.unanswered.entries(sorted(bots), since)
        feedback = self._feedback()
        if feedback is not None:
            for kb in kbs:
                records = await feedback.answers(base=kb, vote="down", since=since, limit=unanswered.KEEP)
                entries += unanswered.down_entries(r for r in records if r.facts.bot in bots)
        retriever = self.runtime.retriever
        embedder = retriever.embedder if retriever is not None else None
        return await unanswered.by_base(entries, kbs, embedder)

    def export_rows(self, bots: Collection[str], since: str, until: str) -> AsyncIterator[dict[str, Any]]:
        try:
            lo, hi = export.day_range(since, until)
        except export.ExportError as exc:
            raise BackendRefusal(400, str(exc)) from None
        return export.rows(self, bots, lo, hi)  # type: ignore[arg-type]

    async def eval_runs(self, bot: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(eval_set.list_runs, self.cfg, bot)

    async def eval_run(self, bot: str, name: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(eval_set.run_diff, self.cfg, bot, name)

    async def add_eval_case(self, bot: str, question: str) -> str:
        """Append ``question`` to ``bot``'s test set; the set's path. :class:`BackendRefusal`."""
        try:
            return str(await asyncio.to_thread(_add_case, self.cfg, bot, question))
        except eval_set.CaseNotAdded as exc:
            raise BackendRefusal(exc.status, str(exc)) from None
