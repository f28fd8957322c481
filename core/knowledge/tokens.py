"""Lexical tokens for BM25: lower-cased words for alphabetic text, character bigrams for CJK.

Chinese has no spaces, so words are not available without a segmenter; overlapping
character bigrams match Chinese queries well and need no dictionary. This is what
lets a Chinese question find a Chinese chunk even with an English embedding model.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[0-9a-z]+(?:['’][a-z]+)?|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")

# Common English words that say nothing about a topic; kept short on purpose.
STOPWORDS = frozenset("""
a an and are as at be but by can could do does for from has have how i if in into is it its me my
no not of on or our please should so tell than that the their them then there these they this to
us was we what when where which who why will with would you your about any all
""".split())


# Function and question characters: a bigram holding one ("我每", "有几", "多少") says nothing
# about a topic and only dilutes the match. Kept short: 会/能/个/有/在 start real words too.
CJK_STOP_CHARS = frozenset("的了是我你您他她它们吗呢吧啊么什怎哪几多少请问这那就都也还把被")


def lexical_tokens(text: str) -> list[str]:
    out: list[str] = []
    for m in _TOKEN.finditer(text.lower()):
        tok = m.group(0)
        if tok[0] >= "\u3400":
            if len(tok) == 1:
                if tok not in CJK_STOP_CHARS:
                    out.append(tok)
            else:
                out.extend(bg for i in range(len(tok) - 1)
                           if not ((bg := tok[i : i + 2])[0] in CJK_STOP_CHARS or bg[1] in CJK_STOP_CHARS))
        elif tok not in STOPWORDS:
            out.append(tok)
    return out
