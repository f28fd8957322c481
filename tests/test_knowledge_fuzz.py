"""The fuzz pass of every document parser, with a short budget (longer: bench/fuzz_parsers.py).

Hostile Markdown, text, PDF and .docx files (tests/document_fuzz.py) are read as the ingest
reads them: no exception but a refusal with a reason, each within a time bound, no text over
the limit, and the peak RSS of this process no more than FUZZ_RSS_MB above where it started.
Then a folder of them goes through the real ingest (parsing process, real embedder): nothing
escapes it and every file is either indexed or in the report."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.knowledge.embedder import Embedder
from core.knowledge.guards import MB, ParseLimits
from core.knowledge.ingest import ingest
from core.knowledge.parse_worker import ParseWorker
from tests.document_fuzz import check_document, documents, docx_files, markdown_files, pdf_files
from tests.test_knowledge_hostile import peak_mb, reset_peak, rss_mb

# The stated ceiling: reading hostile documents in this process grows its peak RSS by less than this.
FUZZ_RSS_MB = 300
# Small limits, so that the fuzz reaches them.
LIMITS = ParseLimits(max_uncompressed_bytes=50 * MB, max_pages=50, max_text_bytes=2 * MB, memory_bytes=512 * MB,
                     timeout_s=30)
# No shrinking in the suite (a slow document makes it take minutes): the failing file is printed as
# drawn; bench/fuzz_parsers.py shrinks.
_FUZZ = settings(deadline=None, database=None, derandomize=False, phases=[Phase.generate], print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.large_base_example, HealthCheck.function_scoped_fixture])


def _write(folder: Path, n: int, suffix: str, data: bytes) -> Path:
    path = folder / f"doc{n:04}{suffix}"
    path.write_bytes(data)
    return path


def _fuzz_in_process(strategy: st.SearchStrategy[tuple[str, bytes]], examples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**9))

        @settings(_FUZZ, max_examples=examples)
        @given(strategy)
        def read_one(doc: tuple[str, bytes]) -> None:
            check_document(_write(Path(tmp), next(counter), *doc), LIMITS)

        before = rss_mb()
        reset_peak()
        read_one()
        assert peak_mb() - before < FUZZ_RSS_MB, (before, peak_mb())


def test_fuzz_markdown_and_text():
    _fuzz_in_process(markdown_files(), 150)


def test_fuzz_docx():
    _fuzz_in_process(docx_files(), 80)


def test_fuzz_pdf():
    _fuzz_in_process(pdf_files(), 80)


def test_fuzz_through_the_parsing_process_and_the_ingest(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    written: list[Path] = []
    with ParseWorker(LIMITS) as worker:

        @settings(_FUZZ, max_examples=40)
        @given(documents())
        def read_one(doc: tuple[str, bytes]) -> None:
            path = _write(folder, len(written), *doc)
            written.append(path)
            check_document(path, LIMITS, read=worker.read)

        read_one()
    # The same files, one base: nothing escapes the ingest; each file is indexed or reported.
    report = ingest("fuzz", [folder], tmp_path / "state", Embedder(), 800, limits=LIMITS)
    assert report.files == len(written)
    assert report.files_embedded + len(report.skipped) == report.files, report
