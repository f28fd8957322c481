"""Text in a message that a model would read as its chat template's own markers, found and made inert.

Only a chat template may write ``<|im_start|>system``: in a user's words, a document or a tool's
result the same characters must stay characters. The llama.cpp engine gets that by tokenizing
every content as plain text (core/engines/llamacpp.py, with :func:`control_pattern` over the
vocabulary's control tokens to see when it must). A remote engine cannot: llama-server and vLLM
render the template and tokenize the whole prompt themselves, special tokens parsed anywhere.
So for them the text itself changes: :func:`defuse` puts a zero-width space after the first
character of each marker, which no tokenizer matches as the special token and a reader does
not see. The markers are the model's own control tokens when its vocabulary is known, and the
families chat models use otherwise (:data:`KNOWN`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# Markers of the chat templates in use: ChatML / Qwen / Llama 3 / Phi / GLM / gpt-oss (<|...|>),
# DeepSeek (full-width bars), Llama 2 and Mistral ([INST], <s>, [SYSTEM_PROMPT], [TOOL_CALLS]...),
# Gemma (<start_of_turn>), ChatGLM ([gMASK], <sop>), Baichuan (<reserved_N>).
KNOWN_TEXT = (
    r"<\|[^|<>\s]{1,64}\|>"
    r"|<｜[^｜<>\n]{1,64}｜>"
    r"|</?s>"
    r"|\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_RESULTS|TOOL_CALLS|TOOL_CONTENT|THINK)\]"
    r"|<(?:start_of_turn|end_of_turn|bos|eos|pad|unk|mask|sop|eop)>"
    r"|\[gMASK\]|<reserved_\d{1,6}>"
)
KNOWN = re.compile(KNOWN_TEXT)
_ZWSP = "\u200b"


def control_pattern(texts: Iterable[str], *, known: bool = False) -> re.Pattern[str] | None:
    """One regex for these token texts (longest first, so that a longer marker wins), and the
    :data:`KNOWN` families too when ``known``; None when there is nothing to find."""
    ordered = sorted({t for t in texts if t}, key=len, reverse=True)
    parts = [*map(re.escape, ordered), *([KNOWN_TEXT] if known else [])]
    return re.compile("|".join(parts)) if parts else None


def defuse(text: str, pattern: re.Pattern[str] | None = KNOWN) -> str:
    """``text`` with every marker broken by a zero-width space after its first character."""
    if pattern is None or not text:
        return text
    return pattern.sub(lambda m: m.group()[0] + _ZWSP + m.group()[1:], text)


def defuse_messages(messages: Sequence[dict[str, Any]], pattern: re.Pattern[str] | None = KNOWN
                    ) -> list[dict[str, Any]]:
    """Chat messages with every text in them defused: contents (strings or text parts) and the
    arguments of earlier tool calls. The messages given are not changed."""
    out = []
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = defuse(content, pattern)
        elif isinstance(content, list):
            m["content"] = [{**p, "text": defuse(p["text"], pattern)} if isinstance(p, dict)
                            and isinstance(p.get("text"), str) else p for p in content]
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_defused_call(c, pattern) for c in m["tool_calls"]]
        out.append(m)
    return out


def _defused_call(call: Any, pattern: re.Pattern[str] | None) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        fn["arguments"] = defuse(fn["arguments"], pattern)
    return {**call, "function": fn}
