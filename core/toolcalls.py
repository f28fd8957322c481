"""Tool calls in the model's own words: how tool definitions reach a prompt, how a call is
constrained while it is being written, and how it is read back out of the model's text.

One format for every model: the Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`` that Qwen2.5/Qwen3 and Hermes fine-tunes were trained on (Llama 3.x's bare JSON
object ``{"name": ..., "parameters": ...}`` is read too). A template that knows tools (its
source mentions them) renders the definitions itself; for one that does not, the definitions
go into the system message as text and earlier calls/results become plain turns, the way
Qwen's own template writes them. The grammar that keeps a call's arguments inside the tool's
JSON schema is built with llama-cpp-python's JSON-schema converter (llama.cpp's own), not here;
what reaches it is bounded first (core/schema_limits.py), and what it gives is parsed by
llama.cpp's grammar parser here, where a refusal is an error, not a crash at the first token.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core import schema_limits

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The lazy grammar wakes at the first "<tool_call>" and constrains everything from there on.
TRIGGER = r"[\s\S]*?(<tool_call>[\s\S]*)"
# Grammars of recent tool sets, by their JSON: the HTTP API checks a client's tools by building
# their grammar, and the answer pipeline then needs the same one.
_CACHED_GRAMMARS = 8


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """This call as OpenAI's ``tool_calls`` item (arguments as a JSON string, as OpenAI sends them)."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name,
                                            "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        if index is not None:
            out["index"] = index
        return out


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def system_block(tools: Sequence[dict[str, Any]]) -> str:
    """The tool instructions Qwen2.5's template writes, for templates that write none."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def call_text(calls: Sequence[dict[str, Any]]) -> str:
    """An assistant turn's OpenAI ``tool_calls`` written back in the model's format."""
    parts = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = _loads(args)
            except ValueError:
                pass
        parts.append(f"{OPEN}\n{json.dumps({'name': fn.get('name', ''), 'arguments': args}, ensure_ascii=False)}"
                     f"\n{CLOSE}")
    return "\n".join(parts)


def plain_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
                   ) -> list[dict[str, str]]:
    """Messages for a template that knows nothing of tools: definitions in the system message,
    calls in the assistant's text, results as user turns wrapped in ``<tool_response>``."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m.get("role", "user"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = (content + "\n" if content else "") + call_text(m["tool_calls"])
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if out and role == "user" and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>") \
                and content.startswith("<tool_response>"):
            out[-1]["content"] += "\n" + content  # several results of one round: one turn, as Qwen does
            continue
        out.append({"role": role, "content": content})
    if tools:
        block = system_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + block).strip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def grammar(tools: Sequence[dict[str, Any]], only: str | None = None) -> str:
    """GBNF for exactly one ``<tool_call>`` of one of ``tools`` (of ``only`` when named), its
    arguments held to that tool's JSON schema.

    Raises :class:`~core.schema_limits.SchemaLimitError` for a schema over a limit (checked
    before anything is built) and ValueError for one the converter or llama.cpp's grammar
    parser cannot follow. CPU work that grows with the schemas: call it off the event loop
    (:func:`build_grammar`).
    """
    chosen = [t for t in tools if only is None or t["function"]["name"] == only]
    if not chosen:
        raise ValueError(f"no tool named {only!r}")
    return _grammar(json.dumps(chosen, ensure_ascii=False))


async def build_grammar(tools: Sequence[dict[str, Any]], only: str | None = None) -> str:
    """:func:`grammar` on an executor thread."""
    return await asyncio.get_running_loop().run_in_executor(None, grammar, tools, only)


@functools.lru_cache(maxsize=_CACHED_GRAMMARS)
def _grammar(chosen_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    chosen = json.loads(chosen_json)
    schema_limits.check_tools(chosen)
    variants = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]},
                       "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
    } for t in chosen]
    schema = variants[0] if len(variants) == 1 else {"oneOf": variants}
    try:
        body = json_schema_to_gbnf(json.dumps(schema), prop_order=["name", "arguments"])
    except Exception as exc:  # the converter's own refusals: assertions, KeyErrors, unsupported keywords
        raise ValueError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    # The converter names its top rule "root"; ours wraps it in the tags.
    body = re.sub(r"^root ::=", "call-json ::=", body, flags=re.M)
    # JSON strings hold no raw control characters (RFC 8259); the converter here allows them,
    # and a small model then runs on inside a string past its closing quote, newline after newline.
    body = body.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')
    gbnf = f'root ::= "{OPEN}\\n" call-json "\\n{CLOSE}"\n{body}'
    check_gbnf(gbnf)
    return gbnf


def check_gbnf(gbnf: str) -> None:
    """Parse ``gbnf`` with llama.cpp's own grammar parser (no model needed), after bounding its
    size and nesting (the parser recurses per group). Raises SchemaLimitError or ValueError.

    A grammar llama.cpp refuses gives no sampler, and a sampler chain given none crashes the
    process at the first token: whatever becomes a request's grammar passes this first.
    """
    import llama_cpp

    schema_limits.check_grammar(gbnf)
    sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise ValueError("llama.cpp cannot parse the grammar for these schemas (a left-recursive $ref, a regex "
                         "escape it does not know, or a repetition over its own limit)")
    llama_cpp.llama_sampler_free(sampler)


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(the text outside any call, the calls) from a model's answer. A block that is not a JSON
    object with a string ``name`` is left in the text: it was prose, not a call. Linear in the
    text's length (the model's text is as long as a client lets it be)."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    while (start := text.find(OPEN, pos)) != -1:
        inner = start + len(OPEN)
        close = text.find(CLOSE, inner)
        end = len(text) if close == -1 else close + len(CLOSE)
        call = _call(text[inner: len(text) if close == -1 else close].strip())
        kept.append(text[pos:start] if call is not None else text[pos:end])
        if call is not None:
            calls.append(call)
        pos = end
    rest = "".join(kept) + text[pos:]
    if not calls:
        stripped = text.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            call = _call(stripped)  # Llama 3.x writes a bare JSON object
            if call is not None:
                return "", [call]
    return rest.strip(), calls


def _loads(raw: str) -> Any:
    """JSON, or ValueError: nesting deep enough to exhaust the recursion limit included."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _call(raw: str) -> ToolCall | None:
    try:
        obj = _loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = _loads(args)
        except ValueError:
            args = {"input": args}
    if not isinstance(args, dict):
        args = {"input": args}
    return ToolCall(obj["name"], args)
