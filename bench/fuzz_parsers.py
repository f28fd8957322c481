"""Fuzz every document parser (Markdown, text, PDF, .docx) for as long as asked.

The suite runs the same pass with a short budget (tests/test_knowledge_fuzz.py); this runs it
for ``--seconds``, in rounds of hostile documents from tests/document_fuzz.py, each read as the
ingest reads it: in this process (``read_document`` under the ``[ingest]`` limits, then chunked)
and, for a share of them, through the parsing process (``ParseWorker``) that the ingest uses.
A finding is anything but sections or a refusal with a reason, a document that takes longer
than ``SECONDS_PER_DOCUMENT`` to read, or this process's peak RSS growing past ``--rss-mb``;
hypothesis shrinks it and the file is kept under bench/.cache/fuzz-findings/.

    .venv/bin/python bench/fuzz_parsers.py --seconds 300 [--worker-share 0.2] [--rss-mb 300]

Printed: per format, documents read and refused (the commonest reasons), the slowest, and
the peak RSS; exit status 1 on a finding.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.strategies import just  # noqa: E402

from core.knowledge.documents import read_document  # noqa: E402
from core.knowledge.guards import MB, ParseLimits  # noqa: E402
from core.knowledge.parse_worker import ParseWorker  # noqa: E402
from tests.document_fuzz import SECONDS_PER_DOCUMENT, check_document, docx_files, markdown_files, pdf_files  # noqa: E402

FORMATS = {"markdown/text": markdown_files(), "docx": docx_files(), "pdf": pdf_files()}
# Small limits, so that the fuzz reaches them; the parsing process's ceiling as configured by default.
LIMITS = ParseLimits(max_uncompressed_bytes=50 * MB, max_pages=50, max_text_bytes=2 * MB, timeout_s=30)
FINDINGS = ROOT / "bench" / ".cache" / "fuzz-findings"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Stats:
    def __init__(self) -> None:
        self.read = 0
        self.refused = 0
        self.through_worker = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.slowest = (0.0, "")


def run(seconds: float, worker_share: float, rss_mb: float, batch: int) -> int:
    stats = {name: Stats() for name in FORMATS}
    tmp = Path(tempfile.mkdtemp(prefix="botd-fuzz-"))
    deadline = time.monotonic() + seconds
    Path("/proc/self/clear_refs").write_text("5")
    base_rss = _status_kb("VmRSS") / 1024
    count = 0
    rounds = 0
    try:
        with ParseWorker(LIMITS) as worker:
            while time.monotonic() < deadline:
                for name, strategy in FORMATS.items():
                    if time.monotonic() >= deadline:
                        break
                    @settings(max_examples=batch, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck))
                    @given(strategy, just(stats[name]))
                    def one(doc: tuple[str, bytes], st: Stats) -> None:
                        nonlocal count
                        count += 1
                        suffix, data = doc
                        path = tmp / f"doc{count:07}{suffix}"
                        path.write_bytes(data)
                        via_worker = worker_share > 0 and count % max(1, round(1 / worker_share)) == 0
                        started = time.monotonic()
                        try:
                            outcome = check_document(path, LIMITS, read=worker.read if via_worker else read_document)
                        except BaseException:
                            FINDINGS.mkdir(parents=True, exist_ok=True)
                            shutil.copy(path, FINDINGS / path.name)
                            raise
                        finally:
                            path.unlink(missing_ok=True)
                        took = time.monotonic() - started
                        if took > st.slowest[0]:
                            st.slowest = (took, f"{suffix}, {len(data)} bytes")
                        st.through_worker += via_worker
                        if isinstance(outcome, str):
                            st.refused += 1
                            st.reasons[re.sub(r"\d+(\.\d+)?", "N", outcome)[:90]] += 1
                        else:
                            st.read += 1
                        peak = _status_kb("VmHWM") / 1024
                        assert peak - base_rss < rss_mb, f"peak RSS {peak:.0f} MB, {peak - base_rss:.0f} over the start"

                    one()
                rounds += 1
    except Exception as exc:
        print(f"FINDING after {count} documents: {type(exc).__name__}: {str(exc)[:2000]}")
        print(f"the file is kept under {FINDINGS}")
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{count} documents in {seconds:.0f} s ({rounds} rounds); peak RSS {_status_kb('VmHWM') / 1024:.0f} MB "
          f"(started at {base_rss:.0f} MB, ceiling +{rss_mb:.0f} MB); each under {SECONDS_PER_DOCUMENT:.0f} s")
    for name, st in stats.items():
        print(f"  {name}: {st.read} read, {st.refused} refused ({st.through_worker} through the parsing process); "
              f"slowest {st.slowest[0]:.2f} s ({st.slowest[1]})")
        for reason, n in st.reasons.most_common(4):
            print(f"      {n:5}  {reason}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--worker-share", type=float, default=0.2,
                    help="share of the documents read through the parsing process (default 0.2)")
    ap.add_argument("--rss-mb", type=float, default=300.0, help="the most this process's peak RSS may grow")
    ap.add_argument("--batch", type=int, default=50, help="documents per hypothesis run")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The parsers' complaints about damaged files (thousands a minute) are counted, not printed.
    structlog.configure(processors=[_count_log_events])
    code = run(args.seconds, args.worker_share, args.rss_mb, args.batch)
    print(f"log events from the parsers: {sum(LOG_EVENTS.values())} "
          f"({', '.join(f'{n} {e!r}' for e, n in LOG_EVENTS.most_common(3))})")
    return code


LOG_EVENTS: collections.Counter[str] = collections.Counter()


def _count_log_events(_logger: object, _method: str, event: dict[str, object]) -> dict[str, object]:
    LOG_EVENTS[str(event.get("event", ""))] += 1
    raise structlog.DropEvent


if __name__ == "__main__":
    sys.exit(main())
