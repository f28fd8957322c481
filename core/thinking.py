"""Removes reasoning models' ``<think>…</think>`` blocks from a token stream.

Tags can arrive split across tokens ("<th", "ink>"), so the filter holds back any
tail that could still become a tag. Text inside a block is dropped; an unclosed
block at the end is dropped as well (the model was cut off while thinking).
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkFilter:
    """Feed it deltas, get back the visible part of each; call :meth:`flush` at the end."""

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False
        self._started = False  # leading whitespace after a removed block is dropped too
        self._removed = False  # a block was removed before any visible text
        # Leading whitespace of the model's own, dropped from what is shown (no block before it):
        # the history keeps it, so that the thread's next prompt still starts with the tokens
        # the model produced and its KV state is reused (see Job.history_text).
        self.dropped_lead = ""

    def feed(self, delta: str) -> str:
        self._buf += delta
        out: list[str] = []
        while self._buf:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    keep = _partial_suffix(self._buf, CLOSE)
                    self._buf = self._buf[len(self._buf) - keep :] if keep else ""
                    break
                self._buf = self._buf[end + len(CLOSE) :]
                self._inside = False
                if not self._started:
                    self._buf = self._buf.lstrip()
                    self._removed = True
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                out.append(self._buf[:start])
                self._buf = self._buf[start + len(OPEN) :]
                self._inside = True
                continue
            keep = _partial_suffix(self._buf, OPEN)
            emit = self._buf[: len(self._buf) - keep]
            out.append(emit)
            self._buf = self._buf[len(self._buf) - keep :] if keep else ""
            break
        text = "".join(out)
        if text and not self._started:
            shown = text.lstrip()
            if not self._removed:
                self.dropped_lead += text[: len(text) - len(shown)]
            text = shown
            self._started = bool(text)
        return text

    def flush(self) -> str:
        rest = "" if self._inside else self._buf
        self._buf = ""
        return rest
