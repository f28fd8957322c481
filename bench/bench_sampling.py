"""Micro-benchmark (issue 26 item 2): CPU time to choose one token from a real logits row, llama.cpp's
old sampler chain (penalties over the whole vocabulary, then greedy or top_k -> ... -> dist) vs
botd's sampler (core/engines/sampling.py: the penalty on the last-64 tokens' logits in place,
then an argmax or the rest of the chain).

It counts CPU time (``time.process_time``) of ``--calls`` calls, ``--repeats`` times, and prints
the least per call: a figure that a busy machine disturbs little (unlike wall time), so it needs
no quiet box. The logits row is the model's own, after reading a real prompt.

    .venv/bin/python bench/bench_sampling.py                    # the embedded SmolLM2 (49,152 tokens)
    .venv/bin/python bench/bench_sampling.py --model bench/.cache/qwen2.5-0.5b-shaped-q4_0.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp

from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.engines.sampling import TokenSampler, build_chain
from core.messages import ThreadKey


def per_call(fn, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    path = args.model or embedded_model_path()
    engine = LlamaCppEngine(path, n_ctx=512, n_threads=2, n_batch=128, parallel=1, cache_mb=16)
    engine.load()
    ctx, model = engine._ctx.ctx, engine._model
    prompt = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    probe = GenerationRequest(ThreadKey("bench", "bot", "sampling"), prompt, 1, temperature=0.0)
    gen = engine.open(probe, lambda: False)
    engine.step([gen])  # reads the prompt: the last row's logits are real
    index = gen.logits_at
    window = [int(t) for t in gen.prompt[-64:]]
    print(f"model {path.name}, vocabulary {model.n_vocab()}, {args.calls} calls x {args.repeats}, "
          "least CPU time per call:")
    for temperature in (0.0, 0.7):
        for penalty in (1.1, 1.0):
            request = GenerationRequest(probe.thread_key, prompt, 1, temperature=temperature,
                                        repeat_penalty=penalty, seed=7)
            old = build_chain(model, request, 7, penalties=True)
            for t in window:
                llama_cpp.llama_sampler_accept(old.sampler, t)
            new = TokenSampler(model, request, 7)
            new.recent.extend(window)

            def old_call(old=old) -> None:
                llama_cpp.llama_sampler_sample(old.sampler, ctx, index)

            def new_call(new=new) -> None:
                new.sample(ctx, index)

            t_old = per_call(old_call, args.calls, args.repeats)
            t_new = per_call(new_call, args.calls, args.repeats)
            print(f"  temperature {temperature}, repeat_penalty {penalty}: old chain {t_old * 1e6:7.1f} us, "
                  f"botd {t_new * 1e6:7.1f} us ({t_old / t_new:.1f}x)")
            old.close()
            new.close()
    engine.release(gen)
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
