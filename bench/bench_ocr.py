"""Benchmark (issue 28 item 2): OCR of screenshots on this box, and the chat model's speed while it runs.

(o) Accuracy and time per picture: generated screenshots of Chinese and English text
    (tests/media_samples.py: 2-3 lines each, 14-24 px, light and dark, every other one a JPEG at
    quality 60, drawn with the box's fonts: WenQuanYi Micro Hei and DejaVu Sans), read by botd's
    engine (core/media/ocr.py: RapidOCR 3.x, the PP-OCR models inside its wheel, ``--threads``
    onnxruntime threads) in the calling thread. Per language: character error rate (spaces and
    punctuation ignored), seconds per picture (mean, median, p95), and the engine's load time.
    ``rapidocr-onnxruntime`` 1.4.4 (PP-OCRv4, the engine the issue named) is measured beside it on
    the same pictures with the same settings when it is installed
    (``pip install --no-deps rapidocr-onnxruntime==1.4.4``: it imports cv2, which botd's
    opencv-python-headless provides).
(u) ``--under-load``: tokens/s of eight users at once through botd (bench_concurrency's daemon and
    client: ``POST /v1/chat/completions``, temperature 0, fixed ``max_tokens``) while pictures are
    read without pause ÷ the same without OCR, rounds alternating (the median ratio counts; goal
    >= 0.8). The pictures are read by core.media.ocr's own worker (one thread at nice 19 and
    SCHED_IDLE, its onnxruntime threads inheriting both) in this bench process, beside the daemon
    on the same cores: the daemon's HTTP API takes no pictures, and the CPU competition is the
    same whichever process holds the OCR thread. Pictures read during the loaded rounds are
    counted too.

    .venv/bin/python bench/bench_ocr.py                      # (o), 10 screenshots per language
    .venv/bin/python bench/bench_ocr.py --under-load         # (o) + (u), Qwen2.5-0.5B-shaped model
    .venv/bin/python bench/bench_ocr.py --smoke              # tiny sizes, a check that it runs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from core.media.lowprio import lower_this_thread  # noqa: E402
from core.media.ocr import Ocr, OcrLimits, load_picture  # noqa: E402
from tests.media_samples import Screenshot, cer, screenshots  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def row(name: str, lang: str, errs: list[float], secs: list[float]) -> str:
    return (f"  {name:<22} {lang}  CER {statistics.mean(errs):.4f}  s/picture mean {statistics.mean(secs):.2f}  "
            f"median {statistics.median(secs):.2f}  p95 {pct(secs, 0.95):.2f}  (n={len(secs)})")


def measure_botd(shots: list[Screenshot], threads: int) -> list[str]:
    started = time.perf_counter()
    ocr = Ocr(OcrLimits(threads=threads))
    ocr.read_now(shots[0].png)  # loads the models (and warms them)
    load = time.perf_counter() - started
    out = [f"  botd (rapidocr 3.x)     engine load + first picture {load:.2f} s"]
    for lang in ("zh", "en"):
        errs, secs = [], []
        for s in (s for s in shots if s.lang == lang):
            t = time.perf_counter()
            got = ocr.read_now(s.png)
            secs.append(time.perf_counter() - t)
            errs.append(cer(s.text, got.text))
        if secs:
            out.append(row("botd (rapidocr 3.x)", lang, errs, secs))
            print(out[-1], flush=True)
    ocr.close()
    return out


def measure_rapidocr_onnxruntime(shots: list[Screenshot], threads: int) -> list[str]:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        return ["  rapidocr-onnxruntime 1.4.4: not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4)"]
    limits = OcrLimits(threads=threads)
    started = time.perf_counter()
    engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, use_cls=False,
                      det_limit_type="max", det_limit_side_len=100_000, max_side_len=100_000)

    def read(png: bytes) -> str:
        arr = load_picture(png, limits)[:, :, ::-1].copy()  # it expects OpenCV's BGR
        res, _ = engine(arr)
        return "\n".join(r[1] for r in (res or []))

    read(shots[0].png)
    out = [f"  rapidocr-onnxruntime    engine load + first picture {time.perf_counter() - started:.2f} s"]
    for lang in ("zh", "en"):
        errs, secs = [], []
        for s in (s for s in shots if s.lang == lang):
            t = time.perf_counter()
            text = read(s.png)
            secs.append(time.perf_counter() - t)
            errs.append(cer(s.text, text))
        if secs:
            out.append(row("rapidocr-onnxruntime", lang, errs, secs))
            print(out[-1], flush=True)
    return out


class Reader(threading.Thread):
    """Reads pictures without pause in a thread at botd's media priority, until stopped."""

    def __init__(self, ocr: Ocr, shots: list[Screenshot]) -> None:
        super().__init__(daemon=True)
        self.ocr, self.shots = ocr, shots
        self.reading = threading.Event()
        self.done = threading.Event()
        self.count = 0

    def run(self) -> None:
        lower_this_thread()
        self.ocr.read_now(self.shots[0].png)  # the engine and its threads are made here, idle too
        i = 0
        while not self.done.is_set():
            if not self.reading.wait(0.1):
                continue
            self.ocr.read_now(self.shots[i % len(self.shots)].png)
            self.count += 1
            i += 1


async def under_load(args: argparse.Namespace, shots: list[Screenshot]) -> list[str]:
    import bench_concurrency as bc
    import qwen_shaped

    from core.config import embedded_model_path

    model = args.model or (embedded_model_path() if args.smollm else qwen_shaped.build())
    ns = SimpleNamespace(parallel=8, n_ctx=args.n_ctx, threads=args.threads, users=args.users)
    reader = Reader(Ocr(OcrLimits(threads=args.threads)), shots)
    reader.start()
    with tempfile.TemporaryDirectory(prefix="bench-ocr-") as tmp:
        target, notes = bc.start_botd(Path(tmp), Path(model), ns, None, None)  # type: ignore[arg-type]
        try:
            if not bc.wait_http(target, "/healthz", 300):
                return [f"  (u) botd did not start:\n  {target.tail()}"]
            await bc.aggregate(target, args.users, 1, 16, "warm")
            ratios, base_tps, load_tps = [], [], []
            read_before = reader.count
            for r in range(args.rounds):
                base = await bc.aggregate(target, args.users, args.per_user, args.max_tokens, f"b{r}")
                reader.reading.set()
                loaded = await bc.aggregate(target, args.users, args.per_user, args.max_tokens, f"o{r}")
                reader.reading.clear()
                base_tps.append(base.tps)
                load_tps.append(loaded.tps)
                ratios.append(loaded.tps / base.tps)
                print(f"  (u) round {r + 1}: {args.users} users {base.tps:.1f} tokens/s alone, {loaded.tps:.1f} "
                      f"while OCR runs: {ratios[-1]:.2f}", flush=True)
            read = reader.count - read_before
        finally:
            reader.done.set()
            reader.reading.set()
            target.stop()
            reader.join(120)  # a picture being read ends first (onnxruntime aborts if torn down mid-run)
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= 0.8 else "NOT met"
    return [f"  (u) model {Path(model).name}, {args.threads} threads, {'; '.join(notes)}",
            f"  (u) {args.users} users: {statistics.median(base_tps):.1f} tokens/s alone, "
            f"{statistics.median(load_tps):.1f} while OCR runs (median of {args.rounds} rounds)",
            f"  (u) ratio {ratio:.2f} (goal >= 0.8: {verdict}); pictures read meanwhile: {read}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="screenshots per language")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2, help="OCR threads (and botd's n_threads for --under-load)")
    ap.add_argument("--under-load", action="store_true", help="(u): eight users' tokens/s with and without OCR")
    ap.add_argument("--model", type=Path, help="(u) a GGUF file (default: the Qwen2.5-0.5B-shaped Q4_0 file)")
    ap.add_argument("--smollm", action="store_true", help="(u) the embedded SmolLM2-135M-Instruct Q4_1")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--per-user", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.rounds, args.per_user, args.max_tokens, args.users = 1, 1, 1, 8, 2
        args.smollm = args.smollm or args.model is None
    shots = screenshots(args.n, seed=args.seed)
    print(f"(o) {len(shots)} screenshots ({sum(s.lang == 'zh' for s in shots)} Chinese), {args.threads} threads, "
          f"{os.cpu_count()} cores", flush=True)
    lines: list[Any] = ["(o) OCR of generated screenshots"]
    lines += measure_botd(shots, args.threads)
    lines += measure_rapidocr_onnxruntime(shots, args.threads)
    if args.under_load:
        lines.append("(u) eight users while OCR runs ÷ without")
        lines += asyncio.run(under_load(args, shots))
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
