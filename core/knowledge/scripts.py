"""Which writing systems a text is written in, and which ones an embedding model can judge.

An embedding model trained on one language gives meaningless similarities for text in a
script it never saw: the default all-MiniLM-L6-v2 (English) rates any two Chinese texts
0.4–0.85 alike, related or not. The retriever therefore asks, per question, whether the
model can read it (:func:`readable_share`); when it cannot, cosine similarity neither makes
a chunk relevant nor ranks it, and retrieval rests on the lexical side (words, CJK bigrams).

``[embeddings] languages`` names what a model reads as ISO 639-1 codes (``"en"``,
``"zh"``, …) or ``"all"``; :func:`scripts_for` turns them into the scripts checked here.
The codes themselves, :data:`LANGUAGES`, live in :mod:`core.languages`: the config validates against them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from core.languages import ALL, LANGUAGES

EVERY_SCRIPT = frozenset().union(*LANGUAGES.values())

# Scripts without spaces between words count one unit per character (a Chinese word is one to
# three characters); the others one unit per word, so "How do I apply for 年假" is mostly English
# and "VPN怎么连接" mostly Chinese.
_PER_CHARACTER = frozenset({"han", "kana", "thai"})
_RANGES: tuple[tuple[str, str], ...] = (
    ("latin", "a-zA-Z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"),
    ("greek", "\u0370-\u03ff"),
    ("cyrillic", "\u0400-\u04ff"),
    ("hebrew", "\u0590-\u05ff"),
    ("arabic", "\u0600-\u06ff"),
    ("devanagari", "\u0900-\u097f"),
    ("thai", "\u0e00-\u0e7f"),
    ("hangul", "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"),
    ("kana", "\u3040-\u30ff"),
    ("han", "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"),
)
_RUN = re.compile("|".join(f"(?P<{name}>[{chars}]+)" for name, chars in _RANGES))


def scripts_for(languages: Iterable[str]) -> frozenset[str]:
    """The scripts of ``languages`` (codes from :data:`LANGUAGES`, or ``"all"``)."""
    out: set[str] = set()
    for code in languages:
        if code == ALL:
            return EVERY_SCRIPT
        out |= LANGUAGES[code]
    return frozenset(out)


def script_units(text: str) -> dict[str, int]:
    """How much of ``text`` each script holds: words, or characters for scripts without spaces."""
    units: dict[str, int] = {}
    for m in _RUN.finditer(text):
        script = m.lastgroup or ""
        units[script] = units.get(script, 0) + (len(m.group(0)) if script in _PER_CHARACTER else 1)
    return units


def readable_share(text: str, scripts: frozenset[str]) -> float:
    """The share of ``text`` written in ``scripts`` (1.0 for text with no letters at all)."""
    units = script_units(text)
    total = sum(units.values())
    return sum(n for s, n in units.items() if s in scripts) / total if total else 1.0
