"""Markdown as chat models write it, rendered for a platform's own markup.

Platforms accept narrow, incompatible markups (Telegram's HTML subset, Slack's mrkdwn),
and general Markdown libraries emit full HTML (``<p>``, ``<h1>``, ``<ul>``) that those
platforms reject, so the walk over fences, lines and inline marks lives here once and
each connector says how to write each element in a :class:`Markup`.

Model output (and a tool's output shown by ``/tool``) is untrusted: a link's URL and label
must never close the platform's link syntax (``[d](https://x.io><!channel>)`` would ping a
whole Slack channel). :func:`safe_url` percent-encodes every character that could, before
any platform writes a link; each platform escapes the label.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n?(.*?)(?:```|\Z)", re.S)
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")
# An emphasis spans at most _SPAN characters: each unclosed opener scanned the rest of the line,
# so model output of many unclosed '**' / '__' took quadratic time (16k characters: 0.6 s a
# pattern). An italic's content holds no '*' (or '_'): its scan ends at the next one.
_SPAN = 400
_BOLD = re.compile(rf"\*\*(?=\S)(.{{1,{_SPAN}}}?)(?<=\S)\*\*|__(?=\S)(.{{1,{_SPAN}}}?)(?<=\S)__")
_ITALIC = re.compile(
    r"(?<![\w*])\*(?=[^\s*])([^*]+?)(?<=[^\s*])\*(?![\w*])|(?<![\w_])_(?=[^\s_])([^_]+?)(?<=[^\s_])_(?![\w_])"
)
_STRIKE = re.compile(rf"~~(?=\S)(.{{1,{_SPAN}}}?)(?<=\S)~~")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+")
_SLOT = re.compile(r"\x00(\d+)\x00")
# Characters that delimit some platform's link or mention syntax ('<url|label>' on Slack,
# '<!channel>', '<@user>', an HTML attribute's quotes) and that a URL never needs raw:
# percent-encoded. Non-ASCII is kept (IRIs read better, and a part grows by a few bytes at most).
_URL_UNSAFE = re.compile(r"[<>|\"'`{}\\^\s\x00-\x1f\x7f]")


def safe_url(url: str) -> str:
    """``url`` with every character that could end a platform's link syntax percent-encoded."""
    return _URL_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), url)


def neutral_links(md: str) -> str:
    """Markdown sent to a platform as Markdown (WeCom): each ``[label](url)`` link with its URL
    made safe and ``<``, ``>``, ``|`` and brackets taken out of its label."""

    def fix(m: re.Match[str]) -> str:
        label = re.sub(r"[<>|\[\]]", " ", m.group(1)).strip() or "link"
        return f"[{label}]({safe_url(m.group(2))})"

    return _LINK.sub(fix, md)


class Markup(ABC):
    """How one platform writes each Markdown element. Text reaching it is already escaped."""

    bold = ("", "")
    italic = ("", "")
    strike = ("", "")

    @abstractmethod
    def escape(self, text: str) -> str: ...

    @abstractmethod
    def code_block(self, lang: str, code: str) -> str:
        """``code`` is raw: escape it as the platform needs."""

    @abstractmethod
    def code_span(self, code: str) -> str:
        """``code`` is raw: escape it as the platform needs."""

    @abstractmethod
    def link(self, label: str, url: str) -> str:
        """``label`` is escaped; ``url`` went through :func:`safe_url` (no '<', '>', '|', quotes
        or spaces left in it); escape it further as the platform needs."""

    @abstractmethod
    def heading(self, text: str) -> str:
        """``text`` is the heading's rendered inline content."""

    def render(self, md: str) -> str:
        out: list[str] = []
        pos = 0
        for m in _FENCE.finditer(md):
            out.append(self._lines(md[pos : m.start()]))
            out.append(self.code_block(m.group(1), m.group(2).rstrip("\n")))
            pos = m.end()
        out.append(self._lines(md[pos:]))
        return "".join(out)

    def _lines(self, text: str) -> str:
        lines = []
        for line in text.split("\n"):
            h = _HEADING.match(line)
            if h:
                lines.append(self.heading(self._inline(h.group(1))))
                continue
            b = _BULLET.match(line)
            if b:
                line = f"{b.group(1)}• {line[b.end():]}"
            lines.append(self._inline(line))
        return "\n".join(lines)

    def _inline(self, text: str) -> str:
        # Finished markup is parked in numbered slots so later patterns cannot touch it.
        slots: list[str] = []

        def keep(fragment: str) -> str:
            slots.append(fragment)
            return f"\x00{len(slots) - 1}\x00"

        def wrap(pair: tuple[str, str], inner: str) -> str:
            return keep(pair[0]) + inner + keep(pair[1])

        text = _CODE.sub(lambda m: keep(self.code_span(m.group(1))), text)
        text = _LINK.sub(lambda m: keep(self.link(self.escape(m.group(1)), safe_url(m.group(2)))), text)
        text = self.escape(text)
        text = _BOLD.sub(lambda m: wrap(self.bold, m.group(1) or m.group(2)), text)
        text = _STRIKE.sub(lambda m: wrap(self.strike, m.group(1)), text)
        text = _ITALIC.sub(lambda m: wrap(self.italic, m.group(1) or m.group(2)), text)
        while "\x00" in text:
            text = _SLOT.sub(lambda m: slots[int(m.group(1))], text)
        return text
