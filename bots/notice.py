"""The waiting notice: where a queued user stands, in their language.

An answer that has not started ``[queue] notice_after_s`` after it was queued is shown to its
user as a place in line and an expected wait ("前面还有 3 位，预计 20 秒" / "3 ahead of you, about
20 s"): the jobs the fair queue will really hand out before it (core/jobs.py), and the wait
from the worker's measured answer time (core/worker.py). Delivery shows it once per turn
(edited into the answer where the platform edits, else a short message the answer follows);
the console's chat streams it as one line. Nothing is said for an answer that starts in time,
a command's fixed answer, or a job already generating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bots import texts
from bots.answers import JobAnswer
from core.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Standing:
    """A waiting answer's place: jobs the queue hands out before it, and the expected wait."""

    ahead: int
    wait_s: float


def standing(runtime: Runtime, answer: Any) -> Standing | None:
    """Where ``answer`` stands in its model's queue; None when it is not waiting for the model
    (started, finished, or a fixed text)."""
    if not isinstance(answer, JobAnswer) or answer.job.done or answer.job.started_at is not None:
        return None
    got = runtime.models.standing(answer.job)
    return None if got is None else Standing(got[0], got[1])


def wait_words(seconds: float, lang: texts.Lang) -> str:
    """A short expected wait: seconds rounded up to 5 (at least 5), whole minutes past 90 s."""
    one: texts.Lang = "zh" if lang == "zh" else "en"
    if seconds > 90:
        return texts.say("WAIT_MINUTES", one, m=math.ceil(seconds / 60))
    return texts.say("WAIT_SECONDS", one, s=max(5, 5 * math.ceil(seconds / 5)))


def notice_text(st: Standing, lang: texts.Lang) -> str:
    """The notice in ``lang`` ("both": Chinese line, then English)."""
    if lang == "both":
        return f"{notice_text(st, 'zh')}\n{notice_text(st, 'en')}"
    if st.ahead == 0:
        return texts.say("QUEUE_NEXT", lang, wait=wait_words(st.wait_s, lang))
    return texts.say("QUEUE_NOTICE", lang, n=st.ahead, wait=wait_words(st.wait_s, lang))
