"""The languages botd can tell apart by their writing systems: ISO 639-1 code -> scripts.

``[embeddings] languages`` is validated against these codes (core.config), and the retriever turns
them into the scripts it checks (core.knowledge.scripts). Kept below both so that the config does
not import the knowledge package (which reads the config).
"""

from __future__ import annotations

ALL = "all"

# Language code -> the scripts its text is written in. Kept to what the character ranges of
# core.knowledge.scripts can tell apart; a code not listed is a config error rather than a silent guess.
_LATIN = ("af ca cs cy da de en eo es et eu fi fr ga gl hr hu id is it lt lv ms mt nb nl nn no pl pt ro sk "
          "sl sq sv sw tl tr vi").split()
LANGUAGES: dict[str, frozenset[str]] = {
    **{code: frozenset({"latin"}) for code in _LATIN},
    **{code: frozenset({"cyrillic"}) for code in "be bg kk mk mn ru sr uk".split()},
    **{code: frozenset({"arabic"}) for code in "ar fa ur".split()},
    **{code: frozenset({"devanagari"}) for code in "hi mr ne".split()},
    "el": frozenset({"greek"}),
    "he": frozenset({"hebrew"}),
    "th": frozenset({"thai"}),
    "zh": frozenset({"han"}),
    "ja": frozenset({"han", "kana"}),
    "ko": frozenset({"hangul"}),
}
