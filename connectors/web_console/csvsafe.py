"""CSV a spreadsheet opens safely: one cell's text, and the byte-order mark Excel needs.

Shared by the console's exports (the audit log, the conversations, the unanswered questions).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

# A BOM first: Excel then reads the Chinese text as UTF-8.
BOM = "\ufeff"


def cell(value: Any) -> str:
    """One CSV cell; a text a spreadsheet would run as a formula is quoted with a leading '."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def line(values: Iterable[Any]) -> str:
    """One CSV line of safe cells."""
    out = io.StringIO()
    csv.writer(out).writerow([cell(v) for v in values])
    return out.getvalue()
