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
(u) ``--under-load``: tokens/s of eight users at once through botd (bench_concurrency's daemon
    settings and client: ``POST /v1/chat/completions``, temperature 0, fixed ``max_tokens``) while a
    ninth user sends screenshots without pause (``image_url`` parts, the bot with
    ``images = "ocr"``, ``max_tokens`` 1: the daemon reads each picture in its own OCR thread at
    nice 19 and SCHED_IDLE, then answers one token) ÷ the same without pictures, rounds
    alternating (the median ratio counts; goal >= 0.8). The pictures answered during the loaded
    rounds are counted: at idle priority they wait while the model is busy.

    .venv/bin/python bench/bench_ocr.py                      # (o), 10 screenshots per language
    .venv/bin/python bench/bench_ocr.py --under-load         # (o) + (u), Qwen2.5-0.5B-shaped model
    .venv/bin/python bench/bench_ocr.py --smoke              # tiny sizes, a check that it runs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

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


def start_botd(work: Path, model: Path, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """bench_concurrency's daemon (same [model], [queue] and key), its bot reading pictures."""
    import bench_concurrency as bc

    port = bc.free_port()
    extra, notes = bc.model_extras(8, None)
    cfg = (
        f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\nlog_level = "warning"\nlog_format = "json"\n'
        f"shutdown_grace_s = 5\n"
        f'[model]\npath = "{model}"\nname = "bench"\nn_ctx = {args.n_ctx}\nn_threads = {args.threads}\n'
        f"max_tokens = 256\ntemperature = 0.0\nrepeat_penalty = 1.0\nseed = 1\n{extra}"
        f"[queue]\nmax_size = 1000\nper_user = 16\nmax_wait_s = 3600\njob_timeout_s = 3600\n"
        f"[images]\nthreads = {args.threads}\n"
        f'[api]\nkeys = ["env:BOTD_BENCH_KEY"]\n'
        f'[bots.assistant]\nsystem_prompt = "{bc.SYSTEM}"\nimages = "ocr"\n'
    )
    (work / "config.toml").write_text(cfg)
    log = work / "botd.log"
    env = {**os.environ, "BOTD_BENCH_KEY": bc.API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "bots.cli", "run", "--config", str(work / "config.toml")],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return bc.Target("botd", f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {bc.API_KEY}"}, True,
                     proc, log), notes


class Sender(threading.Thread):
    """One user sending screenshots to the daemon one after the other (``max_tokens`` 1: the
    daemon reads each picture, then answers with one token), while ``sending`` is set."""

    def __init__(self, target: Any, shots: list[Screenshot]) -> None:
        super().__init__(daemon=True)
        self.target, self.shots = target, shots
        self.sending = threading.Event()
        self.done = threading.Event()
        self.first = threading.Event()  # the first request came back
        self.read = 0
        self.failed = 0
        self.seconds: list[float] = []

    def run(self) -> None:
        i = 0
        while not self.done.is_set():
            if not self.sending.wait(0.1):
                continue
            shot = self.shots[i % len(self.shots)]
            i += 1
            url = "data:image/png;base64," + base64.b64encode(shot.png).decode()
            body = json.dumps({"model": "assistant", "user": "picture-sender", "max_tokens": 1, "temperature": 0,
                               "messages": [{"role": "user", "content": [
                                   {"type": "text", "text": f"What does this say? ({i})"},
                                   {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
            req = urllib.request.Request(self.target.base + "/v1/chat/completions", data=body, method="POST",
                                         headers={**self.target.headers, "Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                self.read += 1
                self.seconds.append(time.perf_counter() - t)
            except OSError:
                self.failed += 1
                time.sleep(0.5)
            self.first.set()


async def under_load(args: argparse.Namespace, shots: list[Screenshot]) -> list[str]:
    import bench_concurrency as bc
    import qwen_shaped

    from core.config import embedded_model_path

    model = args.model or (embedded_model_path() if args.smollm else qwen_shaped.build())
    with tempfile.TemporaryDirectory(prefix="bench-ocr-") as tmp:
        target, notes = start_botd(Path(tmp), Path(model), args)
        sender = Sender(target, [s for s in shots if s.png[:4] == b"\x89PNG"] or shots)
        sender.start()
        try:
            if not bc.wait_http(target, "/healthz", 300):
                return [f"  (u) botd did not start:\n  {target.tail()}"]
            await bc.aggregate(target, args.users, 1, 16, "warm")
            sender.sending.set()  # the first picture loads the OCR engine: not inside a measured round
            await asyncio.to_thread(sender.first.wait, 600)
            sender.sending.clear()
            ratios, base_tps, load_tps = [], [], []
            read_before = sender.read
            for r in range(args.rounds):
                base = await bc.aggregate(target, args.users, args.per_user, args.max_tokens, f"b{r}")
                sender.sending.set()
                loaded = await bc.aggregate(target, args.users, args.per_user, args.max_tokens, f"o{r}")
                sender.sending.clear()
                base_tps.append(base.tps)
                load_tps.append(loaded.tps)
                ratios.append(loaded.tps / base.tps)
                print(f"  (u) round {r + 1}: {args.users} users {base.tps:.1f} tokens/s alone, {loaded.tps:.1f} "
                      f"while pictures are read: {ratios[-1]:.2f}", flush=True)
            read = sender.read - read_before
        finally:
            sender.done.set()
            sender.sending.set()
            target.stop()
            sender.join(60)
    ratio = statistics.median(ratios)
    verdict = "met" if ratio >= 0.8 else "NOT met"
    took = f", {statistics.median(sender.seconds):.1f} s each (median)" if sender.seconds else ""
    return [f"  (u) model {Path(model).name}, {args.threads} threads, {'; '.join(notes)}",
            f"  (u) {args.users} users: {statistics.median(base_tps):.1f} tokens/s alone, "
            f"{statistics.median(load_tps):.1f} while a ninth user sends screenshots (median of {args.rounds} rounds)",
            f"  (u) ratio {ratio:.2f} (goal >= 0.8: {verdict}); pictures answered during the loaded rounds: "
            f"{read}{took}; failed requests: {sender.failed}"]


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
