"""core/engines/batching.py: the count of micro-batches llama.cpp's ``split_equal(sequential=true)``
cuts a batch into, checked against a row-by-row transcription of the C++ loop (llama.cpp 0.3.36,
src/llama-batch.cpp) and against llama.cpp itself (its debug log names every micro-batch)."""

from __future__ import annotations

import ctypes
import itertools
import random

import pytest

from core.engines.batching import micro_batches, runs_of


def split_equal_reference(seq_ids: list[int], n_ubatch: int) -> list[list[int]]:
    """``llama_batch_allocr::split_equal(n_ubatch, sequential=true, n_keep_tail=0)`` row by row,
    one sequence per row: the micro-batches, as lists of row indices."""
    used = [False] * len(seq_ids)
    rows_of: dict[int, list[int]] = {}
    for i, s in enumerate(seq_ids):
        rows_of.setdefault(s, []).append(i)
    out = []
    while True:
        cur: list[int] = []
        last = -1
        for i, s in enumerate(seq_ids):
            if used[i]:
                continue
            add = s not in cur
            add = add and (not cur or s == last + 1)
            if add:
                cur.append(s)
                last = s
                if len(cur) > n_ubatch:
                    break
        if not cur:
            return out
        idx = [0] * len(cur)
        for k, s in enumerate(cur):
            while used[rows_of[s][idx[k]]]:
                idx[k] += 1
        per: list[list[int]] = [[] for _ in cur]
        while True:
            if any(idx[k] >= len(rows_of[s]) for k, s in enumerate(cur)):
                break
            for k, s in enumerate(cur):
                row = rows_of[s][idx[k]]
                per[k].append(row)
                used[row] = True
                idx[k] += 1
            if (len(per[0]) + 1) * len(cur) > n_ubatch:
                break
        out.append([r for p in per for r in p])


def test_the_count_follows_llama_cpps_loop_on_random_batches():
    rng = random.Random(5)
    for _ in range(3000):
        seqs = rng.randint(1, 8)
        rows = [rng.randrange(seqs + rng.randint(0, 4)) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.5:  # mostly a sequence's rows together, as prompt chunks are
            rows.sort(key=lambda s: (rng.random() < 0.2, s))
        n_ubatch = rng.choice([4, 8, 16, 64, 512])
        assert micro_batches(rows, n_ubatch) == len(split_equal_reference(rows, n_ubatch)), (rows, n_ubatch)


def test_known_shapes():
    assert micro_batches([], 512) == 0
    assert micro_batches(list(range(8)), 512) == 1  # eight decode rows, ids in order
    assert micro_batches([3, 1, 2, 0], 512) == 3  # {3}, {1, 2}, {0}
    assert micro_batches([0, 2, 4, 6, 8, 10, 12, 14], 512) == 8  # scattered ids: one pass each
    # Decode rows of 0-6 and a 128-token prompt chunk of 7: one row each, then the chunk's rest.
    assert micro_batches([*range(7), *[7] * 128], 512) == 2
    # The chunk of a sequence in the middle, its rows together: still two.
    assert micro_batches([0, 1, 2, *[3] * 64, 4, 5], 512) == 2
    # Two prompts of different lengths beside decode rows: the equal split takes a third pass.
    assert micro_batches([0, 1, *[2] * 50, *[3] * 20], 512) == 3
    assert runs_of([0, 1, 2, 5, 6]) == 2 and runs_of([]) == 0 and runs_of([4]) == 1


def test_rows_in_sequence_order_are_never_beaten_by_another_order():
    """The rows of a step while answers stream (one row per sequence, and a chunk of one prompt
    being read), each sequence's rows together and ids ascending as the engine writes them: no
    other order of the same rows costs fewer micro-batches (every order of small batches tried).
    (With several sequences of unequal lengths in one batch, the equal split can make another
    order cheaper: the engine never writes such a step while answers stream.)"""
    rng = random.Random(11)
    for _ in range(150):
        seqs = rng.sample(range(8), rng.randint(1, 5))
        rows = seqs + [rng.choice(seqs)] * rng.randint(0, 3)
        n_ubatch = rng.choice([len(rows), 512])
        ordered = micro_batches(sorted(rows), n_ubatch)
        best = min(micro_batches(list(p), n_ubatch) for p in set(itertools.permutations(rows)))
        assert ordered == best, (sorted(rows), n_ubatch)


@pytest.fixture(scope="module")
def counting_context():
    """A bare llama.cpp context of the embedded model with a stream per sequence (as the engine
    makes it) and a graph callback that counts the computed graphs: llama.cpp computes one graph
    per micro-batch, and the callback is asked about each graph's output node once."""
    import llama_cpp
    from llama_cpp import _internals as internals

    from core.config import embedded_model_path

    graphs = {"n": 0}

    @llama_cpp.ggml_backend_sched_eval_callback
    def on_node(tensor, ask, _data) -> bool:
        if ask and ctypes.cast(tensor, ctypes.POINTER(_Tensor)).contents.name == b"result_output":
            graphs["n"] += 1
        return False

    model = internals.LlamaModel(path_model=str(embedded_model_path()),
                                 params=llama_cpp.llama_model_default_params(), verbose=False)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 64 * 8, 64, 64
    cparams.n_seq_max, cparams.kv_unified, cparams.n_threads, cparams.n_threads_batch = 8, False, 1, 1
    cparams.cb_eval = on_node
    ctx = internals.LlamaContext(model=model, params=cparams, verbose=False)
    batch = internals.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1, verbose=False)
    yield ctx, batch, graphs, on_node
    batch.close()
    ctx.close()
    model.close()


class _Tensor(ctypes.Structure):
    """The head of ggml's ``struct ggml_tensor`` up to its name (ggml.h of llama.cpp 0.3.36)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [3, 1, 2, 0], [0, 2, 4, 6], [*range(4), *[4] * 20],
                                  [0, *[1] * 9, 2, *[3] * 4], [1, 0, *[2] * 5, 5, 4], [0, 1, *[2] * 12, *[3] * 5]])
def test_the_count_is_what_llama_cpp_does(counting_context, rows):
    import llama_cpp

    ctx, batch, graphs, _ = counting_context
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
    pos: dict[int, int] = {}
    for i, s in enumerate(rows):
        batch.batch.token[i] = 100 + i
        batch.batch.pos[i] = pos.get(s, 0)
        pos[s] = pos.get(s, 0) + 1
        batch.batch.n_seq_id[i] = 1
        batch.batch.seq_id[i][0] = s
        batch.batch.logits[i] = True
    batch.batch.n_tokens = len(rows)
    before = graphs["n"]
    ctx.decode(batch)
    assert graphs["n"] - before == micro_batches(rows, 64)


def test_the_count_is_a_prometheus_histogram_and_counter():
    from core import metrics
    from core.engines.base import EngineStats

    stats = EngineStats()
    for n in (1, 2, 1, 9):
        stats.count_step(n)
    saved = metrics.ENGINE.source
    metrics.ENGINE.source = lambda: {"slots": 8, **stats.as_dict()}
    try:
        text = metrics.render()[0].decode()
    finally:
        metrics.ENGINE.source = saved
    assert "botd_engine_micro_batches_total 13.0" in text
    assert 'botd_engine_micro_batches_per_step_bucket{le="1"} 2.0' in text
    assert 'botd_engine_micro_batches_per_step_bucket{le="2"} 3.0' in text
    assert 'botd_engine_micro_batches_per_step_bucket{le="+Inf"} 4.0' in text
    assert "botd_engine_last_micro_batches 9.0" in text
