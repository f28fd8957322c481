"""Bounds on the JSON schemas botd turns into grammars, checked before anything is built.

A tool's ``parameters`` schema — sent by an API client in ``tools``, or offered by an MCP
server — becomes GBNF through llama.cpp's own converter (core/toolcalls.py), and that GBNF is
parsed by llama.cpp's C++ grammar parser. Neither was written for hostile input: the converter
writes ``maxLength: N`` as N nested groups (and builds the text in memory, N² for some shapes),
the parser recurses once per group with no limit (a stack overflow: the whole daemon dies), and
a grammar the parser refuses gives no sampler at all, which also crashes the process at the
first token. So a schema is walked here first, without recursion, against the named limits
below; each violation is a :class:`SchemaLimitError` naming its limit (the HTTP API answers
400 with it). The grammar built from a schema that passed is checked again by its own size and
group nesting (:func:`check_grammar`) before llama.cpp ever parses it.

The limits are far above what a real tool needs (OpenAI's own function-calling docs show
schemas of a few properties) and below what the parser can take: llama.cpp itself refuses a
repetition that expands to over 2000 rules, which a ``maxLength`` near 1000 already reaches.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

from core.errors import BotdError

# A string's minLength / maxLength, and a regex quantifier's {m,n} (each count is a nested group).
MAX_STRING_LENGTH = 1000
# An array's minItems / maxItems, and the entries of a tuple (prefixItems).
MAX_ITEMS = 1000
# How deep schemas may nest (properties, items, anyOf..., counted from the parameters object).
MAX_SCHEMA_DEPTH = 16
# Entries of one enum.
MAX_ENUM = 256
# Alternatives of one anyOf / oneOf / allOf, or types in one "type" list.
MAX_ALTERNATIVES = 32
# Properties of one object.
MAX_PROPERTIES = 64
# Characters of one "pattern" regex.
MAX_PATTERN_CHARS = 256
# $ref uses in one tool's schema (each may only name a local "#/$defs/..." or "#/definitions/...").
MAX_REFS = 64
# Schema nodes (objects) in all the tools of one request, and one tool's schema as JSON text.
MAX_SCHEMA_NODES = 2000
MAX_SCHEMA_CHARS = 65_536
# The grammar's estimated size in elements (repetitions, enum entries, nodes), for all tools.
MAX_GRAMMAR_UNITS = 20_000
# The grammar as built: its characters, and how deeply its groups nest (the parser recurses per group).
MAX_GRAMMAR_CHARS = 262_144
MAX_GRAMMAR_NESTING = 1100

_CHILD_MAPS = ("properties", "$defs", "definitions")
_CHILD_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_REF = re.compile(r"^#/(?:\$defs|definitions)/[^/]{1,128}$")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaLimitError(BotdError, ValueError):
    """A schema (or the grammar built from it) is over one of this module's limits.

    ``limit`` is the limit's name in lower case (``max_string_length``), ``where`` the path of
    the offending keyword in the request (``tools[0].function.parameters.properties.x.maxLength``).
    """

    def __init__(self, limit: str, where: str, detail: str) -> None:
        self.limit, self.where = limit, where
        super().__init__(f"{where}: {detail} (limit {limit})")


def _count(value: Any, limit: int, name: str, where: str) -> int:
    """A non-negative whole number no larger than ``limit``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaLimitError(name, where, f"must be a whole number from 0 to {limit}, not {value!r}")
    if value > limit:
        raise SchemaLimitError(name, where, f"{value} is over the limit of {limit}")
    return value


def _pattern_cost(pattern: Any, where: str) -> int:
    """Check a "pattern" regex: its length, group depth and quantifier counts; return its cost."""
    if not isinstance(pattern, str):
        raise SchemaLimitError("max_pattern_chars", where, "must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaLimitError("max_pattern_chars", where, f"{len(pattern)} characters is over the limit of "
                               f"{MAX_PATTERN_CHARS}")
    depth = deepest = 0
    escaped = in_class = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_SCHEMA_DEPTH:
        raise SchemaLimitError("max_schema_depth", where, f"groups nested {deepest} deep, over the limit of "
                               f"{MAX_SCHEMA_DEPTH}")
    cost = len(pattern)
    for m in _QUANTIFIER.finditer(pattern):
        for n in m.groups():
            if n:
                cost += _count(int(n), MAX_STRING_LENGTH, "max_string_length", f"{where} {m.group(0)}")
    return cost


def _node(schema: dict[str, Any], where: str, refs: list[int]) -> int:
    """Check one schema object's own keywords; return its estimated grammar units."""
    units = 1
    lengths = [_count(schema[k], MAX_STRING_LENGTH, "max_string_length", f"{where}.{k}")
               for k in ("minLength", "maxLength") if k in schema]
    items = [_count(schema[k], MAX_ITEMS, "max_items", f"{where}.{k}") for k in ("minItems", "maxItems") if k in schema]
    units += max(lengths, default=0) + max(items, default=0)
    if "enum" in schema:
        enum = schema["enum"]
        if not isinstance(enum, list):
            raise SchemaLimitError("max_enum", f"{where}.enum", "must be a list")
        units += _count(len(enum), MAX_ENUM, "max_enum", f"{where}.enum (entries)")
    kinds = schema.get("type")
    if isinstance(kinds, list):
        units += _count(len(kinds), MAX_ALTERNATIVES, "max_alternatives", f"{where}.type (entries)")
    for key in _CHILD_LISTS:
        if key in schema:
            if not isinstance(schema[key], list):
                raise SchemaLimitError("max_alternatives", f"{where}.{key}", "must be a list")
            limit, name = (MAX_ITEMS, "max_items") if key == "prefixItems" else (MAX_ALTERNATIVES, "max_alternatives")
            units += _count(len(schema[key]), limit, name, f"{where}.{key} (entries)")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise SchemaLimitError("max_properties", f"{where}.properties", "must be an object")
        # Each optional property adds a rule and an alternative (about 250 characters of grammar).
        units += 16 * _count(len(props), MAX_PROPERTIES, "max_properties", f"{where}.properties (entries)")
    if "pattern" in schema:
        units += _pattern_cost(schema["pattern"], f"{where}.pattern")
    if "$ref" in schema:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not _REF.match(ref):
            raise SchemaLimitError("max_refs", f"{where}.$ref", 'may only name "#/$defs/NAME" or "#/definitions/NAME"')
        refs[0] += 1
        if refs[0] > MAX_REFS:
            raise SchemaLimitError("max_refs", f"{where}.$ref", f"over the limit of {MAX_REFS} references")
    return units


def check_schema(schema: Any, where: str = "parameters") -> tuple[int, int]:
    """Walk one tool's parameters schema (no recursion) against the limits; return (nodes, units).

    Raises :class:`SchemaLimitError`. Keywords are checked wherever a schema may stand; others
    (``description``, ``examples``, ``const`` values...) are data and only count as text.
    """
    try:
        text = json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise SchemaLimitError("max_schema_depth", where, "is not a JSON schema") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise SchemaLimitError("max_schema_chars", where, f"{len(text)} characters of JSON is over the limit of "
                               f"{MAX_SCHEMA_CHARS}")
    nodes = units = 0
    refs = [0]
    stack: list[tuple[Any, str, int]] = [(schema, where, 1)]
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, dict):
            continue  # true/false schemas, or junk the converter refuses by itself
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaLimitError("max_schema_depth", path, f"nested {depth} deep, over the limit of "
                                   f"{MAX_SCHEMA_DEPTH}")
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise SchemaLimitError("max_schema_nodes", where, f"over the limit of {MAX_SCHEMA_NODES} schemas")
        units += _node(node, path, refs)
        for key in _CHILD_MAPS:
            children = node.get(key)
            if isinstance(children, dict):
                stack.extend((v, f"{path}.{key}.{k}", depth + 1) for k, v in children.items())
        for key in _CHILD_LISTS:
            children = node.get(key)
            if isinstance(children, list):
                stack.extend((v, f"{path}.{key}[{i}]", depth + 1) for i, v in enumerate(children))
        for key in ("items", "additionalProperties", "not", "contains", "propertyNames"):
            child = node.get(key)
            if isinstance(child, dict):
                stack.append((child, f"{path}.{key}", depth + 1))
            elif key == "items" and isinstance(child, list):
                _count(len(child), MAX_ITEMS, "max_items", f"{path}.items (entries)")
                stack.extend((v, f"{path}.items[{i}]", depth + 1) for i, v in enumerate(child))
    return nodes, units


def check_tools(tools: Sequence[dict[str, Any]], where: str = "tools") -> None:
    """Check every tool's parameters (OpenAI ``tools`` entries) and their sum against the limits."""
    nodes = units = 0
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        params = fn.get("parameters") if isinstance(fn, dict) else None
        n, u = check_schema(params if params is not None else {}, f"{where}[{i}].function.parameters")
        nodes, units = nodes + n, units + u
        if nodes > MAX_SCHEMA_NODES:
            raise SchemaLimitError("max_schema_nodes", where, f"over the limit of {MAX_SCHEMA_NODES} schemas in all")
        if units > MAX_GRAMMAR_UNITS:
            raise SchemaLimitError("max_grammar_units", where, f"the grammar for these schemas would exceed "
                                   f"{MAX_GRAMMAR_UNITS} elements (string lengths, item counts, enum entries)")


# What llama.cpp's parser reads as one piece, with no group in it: a "literal" or a [class]
# (each with its backslash escapes), or a comment to the end of the line.
_GBNF_OPAQUE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\r\n]*', re.S)
_NOT_PAREN = re.compile(r"[^()]+")
_STEP = {"(": 1, ")": -1}


def grammar_nesting(gbnf: str) -> int:
    """How deeply the groups of a GBNF text nest, read as llama.cpp's parser reads it: parentheses
    inside "literals", [classes] and comments do not count. (The parser stops at the first
    unbalanced ")", so what follows one is never parsed at a greater depth than counted here.)"""
    parens = _NOT_PAREN.sub("", _GBNF_OPAQUE.sub("", gbnf))
    return max(itertools.accumulate(map(_STEP.__getitem__, parens)), default=0)


def check_grammar(gbnf: str, where: str = "tools") -> None:
    """The grammar built from checked schemas, checked once more before any parser sees it."""
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise SchemaLimitError("max_grammar_chars", where, f"the grammar would be {len(gbnf)} characters, over the "
                               f"limit of {MAX_GRAMMAR_CHARS}")
    nesting = grammar_nesting(gbnf)
    if nesting > MAX_GRAMMAR_NESTING:
        raise SchemaLimitError("max_grammar_nesting", where, f"the grammar would nest {nesting} groups deep, over "
                               f"the limit of {MAX_GRAMMAR_NESTING}")
