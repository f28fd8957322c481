"""How many prompt tokens a decode step may read while other answers stream: a time budget.

A step decodes every running answer's next token and, beside them, a chunk of a new prompt. Each
answer waits for the whole step before its next token, so the chunk sets both how long a long
prompt waits for its first token (a bigger chunk: fewer steps) and how long the running answers
pause between tokens (a bigger chunk: longer steps). A fixed chunk is wrong on every box but
one: 128 tokens are ~25 ms of work for a 135M model and ~500 ms for a 0.5B one on two cores.

So the chunk is sized by time: :class:`StepBudget` learns from the engine's own step timings
what a step of ``n`` decoding rows costs (decode-only steps, by ``n``) and what each prompt token
adds on top (steps that read a prompt: the time beyond the decode part, per prompt row), and
gives the chunk that keeps a step within ``[model] step_budget_ms``. The estimates are running
averages, so they follow the position in the context (attention grows with it), the load on
the box, and a model swapped for another. While nothing streams there is nothing to hold up:
the engine then reads prompts as fast as the batch allows and asks this class nothing.
"""

from __future__ import annotations

# The fewest prompt tokens a step reads beside streaming answers, even when decoding them alone
# already takes the whole budget: a prompt must always move on, and reading it in tiny chunks
# costs a pass over the weights per step for almost nothing.
FLOOR = 16
# The chunk of the first step that reads beside streaming answers, before anything is measured.
FIRST = 32
# Weight of the newest step in the running averages.
ALPHA = 0.25


class StepBudget:
    """The engine's estimate of a step's cost, and the prompt chunk that fits a time budget."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        # Seconds per prompt token read beside decoding rows (None: never measured), and per
        # token of a step that reads prompts only (large chunks, cheaper per token): the first
        # guess until a step beside decoding rows was timed.
        self.token_s: float | None = None
        self._prefill_s: float | None = None
        # Seconds of a decode-only step, by its number of rows.
        self._decode_s: dict[int, float] = {}
        # Counters: the last chunk chosen while answers streamed, and how many were chosen.
        self.last_chunk = 0
        self.chunks = 0

    def decode_s(self, rows: int) -> float:
        """What a step of ``rows`` decoding rows alone costs: measured, else the nearest measured
        count scaled (on a CPU a step costs mostly one pass over the weights, whatever the rows);
        0 before any decode-only step was timed (then every second is blamed on the prompt: the
        chunk comes out smaller, never larger, than it should)."""
        if rows <= 0:
            return 0.0
        if rows in self._decode_s:
            return self._decode_s[rows]
        if not self._decode_s:
            return 0.0
        near = min(self._decode_s, key=lambda n: (abs(n - rows), -n))
        return self._decode_s[near] * max(1.0, rows / near) if near < rows else self._decode_s[near]

    def chunk(self, decoding: int, most: int) -> int:
        """Prompt tokens to read in a step beside ``decoding`` rows that stream, at most ``most``."""
        per = self.token_s if self.token_s is not None else self._prefill_s
        if per is None:
            n = FIRST
        else:
            room = self.budget_s - self.decode_s(decoding)
            n = int(room / per) if room > 0 else 0
        n = max(1, min(most, max(FLOOR, n)))
        self.last_chunk = n
        self.chunks += 1
        return n

    def observe(self, decoding: int, prompt: int, seconds: float) -> None:
        """A step of ``decoding`` decode rows and ``prompt`` prompt rows took ``seconds``."""
        if seconds <= 0:
            return
        if prompt == 0:
            if decoding > 0:
                self._decode_s[decoding] = _mix(self._decode_s.get(decoding), seconds)
            return
        if decoding == 0:
            self._prefill_s = _mix(self._prefill_s, seconds / prompt)
            return
        # The prompt's share; never below a tenth of the step (a noisy decode estimate must not
        # make prompt tokens look free).
        share = max(seconds - self.decode_s(decoding), 0.1 * seconds)
        self.token_s = _mix(self.token_s, share / prompt)

    def as_dict(self) -> dict[str, float]:
        return {"prompt_chunk_last": self.last_chunk, "prompt_chunks_budgeted": self.chunks,
                "prompt_token_ms": round((self.token_s or 0.0) * 1000, 4),
                "step_budget_ms": round(self.budget_s * 1000, 1)}


def _mix(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)
