"""One source for every config key: the pydantic models. Their descriptions (English and Chinese)
and defaults generate the configuration reference (docs/reference/configuration*.md, by
scripts/gen_config_reference.py), and the shipped config.toml is checked against them: every key
appears in it, and shows the model's default.

How config.toml shows a key: ``key = value`` or, commented, ``# key = value``, in its table
(``[server]``, ``# [telegram.assistant]``, ...). The value is the key's default, except for a
required key or one whose default is "unset" (an example then), a line whose trailing comment
starts with "e.g." (an example of another value), and the lines of a table whose header line says
"(example)" (a second bot, more routes: only their keys must exist).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gen  # its dataclasses look their module up
_spec.loader.exec_module(gen)

_HEADER = re.compile(r"^(?:#\s*)?\[\[?([A-Za-z0-9_.-]+)\]\]?\s*(.*)$")
_KEY = re.compile(r"^((?:#\s*)*)([a-z_][a-z0-9_]*)\s*=\s*(.+)$")


@dataclass
class Line:
    key: str
    value: Any
    example: bool
    number: int


@dataclass
class Written:
    header: str
    number: int
    example: bool
    lines: list[Line] = field(default_factory=list)


def _value(rest: str, following: list[str]) -> tuple[Any, str] | None:
    """The TOML value at the start of ``rest`` (continued on commented lines when a list spans
    them) and the trailing comment; None when the line is prose, not a key."""
    text = rest
    for extra in ["", *following[:4]]:
        text = f"{text} {extra.lstrip('#').strip()}" if extra else text
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            continue
        # The trailing comment: what follows the value's text on the line.
        comment = ""
        if "#" in rest:
            for i in (m.start() for m in re.finditer("#", rest)):
                try:
                    if tomllib.loads(f"v = {rest[:i]}")["v"] == value:
                        comment = rest[i + 1:].strip()
                        break
                except tomllib.TOMLDecodeError:
                    continue
        return value, comment
    return None


def written_tables(text: str) -> list[Written]:
    """The tables config.toml shows, commented or not, with their key lines."""
    lines = text.splitlines()
    tables: list[Written] = []
    for n, line in enumerate(lines, 1):
        header = _HEADER.match(line)
        if header:
            tables.append(Written(header.group(1), n, "(example)" in header.group(2)))
            continue
        key = _KEY.match(line)
        if key and tables:
            parsed = _value(key.group(3), lines[n:])
            if parsed is None:
                continue
            value, comment = parsed
            tables[-1].lines.append(Line(key.group(2), value, comment.startswith("e.g."), n))
    return tables


def _pattern(header: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(header).replace("NAME", "[^.]+") + "$")


def _table_of(written: Written, kinds: list[Any]) -> Any | None:
    matching = [t for t in kinds if _pattern(t.header).match(written.header)]
    if len(matching) > 1:  # a union tagged by `type` ([tools.NAME]): the table's type picks it
        given = {line.value for line in written.lines if line.key == "type"}
        matching = [t for t in matching if gen.tag(t.model).removeprefix("type = ").strip('"') in given]
    return matching[0] if len(matching) == 1 else None


def _origin(model: type[BaseModel], key: str) -> type:
    """The class that declares ``key`` last: a base's key is shown once for all its subclasses, a
    key a subclass declares again (another default) in that subclass's table."""
    return next(c for c in model.__mro__ if key in vars(c).get("__annotations__", {}))


def _same(written: Any, default: Any) -> bool:
    if isinstance(default, float) and isinstance(written, int) and not isinstance(written, bool):
        return float(written) == default
    return bool(written == default)


def check_config_toml(text: str) -> list[str]:
    """What config.toml gets wrong against the models: a key missing, a default shown wrong, a key
    no model has. [] when it agrees."""
    kinds = list(gen.tables())
    problems: list[str] = []
    present: set[tuple[type, str]] = set()
    for written in written_tables(text):
        kind = _table_of(written, kinds)
        if kind is None:
            problems.append(f"config.toml:{written.number}: [{written.header}] is no table of the config")
            continue
        model = kind.model
        for line in written.lines:
            where = f"config.toml:{line.number}: {written.header}.{line.key}"
            if line.key not in model.model_fields:
                problems.append(f"{where}: no such key")
                continue
            present.add((_origin(model, line.key), line.key))
            held, how = gen._section_model(model.model_fields[line.key].annotation)
            if held is not None:  # a sub-table written inline: lora = [{ path = ... }], users = { a = {...} }
                items = line.value if how == "array" else list(line.value.values()) if how == "named" else [line.value]
                sub = held if isinstance(held, type) else None
                for item in items if sub is not None else []:
                    present.update((_origin(sub, k), k) for k in item if k in sub.model_fields)
                continue
            default = gen.default_of(model.model_fields[line.key])
            if written.example or line.example or default is ... or default is None:
                continue
            if not _same(line.value, default):
                problems.append(f"{where}: shows {gen.toml_value(line.value)}, the model's default is "
                                f"{gen.toml_value(default)} (mark an example with a trailing '# e.g. ...')")
    for kind in kinds:
        for key in gen.keys(kind):
            if (_origin(kind.model, key), key) not in present:
                problems.append(f"config.toml: [{kind.header}] {key} is missing (add `# {key} = ...`)")
    return sorted(set(problems))


def test_the_reference_pages_are_generated_from_the_models_and_up_to_date():
    for lang, page in gen.PAGES.items():
        assert page.is_file(), f"{page} is missing: run python scripts/gen_config_reference.py"
        assert page.read_text(encoding="utf-8") == gen.render(lang), (
            f"{page.relative_to(REPO)} is out of date: run python scripts/gen_config_reference.py")
    assert gen.main(["--check"]) == 0


def test_every_key_and_table_is_described_in_english_and_chinese():
    missing = []
    for kind in gen.tables():
        if not kind.doc[0] or not kind.doc[1]:
            missing.append(f"[{kind.header}]: the table's description (docstring / doc_zh)")
        for key in gen.keys(kind):
            info = kind.model.model_fields[key]
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if not info.description or not extra.get("zh"):
                missing.append(f"[{kind.header}] {key}: Field(description=..., json_schema_extra={{'zh': ...}})")
    assert not missing, missing


def test_config_toml_shows_every_key_with_the_models_default():
    assert check_config_toml((REPO / "config.toml").read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(("edit", "expected"), [
    # A default changed in config.toml (or in the model) without the other.
    (("port = 8080", "port = 8081"), "server.port: shows 8081, the model's default is 8080"),
    (("# poll_timeout_s = 25", "# poll_timeout_s = 30"), "telegram.assistant.poll_timeout_s: shows 30"),
    # A key dropped from config.toml.
    (("max_wait_s = 120\n", ""), "[queue] max_wait_s is missing"),
    # A key config.toml shows that no model has (a typo, a removed key).
    (("max_size = 64", "max_size = 64\nmax_sise = 64"), "queue.max_sise: no such key"),
])
def test_the_check_names_a_wrong_default_a_missing_key_and_an_unknown_one(edit, expected):
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    old, new = edit
    assert old in text
    problems = check_config_toml(text.replace(old, new, 1))
    assert any(expected in p for p in problems), problems
