"""Writes the configuration reference, docs/reference/configuration.md and .zh.md, from the
pydantic models: one table per config.toml section (key, type, default, description), the
descriptions being each field's ``Field(description=..., json_schema_extra={"zh": ...})``.

    python scripts/gen_config_reference.py          # write both pages
    python scripts/gen_config_reference.py --check  # exit 1 when a page is out of date

The models are the one source of every key and default: tests/test_config_reference.py fails
when these pages are stale, when config.toml shows another default than the model, or when a
key is missing from config.toml.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from connectors.config import CONFIG_MODEL  # noqa: E402
from core.secrets import is_secret_type  # noqa: E402

PAGES = {"en": REPO / "docs" / "reference" / "configuration.md",
         "zh": REPO / "docs" / "reference" / "configuration.zh.md"}

TEXT = {
    "en": {
        "title": "Configuration reference",
        "intro": (
            "Every key of `config.toml`, section by section: its type, its default and what it does. "
            "A key left out takes its default; an unknown key is an error (`botd check-config` names it). "
            "Secrets are never written in the file: a *secret reference* names where the value lives "
            '(`"env:NAME"`, `"file:/path"`, `"cred:NAME"`). Relative paths are relative to the folder of '
            "`config.toml`. The annotated `config.toml` shipped with botd shows every key with its default."),
        "generated": (
            "This page is generated from the pydantic models (each key's `Field(description=...)` and "
            "default) by `python scripts/gen_config_reference.py`; do not edit it by hand. "
            "`tests/test_config_reference.py` fails when it is out of date, when `config.toml` shows "
            "another default than the model, or when a key is missing from `config.toml`."),
        "head": "| Key | Type | Default | Description |",
        "required": "required", "unset": "unset", "secret": "secret reference", "one_of": "one of",
        "list": "list of", "table": "table of", "string": "string", "integer": "integer", "number": "number",
        "boolean": "boolean", "path": "path", "or": "or", "tables": "One table per name.",
        "array": "An array of tables: one `[[{name}]]` per entry.",
    },
    "zh": {
        "title": "配置参考",
        "intro": (
            "`config.toml` 的每一个键，按小节列出：类型、默认值和作用。省略的键取默认值；未知的键是错误"
            "（`botd check-config` 会指出）。文件中从不写入秘密：*秘密引用*写明值存放在哪里"
            '（`"env:NAME"`、`"file:/path"`、`"cred:NAME"`）。相对路径相对于 `config.toml` 所在的目录。'
            "botd 自带的带注释的 `config.toml` 列出了每个键及其默认值。"),
        "generated": (
            "本页由 `python scripts/gen_config_reference.py` 根据 pydantic 模型（每个键的 "
            "`Field(description=...)` 与默认值）生成，请勿手工编辑。页面过期、`config.toml` 中的默认值与模型"
            "不一致、或 `config.toml` 缺少某个键时，`tests/test_config_reference.py` 都会失败。"),
        "head": "| 键 | 类型 | 默认值 | 说明 |",
        "required": "必填", "unset": "未设置", "secret": "秘密引用", "one_of": "取值之一",
        "list": "列表，元素为", "table": "表，值为", "string": "字符串", "integer": "整数", "number": "数值",
        "boolean": "布尔值", "path": "路径", "or": "或", "tables": "每个名称一张表。",
        "array": "表数组：每项一个 `[[{name}]]`。",
    },
}


@dataclass(frozen=True)
class Table:
    """One kind of config.toml table: its header (``bots.NAME``), its model and how it is written."""

    header: str
    model: type[BaseModel]
    kind: Literal["one", "named", "array", "optional"]
    doc: tuple[str, str]  # (en, zh) intro


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)) and len(args) == 1:
            return args[0], True
    return tp, False


def _unannotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _section_model(tp: Any) -> tuple[type[BaseModel] | list[type[BaseModel]] | None, str]:
    """The model(s) a field holds as tables, and how: "one", "optional", "named", "array"."""
    tp = _unannotated(tp)
    inner, optional = _strip_optional(tp)
    inner = _unannotated(inner)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner, "optional" if optional else "one"
    origin = get_origin(inner)
    if origin is dict:
        value = _unannotated(get_args(inner)[1])
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, "named"
        if get_origin(value) in (Union, types.UnionType):  # a union tagged by `type` ([tools.NAME])
            members = [m for m in get_args(value) if isinstance(m, type) and issubclass(m, BaseModel)]
            if members:
                return members, "named"
    if origin is list:
        value = _unannotated(get_args(inner)[0])
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, "array"
    return None, ""


def _doc_pair(model: type[BaseModel], field: FieldInfo | None = None) -> tuple[str, str]:
    if field is not None and field.description:
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        return field.description, str(extra.get("zh", ""))
    return " ".join((model.__doc__ or "").split()), str(getattr(model, "doc_zh", ""))


def tables(model: type[BaseModel] = CONFIG_MODEL, prefix: str = "") -> Iterator[Table]:
    """Every table kind of config.toml, in the order of the models' fields."""
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        held, kind = _section_model(field.annotation)
        if held is None:
            continue
        header = f"{prefix}{name}"
        members = held if isinstance(held, list) else [held]
        for member in members:
            sub = f"{header}.NAME" if kind == "named" else header
            doc = _doc_pair(member, field if len(members) == 1 and prefix == "" else None)
            yield Table(sub, member, kind, doc)  # type: ignore[arg-type]
            yield from tables(member, f"{sub}.")


def keys(table: Table) -> list[str]:
    """The table's keys (its sub-tables apart): those its own class declares first, then those of its
    bases (e.g. [model]: the keys every engine reads, then each engine's own)."""
    fields = table.model.model_fields
    declared = [k for cls in table.model.__mro__ for k in vars(cls).get("__annotations__", {})]
    order = list(dict.fromkeys(k for k in declared if k in fields))
    return [k for k in order if not fields[k].exclude and _section_model(fields[k].annotation)[0] is None]


def tag(model: type[BaseModel]) -> str:
    """``type = "http"`` for a member of a union tagged by ``type`` ([tools.NAME]); "" otherwise."""
    field = model.model_fields.get("type")
    values = get_args(field.annotation) if field is not None and get_origin(field.annotation) is Literal else ()
    return f"type = {toml_value(values[0])}" if len(values) == 1 else ""


def default_of(field: FieldInfo) -> Any:
    """The field's default as config.toml would show it; ``...`` when the key is required."""
    if field.is_required():
        return ...
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}" if value else "{}"
    return str(value)


def _type_name(tp: Any, t: dict[str, str]) -> str:
    if is_secret_type(tp):
        return t["secret"]
    tp = _unannotated(tp)
    inner, optional = _strip_optional(tp)
    if optional:
        return _type_name(inner, t)
    if get_origin(tp) is Literal:
        return f"{t['one_of']} " + ", ".join(f"`{toml_value(a)}`" for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return f" {t['or']} ".join(_type_name(a, t) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"{t['list']} {_type_name(get_args(tp)[0], t)}"
    if get_origin(tp) is dict:
        return f"{t['table']} {_type_name(get_args(tp)[1], t)}"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if tp in names:
        return t[names[tp]]
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sign} {v}")
    return f" ({', '.join(parts)})" if parts else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(lang: str) -> str:
    t = TEXT[lang]
    out = [f"# {t['title']}", "", f"<!-- {t['generated']} -->", "", f"> {t['generated']}", "", t["intro"], ""]
    for table in tables():
        bracket = f"[[{table.header}]]" if table.kind == "array" else f"[{table.header}]"
        out += [f"## `{bracket}` `{tag(table.model)}`" if tag(table.model) else f"## `{bracket}`", ""]
        doc = table.doc[0] if lang == "en" else table.doc[1]
        if doc:
            out += [doc, ""]
        if table.kind == "named":
            out += [t["tables"], ""]
        elif table.kind == "array":
            out += [t["array"].format(name=table.header), ""]
        out += [t["head"], "|---|---|---|---|"]
        for name in keys(table):
            field = table.model.model_fields[name]
            default = default_of(field)
            shown = t["required"] if default is ... else t["unset"] if default is None else f"`{toml_value(default)}`"
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            text = field.description or "" if lang == "en" else str(extra.get("zh", ""))
            out.append(f"| `{name}` | {_cell(_type_name(field.annotation, t))}{_bounds(field)} | {_cell(shown)} | "
                       f"{_cell(text)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for lang, page in PAGES.items():
        text = render(lang)
        if args.check:
            if not page.is_file() or page.read_text(encoding="utf-8") != text:
                stale.append(str(page.relative_to(REPO)))
        else:
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/gen_config_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
