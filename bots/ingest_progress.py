"""The documents bar of ``botd kb ingest``: one step per document read, with its name and an ETA.

The embedding of the chunks has its own bar (core.knowledge.ingest.Progress); reading a folder
of PDFs can take as long, and showed nothing. Quiet when stderr is not a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any


class DocumentsBar:
    """Called with each document's label as ``ingest(on_file=...)`` reaches it."""

    def __init__(self, name: str, folders: list[Path], stream: IO[str] | None = None, on: bool | None = None) -> None:
        stream = stream or sys.stderr
        self.bar: Any = None
        if stream.isatty() if on is None else on:
            from tqdm import tqdm

            from core.knowledge.ingest import discover

            self.bar = tqdm(total=len(discover(folders)), desc=f"{name}: documents", unit="doc", file=stream,
                            leave=True, dynamic_ncols=True)

    def __call__(self, source: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(source[-40:], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
