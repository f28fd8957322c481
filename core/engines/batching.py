"""How llama.cpp cuts one batch into micro-batches, counted without running it.

With a KV stream per sequence (``kv_unified = False``, what :class:`LlamaCppEngine` uses),
llama.cpp 0.3.36 splits every ``llama_decode`` batch with
``llama_batch_allocr::split_equal(n_ubatch, sequential=true)`` (src/llama-batch.cpp, called
from ``llama_kv_cache::init_batch``), and each micro-batch it makes is one pass over the
weights. Per micro-batch it

1. walks the unused rows in row order and takes a row's sequence when it is the first one
   taken or its id is exactly the last taken id + 1 (rows of a sequence already taken, and
   of any other id, are passed over: the walk goes on to the end of the batch);
2. takes the same number of rows from each taken sequence, each sequence's earliest unused
   rows first: as many as the shortest of them has left, and no more than ``n_ubatch`` rows
   in all (at least one each).

So a step whose sequence ids are consecutive and written in ascending order costs one pass
when every sequence has one row, and a prompt being read beside them adds one pass for the
rows it has beyond the first; written first or last, where the walk cannot join it to the
others, its rows make that pass alone, for the same count (and a micro-batch's attention is
sized by its longest KV stream: the answers' pass then looks over their own short ones).
:func:`micro_batches` and :func:`split` follow those rules exactly; the engine counts every
step with them and writes its rows so that the count is as small as it can be.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def micro_batches(seq_ids: Sequence[int], n_ubatch: int) -> int:
    """How many micro-batches ``split_equal(n_ubatch, sequential=true)`` makes of a batch whose
    rows belong to ``seq_ids`` (one sequence per row, in row order)."""
    return len(split(seq_ids, n_ubatch))


def split(seq_ids: Sequence[int], n_ubatch: int) -> list[dict[int, int]]:
    """The micro-batches ``split_equal(n_ubatch, sequential=true)`` makes of a batch whose rows
    belong to ``seq_ids`` (one sequence per row, in row order): each as {sequence: its rows in it}."""
    out: list[dict[int, int]] = []
    if not seq_ids:
        return out
    # Consecutive rows of one sequence act as one: the walk passes over the rest of a run once
    # its first unused row was taken or refused. A run is [sequence, rows left in it].
    runs: list[list[int]] = []
    left: dict[int, int] = {}
    for s in seq_ids:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
        left[s] = left.get(s, 0) + 1
    remaining = len(seq_ids)
    while remaining:
        taken: list[int] = []
        seen: set[int] = set()
        for s, n in runs:
            if n == 0 or s in seen or (taken and s != taken[-1] + 1):
                continue
            taken.append(s)
            seen.add(s)
            if len(taken) > n_ubatch:
                break
        each = min(min(left[s] for s in taken), max(1, n_ubatch // len(taken)))
        for s in taken:
            left[s] -= each
            need = each
            for run in runs:  # a sequence's earliest rows go first
                if need == 0:
                    break
                if run[0] == s and run[1]:
                    used = min(need, run[1])
                    run[1] -= used
                    need -= used
        remaining -= each * len(taken)
        out.append(dict.fromkeys(taken, each))
    return out


def runs_of(ids: Iterable[int]) -> int:
    """How many runs of consecutive numbers ``ids`` make ({0, 1, 2, 5, 6}: 2)."""
    ordered = sorted(set(ids))
    return sum(1 for i, x in enumerate(ordered) if i == 0 or x != ordered[i - 1] + 1)
