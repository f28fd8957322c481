"""Cutting sections into chunks that respect headings and sentences, Chinese included.

A section is split into sentences — after 。！？；!?; (and . followed by a space), and at
line breaks, never at spaces inside Chinese text — and the sentences are packed into
chunks of at most ``max_chars``. The last sentence of a chunk is repeated at the start
of the next when it is short, so a fact on a boundary is found from either side. A
chunk never spans two sections: each carries its heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.knowledge.documents import Section

# Split after sentence-ending punctuation (CJK: no space follows) or at line breaks.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])|(?<=[.](?=\s))|\n+")


@dataclass(frozen=True, slots=True)
class Chunk:
    heading: str
    text: str
    position: int  # order within its file

    def embed_text(self) -> str:
        """What is embedded and searched: the heading gives a chunk its topic."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _hard_split(sentence: str, max_chars: int) -> list[str]:
    return [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]


def chunk_sections(sections: list[Section], max_chars: int = 800) -> list[Chunk]:
    chunks: list[Chunk] = []
    for section in sections:
        sentences: list[str] = []
        for s in split_sentences(section.text):
            sentences.extend(_hard_split(s, max_chars) if len(s) > max_chars else [s])
        current: list[str] = []
        size = 0
        for s in sentences:
            if current and size + len(s) + 1 > max_chars:
                chunks.append(Chunk(section.heading, _join(current), len(chunks)))
                tail = current[-1]
                current, size = ([tail], len(tail)) if len(tail) < max_chars // 4 else ([], 0)
            current.append(s)
            size += len(s) + 1
        if current:
            chunks.append(Chunk(section.heading, _join(current), len(chunks)))
    return chunks


def _join(sentences: list[str]) -> str:
    out = ""
    for s in sentences:
        # No space between CJK sentences; one space between Latin ones.
        if out and not (_is_cjk(out[-1]) or _is_cjk(s[0])):
            out += " "
        out += s
    return out


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"
