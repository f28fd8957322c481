"""``botd kb ingest`` shows a bar for the documents it reads (the chunks' bar is the ingest's own)."""

from __future__ import annotations

import io
from pathlib import Path

from bots.ingest_progress import DocumentsBar
from core.knowledge.embedder import Embedder
from core.knowledge.ingest import ingest


def test_the_documents_bar_counts_every_document_read(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"note{i}.md").write_text(f"# Note {i}\n第 {i} 条说明。Note number {i}.\n")
    stream = io.StringIO()
    bar = DocumentsBar("hr", [docs], stream=stream, on=True)
    ingest("hr", [docs], tmp_path / "state", Embedder(), 800, on_file=bar)
    bar.close()
    out = stream.getvalue()
    assert "hr: documents" in out and "3/3" in out and "note2.md" in out


def test_no_bar_off_a_terminal(tmp_path: Path) -> None:
    stream = io.StringIO()  # not a terminal
    bar = DocumentsBar("hr", [tmp_path], stream=stream)
    bar("a.md")
    bar.close()
    assert stream.getvalue() == ""
