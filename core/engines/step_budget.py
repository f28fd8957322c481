"""How many prompt tokens a decode step may read while other answers stream: a time budget.

A step decodes every running answer's next token and, beside them, a chunk of a new prompt. Each
answer waits for the whole step before its next token, so the chunk sets both how long a long
prompt waits for its first token (a bigger chunk: fewer steps) and how long the running answers
pause between tokens (a bigger chunk: longer steps). A fixed chunk is wrong on every box but
one: 128 tokens are ~25 ms of work for a 135M model and ~500 ms for a 0.5B one on two cores.

So the chunk is sized by time. :class:`StepBudget` learns from the engine's own step timings what
a step costs, as a sum of parts that it estimates apart, by least squares over recent steps::

    seconds = a * passes + b * prompt rows + c * rows with logits + d * attention (k cells)
              + e * the passes' KV streams (k cells)

- ``passes``: micro-batches (each one streams the weights once: core/engines/batching.py). A
  prompt read beside streaming answers costs a pass of its own, whatever its chunk;
- ``prompt rows``: tokens read without logits (a prompt's tokens but its last);
- ``rows with logits``: each answer's next token, guessed tokens, a prompt's last token (each
  also goes through the output layer: for a 150k vocabulary a large share of a row);
- ``attention``: the cells of the KV cache the rows look at, in thousands (a row at position
  3,000 attends to 3,000 cells; it grows with the prompt read);
- ``the passes' KV streams``: for each pass, the longest KV stream of its sequences, in
  thousands of cells: what llama.cpp sizes a pass's attention by, masked cells included. On a
  CPU with flash attention a chunk of a prompt far into a long context costs ~10x one row of
  it, not 16x: most of it is per pass, and grows with the context (measured, the 0.5B-shaped
  file at 3,000 tokens: 16 rows 433 ms, 64 rows 902 ms, one row 43 ms, one thread).

A single "seconds per prompt token beside the streams" (what this class first learnt) blames a
small chunk for the extra pass and for the longer context, prices a token at 3x what it costs,
and keeps the chunk small for good: a larger chunk is never tried, so never found cheaper. The
parts apart price any chunk, including ones not tried yet. Each kind of step (decode only,
prompt only, both) keeps its latest timings, so that one kind flooding in (an answer's hundreds
of decode-only steps) never pushes the others out of the fit; coefficients are kept non-negative
(a part that the data cannot tell apart from another is left out of the fit, not made negative).
The window follows the load on the box and a model swapped for another. A linear fit still
underprices some steps (a small chunk deep in a long prompt costs more per row than a whole batch):
a chunk is priced with how much longer the recent steps that read one beside streams took than the
fit says (a high quantile of actual ÷ predicted), since the budget is what an answer waits at most.
While nothing streams there is nothing to hold up: the engine then reads prompts as fast as the
batch allows and asks this class nothing.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

# The fewest prompt tokens a step reads beside streaming answers, even when decoding them alone
# already takes the whole budget: a prompt must always move on, and reading it in tiny chunks
# costs a pass over the weights per step for almost nothing.
FLOOR = 16
# The chunk of the first step that reads beside streaming answers, before any prompt was timed.
FIRST = 32
# Timings kept per kind of step (decode only, prompt only, both): enough for a stable fit of four
# parts, few enough to follow a box whose load changes within seconds.
WINDOW = 16
# The parts, in the order of a sample's features.
PARTS = ("pass", "prompt_row", "logits_row", "kcell", "pass_kcell")
# A step's timing noise, as a share of its time: fits closer than that are all as good.
NOISE = 0.001
# The steps that read a chunk beside streaming answers are priced by the fit, then corrected by how
# much longer than predicted such steps really took: this quantile of the last WINDOW of them
# (actual ÷ predicted). The fit is linear and learns mostly from the steps it sees most (whole
# batches of a prompt read alone, answers alone), so it underprices a small chunk deep in a long
# prompt (measured: steps that were to take 250 ms took up to 363 ms at p99); the budget is the
# longest a streaming answer should wait, so it must hold for nearly every step, not on average.
QUANTILE = 0.9


@dataclass(frozen=True)
class Shape:
    """What a step computes: its passes over the weights, prompt rows without logits, rows with
    logits, the KV cells its rows attend to (thousands) and the sum of its passes' longest KV
    streams (thousands of cells)."""

    passes: int
    prompt: int
    logits: int
    kcells: float
    pass_kcells: float = 0.0

    def features(self) -> list[float]:
        return [float(self.passes), float(self.prompt), float(self.logits), self.kcells, self.pass_kcells]


def chunk_kcells(position: int, chunk: int) -> float:
    """Cells (thousands) that ``chunk`` prompt rows from ``position`` on attend to: row ``i`` to the
    ``position + i + 1`` cells up to and including itself."""
    return (chunk * position + chunk * (chunk + 1) / 2) / 1000


class StepBudget:
    """The engine's estimate of a step's cost, and the prompt chunk that fits a time budget."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._samples: dict[str, deque[tuple[Shape, float]]] = {
            kind: deque(maxlen=WINDOW) for kind in ("decode", "prompt", "mixed")}
        self._coef: np.ndarray | None = None
        self._stale = True
        # Counters: the last chunk chosen while answers streamed, and how many were chosen.
        self.last_chunk = 0
        self.chunks = 0

    # -- learning ---------------------------------------------------------------------------------

    def observe(self, shape: Shape, seconds: float, *, decoding: bool) -> None:
        """A step of ``shape`` took ``seconds``; ``decoding``: answers streamed in it."""
        if seconds <= 0 or (shape.prompt + shape.logits) == 0:
            return
        kind = "mixed" if decoding and shape.prompt else "decode" if decoding else "prompt"
        self._samples[kind].append((shape, seconds))
        self._stale = True

    def coefficients(self) -> dict[str, float] | None:
        """Seconds per part (see the module's docstring); None until a step reading a prompt was
        timed (until three steps were, a prompt row's average cost alone)."""
        coef = self._fit()
        return None if coef is None else dict(zip(PARTS, (float(c) for c in coef), strict=True))

    def _fit(self) -> np.ndarray | None:
        if not self._stale:
            return self._coef
        self._stale = False
        samples = [s for kind in self._samples.values() for s in kind]
        if not any(shape.prompt for shape, _ in samples):
            self._coef = None
            return None
        x = np.array([shape.features() for shape, _ in samples])
        y = np.array([seconds for _, seconds in samples])
        # Columns scaled alike, so that the small ridge (a part the data cannot tell apart gets
        # little weight, not an arbitrary one) treats every part the same.
        scale = np.abs(x).max(axis=0)
        scale[scale == 0] = 1.0
        xs = x / scale
        best: tuple[float, np.ndarray] | None = None
        # Non-negative least squares: every subset of the parts that keeps the prompt row's cost
        # (a chunk must have a price) and has fewer parts than there are timings, each fit whose
        # costs are all >= 0 scored by its error (not below timing noise, NOISE of a step) and
        # its number of parts (BIC): a few timings explained by a part they barely vary in (the
        # cells a chunk attends to grow with its square) would price a large chunk wildly.
        n = len(samples)
        floor = n * (NOISE * float(y.mean())) ** 2
        for k in range(1, min(len(PARTS), n - 1) + 1) if n >= 3 else ():
            for cols in itertools.combinations(range(len(PARTS)), k):
                if 1 not in cols:
                    continue
                sub = xs[:, cols]
                ridge = 1e-6 * np.eye(len(cols))
                try:
                    sol = np.linalg.solve(sub.T @ sub + ridge, sub.T @ y)
                except np.linalg.LinAlgError:
                    continue
                if (sol < 0).any():
                    continue
                err = max(float(((sub @ sol - y) ** 2).sum()), floor)
                score = n * float(np.log(err / n)) + k * float(np.log(n))
                if best is None or score < best[0] - 1e-9:
                    coef = np.zeros(len(PARTS))
                    coef[list(cols)] = sol
                    best = (score, coef / scale)
        if best is None or best[1][1] <= 0:
            # Too few timings, or the prompt rows' cost cannot be told apart: the plain average a
            # row of a step reading a prompt took (its pass included: a chunk priced high, not low).
            rows = [(seconds, shape.prompt + shape.logits) for shape, seconds in samples if shape.prompt]
            coef = np.zeros(len(PARTS))
            coef[1] = sum(s for s, _ in rows) / sum(r for _, r in rows)
            self._coef = coef
        else:
            self._coef = best[1]
        return self._coef

    def correction(self) -> float:
        """How much longer than the fit predicts the recent steps with a chunk beside streams took
        (actual ÷ predicted, each priced by the fit as it is now), at the QUANTILE; 1.0 before any
        was timed; kept within 0.5-4."""
        coef = self._fit()
        mixed = self._samples["mixed"]
        if coef is None or not mixed:
            return 1.0
        x = np.array([shape.features() for shape, _ in mixed])
        predicted = x @ coef
        actual = np.array([seconds for _, seconds in mixed])
        ok = predicted > 0
        if not ok.any():
            return 1.0
        return float(min(4.0, max(0.5, np.quantile(actual[ok] / predicted[ok], QUANTILE))))

    def predict(self, shape: Shape) -> float | None:
        """The seconds a step of ``shape`` should take; None before anything could be fitted."""
        coef = self._fit()
        return None if coef is None else float(np.dot(coef, shape.features()))

    # -- choosing ---------------------------------------------------------------------------------

    def chunk(self, decoding: Shape, *, passes: int, position: int, most: int, pass_kcells: float = 0.0) -> int:
        """Prompt tokens to read in a step beside the streaming rows of ``decoding`` (their shape
        alone), at most ``most``. ``passes``: the step's micro-batches with a chunk of two or more
        tokens, and ``pass_kcells`` their longest KV streams but the prompt's (thousands of
        cells); ``position``: the tokens the prompt's sequence holds before this chunk (its pass
        adds its own length)."""
        n: int
        if self._fit() is None:
            n = FIRST
        else:
            corrected = self.correction()

            def cost(c: int) -> float:
                shape = Shape(passes, decoding.prompt + c, decoding.logits,
                              decoding.kcells + chunk_kcells(position, c), pass_kcells + (position + c) / 1000)
                return (self.predict(shape) or 0.0) * corrected

            # The largest chunk whose predicted step keeps to the budget (the cost grows with it).
            lo, hi = 0, max(0, most)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if cost(mid) <= self.budget_s:
                    lo = mid
                else:
                    hi = mid - 1
            n = lo
        n = max(1, min(most, max(FLOOR, n)))
        self.last_chunk = n
        self.chunks += 1
        return n

    def as_dict(self) -> dict[str, float]:
        coef = self.coefficients() or {}
        return {"prompt_chunk_last": self.last_chunk, "prompt_chunks_budgeted": self.chunks,
                "step_pass_ms": round(coef.get("pass", 0.0) * 1000, 4),
                "prompt_token_ms": round(coef.get("prompt_row", 0.0) * 1000, 4),
                "logits_row_ms": round(coef.get("logits_row", 0.0) * 1000, 4),
                "attention_kcell_ms": round(coef.get("kcell", 0.0) * 1000, 4),
                "pass_kcell_ms": round(coef.get("pass_kcell", 0.0) * 1000, 4),
                "step_budget_correction": round(self.correction(), 3),
                "step_budget_ms": round(self.budget_s * 1000, 1)}
