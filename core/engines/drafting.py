"""Drafting from the prompt (prompt-lookup decoding): guesses of a sequence's next tokens, taken
from its own prompt and answer, that the engine checks in the step it decodes anyway.

Knowledge answers quote their sources, and conversations repeat names, codes and sentences:
when the last few tokens of a sequence (its prompt, then its answer so far) appeared before in
it, the tokens that followed them then are a good guess of what follows now. The engine writes
those guesses as extra rows of the sequence in the same ``llama_decode``, with logits on, samples
each row with the sequence's own sampler, keeps the guesses that agree with what was sampled and
removes the rest from the KV cache (``seq_rm``). The sampled tokens are the ones a step-by-step
decode would sample from the same logits: a guess only saves steps, it never chooses a token.

:class:`Drafter` is one sequence's index of n-grams (the latest place each 3- and 2-token run
ended), kept as tokens come, so a guess costs a dictionary lookup, not a search of the context;
and its record of how many guesses were accepted, which turns its guessing off for a while when
they mostly fail (each guessed row costs arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence

# Tokens guessed at most per step for one sequence ([model] draft_tokens), and at first: the guess
# grows (doubling up to the most) while whole guesses are accepted, and shrinks to what was
# accepted plus one when they are not, so a failing guess costs few rows.
DRAFT_TOKENS = 8
FIRST_GUESS = 4
# Below this share of guessed tokens accepted (a running average), a sequence stops guessing for
# COOLDOWN steps, then tries again (doubling the pause each time it fails again).
MIN_ACCEPT = 0.3
COOLDOWN = 8
_ALPHA = 0.3


class Drafter:
    """The n-gram index and acceptance record of one sequence."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.history: list[int] = []
        # (n, run of n tokens) -> the index just past its latest occurrence in ``history``.
        self._ends: dict[tuple[int, ...], int] = {}
        # The occurrence before the latest of the run that ends the history now, by n.
        self._before: dict[int, int] = {}
        self.accept = 1.0
        self.size = FIRST_GUESS
        self._pause = 0
        self._cooldown = COOLDOWN
        self.proposed = 0
        self.accepted = 0
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.history.append(token)
            end = len(self.history)
            for n in (3, 2):
                if end >= n:
                    key = tuple(self.history[end - n:end])
                    prev = self._ends.get(key)
                    if prev is None:
                        self._before.pop(n, None)
                    else:
                        self._before[n] = prev
                    self._ends[key] = end

    def propose(self, limit: int = DRAFT_TOKENS) -> list[int]:
        """Up to ``limit`` tokens (and the guess's current size) that followed the last time the
        history's last 3 or 2 tokens were seen; [] when they were not seen, or while guessing pauses."""
        if self._pause > 0:
            self._pause -= 1
            return []
        for n in (3, 2):  # one token alone repeats too often to say what comes next
            start = self._before.get(n)
            if start is not None:
                return self.history[start:start + min(limit, self.size)]
        return []

    def record(self, proposed: int, accepted: int) -> None:
        """``accepted`` of ``proposed`` guessed tokens agreed with what was sampled."""
        if proposed <= 0:
            return
        self.proposed += proposed
        self.accepted += accepted
        self.size = min(self.size * 2, DRAFT_TOKENS * 4) if accepted == proposed else max(1, accepted + 1)
        self.accept += _ALPHA * (accepted / proposed - self.accept)
        if self.accept < MIN_ACCEPT:
            self._pause = self._cooldown
            self._cooldown = min(self._cooldown * 2, 256)
            self.accept = MIN_ACCEPT  # the next try starts at the threshold: one good guess keeps it on
        elif accepted:
            self._cooldown = COOLDOWN
