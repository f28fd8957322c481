"""Splitting a long answer into pieces a platform accepts, at the nicest boundary that fits.

Limits differ in unit: Telegram counts characters (4096), WeCom counts UTF-8 bytes
(2048). A piece never cuts a character; it ends, in order of preference, at a paragraph
break, a line break, a sentence end (Latin or CJK: 。！？；), or a space; only text with
none of those in reach is cut at the limit. Joining the pieces gives back the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_BOUNDARIES = [
    re.compile(r"\n\s*\n"),
    re.compile(r"\n"),
    re.compile(r"[。！？；]|[.!?;:](?=\s)"),
    re.compile(r"[，、,]"),
    re.compile(r"\s"),
]


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _fit(text: str, limit: int, measure: Callable[[str], int]) -> int:
    """Largest n such that measure(text[:n]) <= limit (at least 1 character)."""
    if measure is len:
        return max(1, min(len(text), limit))
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_text(text: str, limit: int, measure: Callable[[str], int] = len) -> list[str]:
    if limit < 1:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    rest = text
    while measure(rest) > limit:
        n = _fit(rest, limit, measure)
        window = rest[:n]
        cut = n
        for pattern in _BOUNDARIES:
            ends = [m.end() for m in pattern.finditer(window)]
            good = [e for e in ends if e >= n // 3]  # not a tiny first piece
            if good:
                cut = good[-1]
                break
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        parts.append(rest)
    return parts
