"""The calculator tool: arithmetic, percentages, unit conversions and dates.

The expression is parsed with :mod:`ast` and walked over an allow-list of nodes; nothing is
ever passed to ``eval``. Every input is bounded before work is done: its length, the number
of nodes, the nesting depth, the size of integers and exponents (checked from the operands'
sizes before computing), and a wall-clock deadline checked at every node. Anything else is a
:class:`CalcError` with a short reason.

Bounded by construction, not by a timer: a thread cannot be interrupted, and a process per
call (or a standing pool) costs more than the work on a small box. So every step is linear or
capped: the text rewriting uses regexes that cannot backtrack (a number starts only where a
digit run starts; the unit conversion is read from the right in one pass), at most
``MAX_NODES`` operations each on integers of at most ``MAX_INT_BITS`` (checked before
computing), so the worst 500 characters cost milliseconds. :func:`calculate_async` runs it on
a small thread pool of its own, off the event loop, at most ``POOL_THREADS`` at a time.

Accepted besides plain arithmetic (``+ - * / // % **``, ``^`` for power, parentheses):

- percentages: ``17% of 2340``, ``2340 * 17%``, ``200 + 15%`` (= 230), ``2340的17%``;
- units: ``3 km in m``, ``5 GB to MB`` (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024),
  ``100 F in C``;
- dates: ``2026-12-25 - 2026-11-30`` (days between), ``today + 30 days``, ``2026-03-01 - 2 weeks``.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import datetime as dt
import math
import operator
import re
import time
import unicodedata
from collections.abc import Callable
from typing import Any

MAX_CHARS = 500
MAX_NODES = 300
MAX_DEPTH = 40
MAX_INT_BITS = 4096  # about 1,233 decimal digits
MAX_SECONDS = 0.5
POOL_THREADS = 2


class CalcError(ValueError):
    """The expression cannot be computed (division by zero, a date that does not exist...)."""


class CalcRefused(CalcError):
    """The expression was refused: outside the allow-list or over a bound (size, depth, time)."""


Number = int | float

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _bounded_int(n: int) -> int:
    if n.bit_length() > MAX_INT_BITS:
        raise CalcRefused(f"result too large (over {MAX_INT_BITS} bits)")
    return n


def _num(x: Any) -> Number:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise CalcError("this function takes numbers")
    return x


def _round(x: Any, n: Any = 0) -> Number:
    n = _num(n)
    if not isinstance(n, int) or not -20 <= n <= 20:
        raise CalcRefused("round(x, n): n must be a whole number from -20 to 20")
    return round(_num(x), n) if n else round(_num(x))


def _factorial(x: Any) -> int:
    x = _num(x)
    if isinstance(x, float):
        if not x.is_integer():
            raise CalcError("factorial takes a whole number")
        x = int(x)
    if not 0 <= x <= 400:
        raise CalcRefused("factorial: n must be from 0 to 400")
    return math.factorial(x)


def _log(x: Any, base: Any = None) -> float:
    return math.log(_num(x)) if base is None else math.log(_num(x), _num(base))


def _many(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if not args or len(args) > 100:
            raise CalcRefused("give 1 to 100 numbers")
        return fn(*(_num(a) for a in args))
    return call


def _one(fn: Callable[[float], Any]) -> Callable[..., Any]:
    def call(x: Any) -> Any:
        return fn(_num(x))
    return call


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": _one(math.sqrt), "cbrt": _one(lambda x: math.copysign(abs(x) ** (1 / 3), x)),
    "abs": _one(abs), "round": _round, "floor": _one(math.floor), "ceil": _one(math.ceil),
    "min": _many(min), "max": _many(max), "sum": _many(lambda *a: sum(a)),
    "log": _log, "ln": _one(math.log), "log10": _one(math.log10), "log2": _one(math.log2),
    "exp": _one(math.exp), "sin": _one(math.sin), "cos": _one(math.cos), "tan": _one(math.tan),
    "asin": _one(math.asin), "acos": _one(math.acos), "atan": _one(math.atan),
    "sinh": _one(math.sinh), "cosh": _one(math.cosh), "tanh": _one(math.tanh),
    "degrees": _one(math.degrees), "radians": _one(math.radians), "factorial": _factorial,
    "hypot": _many(math.hypot), "gcd": _many(lambda *a: math.gcd(*(int(x) for x in a))),
}

# Markers the text rewriting puts in (not meant to be typed, harmless when they are).
_PCT, _DATE, _DAYS = "_pct_", "_date_", "_days_"


class _Pct(float):
    """A percentage as a fraction (17% -> 0.17); ``a + 15%`` means a * 1.15."""


# --- units ---------------------------------------------------------------------------------

_UNITS: dict[str, tuple[str, float]] = {}


def _unit(kind: str, factor: float, *names: str) -> None:
    for n in names:
        _UNITS[n] = (kind, factor)


# length (metres)
_unit("length", 1e-3, "mm", "millimeter", "millimeters", "millimetre", "millimetres", "毫米")
_unit("length", 1e-2, "cm", "centimeter", "centimeters", "centimetre", "centimetres", "厘米")
_unit("length", 1.0, "m", "meter", "meters", "metre", "metres", "米")
_unit("length", 1e3, "km", "kilometer", "kilometers", "kilometre", "kilometres", "公里", "千米")
_unit("length", 0.0254, "in", "inch", "inches", "英寸")
_unit("length", 0.3048, "ft", "foot", "feet", "英尺")
_unit("length", 0.9144, "yd", "yard", "yards", "码")
_unit("length", 1609.344, "mi", "mile", "miles", "英里")
_unit("length", 1852.0, "nmi", "nautical mile", "nautical miles", "海里")
_unit("length", 500.0, "里")
# mass (grams)
_unit("mass", 1e-3, "mg", "milligram", "milligrams", "毫克")
_unit("mass", 1.0, "g", "gram", "grams", "克")
_unit("mass", 1e3, "kg", "kilogram", "kilograms", "kilo", "kilos", "千克", "公斤")
_unit("mass", 1e6, "t", "tonne", "tonnes", "ton", "tons", "吨")
_unit("mass", 453.59237, "lb", "lbs", "pound", "pounds", "磅")
_unit("mass", 28.349523125, "oz", "ounce", "ounces", "盎司")
_unit("mass", 500.0, "斤")
# time (seconds)
_unit("time", 1e-3, "ms", "millisecond", "milliseconds", "毫秒")
_unit("time", 1.0, "s", "sec", "secs", "second", "seconds", "秒")
_unit("time", 60.0, "min", "mins", "minute", "minutes", "分钟")
_unit("time", 3600.0, "h", "hr", "hrs", "hour", "hours", "小时")
_unit("time", 86400.0, "d", "day", "days", "天")
_unit("time", 604800.0, "wk", "week", "weeks", "周", "星期")
_unit("time", 365.25 * 86400, "year", "years", "yr", "年")
# data (bytes): KB/MB/... are powers of 1000, KiB/MiB/... of 1024, bits are 1/8 byte
_unit("data", 1 / 8, "bit", "bits")
_unit("data", 1.0, "B", "byte", "bytes", "字节")
for _i, _p in enumerate("KMGTP", start=1):
    _unit("data", 1000.0 ** _i, f"{_p}B", f"{_p.lower()}b" if _p != "K" else "kB")
    _unit("data", 1024.0 ** _i, f"{_p}iB")
    _unit("data", 1000.0 ** _i / 8, f"{_p}bit", f"{_p.lower()}bit" if _p != "K" else "kbit")
# temperature: handled apart (offsets)
_TEMPS = {"c": "C", "°c": "C", "celsius": "C", "摄氏度": "C", "f": "F", "°f": "F", "fahrenheit": "F",
          "华氏度": "F", "k": "K", "kelvin": "K"}


def _temperature(value: float, src: str, dst: str) -> float:
    kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[src]
    return {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[dst]


_UNIT_CHAR = re.compile(r"[A-Za-z\u4e00-\u9fff]")
_KEYWORDS = ("into", "in", "to", "as")  # "->" and "=" are read apart (not letters)
_EXPR_END = re.compile(r"[\d)\s]")


def _unit_left(text: str, end: int) -> tuple[str, int] | None:
    """The unit that ends at ``end`` (a run of letters, "°" before it, "nautical miles" as one),
    and where it starts; None if no letter ends there."""
    start = end
    while start > 0 and _UNIT_CHAR.match(text[start - 1]):
        start -= 1
    if start == end:
        return None
    unit = text[start:end]
    if unit.lower() in ("mile", "miles") and start > 1 and text[start - 1] == " ":
        before = start - 1
        while before > 0 and _UNIT_CHAR.match(text[before - 1]):
            before -= 1
        joined = text[before:end]
        if before < start - 1 and (joined in _UNITS or joined.lower() in _UNITS):
            unit, start = joined, before
    if start > 0 and text[start - 1] == "°":
        unit, start = "°" + unit, start - 1
    return unit, start


def _split_conversion(text: str) -> tuple[str, str, str] | None:
    """("3 ", "km", "m") from "3 km in m": the expression, the source unit and the target unit,
    read from the right in one pass (the regex this replaces backtracked: quadratic in the
    text's length), or None when the text is not a conversion."""
    end = len(text.rstrip())
    if end and text[end - 1] in "?？":
        end = len(text[: end - 1].rstrip())
    found = _unit_left(text, end)
    if found is None:
        return None
    dst, end = found
    end = len(text[:end].rstrip())
    symbol = next((k for k in ("->", "=") if text.endswith(k, 0, end)), None)
    if symbol is not None:
        end = len(text[: end - len(symbol)].rstrip())
        src_found = _unit_left(text, end)
    else:
        word = _unit_left(text, end)
        if word is None:
            return None
        run, start = word
        if run.lower() in _KEYWORDS:
            src_found = _unit_left(text, len(text[:start].rstrip()))
        else:  # "3kmin m": the keyword written onto the unit
            keyword = next((k for k in _KEYWORDS if run.endswith(k) and len(run) > len(k)), None)
            if keyword is None:
                return None
            src_found = (run[: -len(keyword)], start)
    if src_found is None:
        return None
    src, start = src_found
    expr = text[:start]
    if not expr or not _EXPR_END.match(expr[-1]):
        return None
    return expr, src, dst


def _convert(text: str, deadline: float) -> str | None:
    parts = _split_conversion(text)
    if parts is None:
        return None
    expr, src, dst = parts
    t_src, t_dst = _TEMPS.get(src.lower()), _TEMPS.get(dst.lower())
    if t_src and t_dst:
        value = _as_float(_evaluate(expr, deadline))
        return f"{_fmt(value)} {src} = {_fmt(_temperature(value, t_src, t_dst))} {dst}"
    u_src = _UNITS.get(src) or _UNITS.get(src.lower())
    u_dst = _UNITS.get(dst) or _UNITS.get(dst.lower())
    if u_src is None and u_dst is None:
        return None
    if u_src is None or u_dst is None:
        raise CalcError(f"unknown unit {(src if u_src is None else dst)!r}")
    if u_src[0] != u_dst[0]:
        raise CalcError(f"cannot convert {u_src[0]} ({src}) to {u_dst[0]} ({dst})")
    value = _as_float(_evaluate(expr, deadline))
    return f"{_fmt(value)} {src} = {_fmt(value * u_src[1] / u_dst[1])} {dst}"


def _as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise CalcError("a conversion needs a number")
    try:
        return float(v)
    except OverflowError:
        raise CalcRefused("number too large") from None


# --- rewriting the text into a Python expression --------------------------------------------

_ZH_WORDS = [("加上", "+"), ("减去", "-"), ("乘以", "*"), ("除以", "/"), ("加", "+"), ("减", "-"),
             ("乘", "*"), ("除", "/"), ("今天", " today ")]
# A number, matched only from the start of its digits and without giving any back: every
# search over the text is then linear (from inside a digit run, each failed try rescanned it).
_NUM = r"(?<![\d.])(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+"


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("^", "**")
    text = text.replace("，", ",").replace("。", "").replace("=", " = ").strip()
    text = text.rstrip()
    if text[-1:] in ("=", "?", "？"):  # one trailing "=" or "?" (as str methods: no regex rescans spaces)
        text = text[:-1].strip()
    # "...是多少" at the end asks for the value; in the middle ("5斤是多少kg") it asks for a unit.
    # (?<!\s): a match starts where its spaces start, never inside them (each try rescanned them).
    text = re.sub(r"(?<!\s)\s*+(等于多少|是多少|等于|多少)\s*+$", "", text)
    text = re.sub(r"(?<!\s)\s*+(等于多少|是多少|换算成|换成|转成|多少)\s*+", " in ", text)
    # "2340的17%" / "2340 的 17%": the percentage of the number.
    text = re.sub(rf"({_NUM})\s*+的\s*+({_NUM})\s*+%", r"\2% of \1", text)
    text = re.sub(r"百分之\s*(" + _NUM + ")", r"\1%", text)
    for zh, op in _ZH_WORDS:
        text = text.replace(zh, op)
    # Thousands separators: 1,234,567 (but not f(1,2)): a comma followed by exactly 3 digits.
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    return text


_DATE_RE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b|\b(\d{4})/(\d{1,2})/(\d{1,2})\b")
_SPAN_RE = re.compile(rf"({_NUM})\s*(days?|weeks?|天|周|星期)(?![A-Za-z])")


def _rewrite(text: str) -> str:
    """Dates, spans of days and percentages become marker calls the walker knows."""
    def date(m: re.Match[str]) -> str:
        y, mo, d = (g for g in m.groups() if g is not None)
        return f"{_DATE}({int(y)},{int(mo)},{int(d)})"

    text = _DATE_RE.sub(date, text)
    text = re.sub(r"\btoday\b", f"{_DATE}()", text, flags=re.IGNORECASE)

    def span(m: re.Match[str]) -> str:
        mult = 7 if m.group(2).startswith(("week", "周", "星期")) else 1
        return f"{_DAYS}({m.group(1)}*{mult})"

    text = _SPAN_RE.sub(span, text)
    # A number followed by "%" is a percentage unless an operand follows (then "%" is modulo).
    text = re.sub(rf"({_NUM})\s*%(?!\s*[\d(.A-Za-z_])", rf"{_PCT}(\1)", text)
    text = re.sub(rf"({_NUM})\s*%(?=\s*of\b)", rf"{_PCT}(\1)", text)
    text = re.sub(r"\)\s*of\b", ")*", text)
    return text


# --- the walk -------------------------------------------------------------------------------

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_NODE_NAMES = {ast.Attribute: "attribute access", ast.Lambda: "lambdas", ast.ListComp: "comprehensions",
               ast.GeneratorExp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
               ast.Subscript: "indexing", ast.Compare: "comparisons", ast.BoolOp: "logic",
               ast.IfExp: "conditionals", ast.NamedExpr: "assignment", ast.Starred: "unpacking",
               ast.JoinedStr: "strings", ast.List: "lists", ast.Tuple: "tuples", ast.Dict: "dicts", ast.Set: "sets"}


def _check_shape(tree: ast.AST) -> None:
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise CalcRefused(f"expression too long (over {MAX_NODES} parts)")
        if depth > MAX_DEPTH:
            raise CalcRefused(f"expression nested too deeply (over {MAX_DEPTH} levels)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


class _Walker:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def eval(self, node: ast.AST) -> Any:
        if time.monotonic() > self.deadline:
            raise CalcRefused("took too long")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise CalcRefused("only numbers are allowed")
            return _bounded_int(node.value) if isinstance(node.value, int) else node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            v = self.eval(node.operand)
            if isinstance(v, dt.date):
                raise CalcError("a date cannot be negated")
            return (-v if isinstance(node.op, ast.USub) else +v) if not isinstance(v, _Pct) else _Pct(
                -v if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.binop(node.op, self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise CalcRefused(f"unknown name {node.id!r}")
        if isinstance(node, ast.Call):
            return self.call(node)
        what = _NODE_NAMES.get(type(node), type(node).__name__)
        raise CalcRefused(f"{what} not allowed")

    def call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise CalcRefused("only simple function calls such as sqrt(2) are allowed")
        if len(node.args) > 100 or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalcRefused("too many arguments")
        name = node.func.id
        args = [self.eval(a) for a in node.args]
        if name == _PCT:
            return _Pct(_num(args[0]) / 100) if len(args) == 1 else self.bad(name)
        if name == _DATE:
            if not args:
                return dt.date.today()
            try:
                return dt.date(*(int(_num(a)) for a in args)) if len(args) == 3 else self.bad(name)
            except ValueError as exc:
                raise CalcError(f"not a date: {exc}") from None
        if name == _DAYS:
            n = _num(args[0]) if len(args) == 1 else self.bad(name)
            if abs(n) > 3_000_000:
                raise CalcRefused("too many days")
            return dt.timedelta(days=n)
        fn = _FUNCTIONS.get(name)
        if fn is None:
            raise CalcRefused(f"unknown function {name!r} (known: {', '.join(sorted(_FUNCTIONS))})")
        if any(isinstance(a, dt.date | dt.timedelta) for a in args):
            raise CalcError(f"{name}() takes numbers, not dates")
        try:
            result = fn(*args)
        except TypeError:
            raise CalcError(f"{name}(): wrong number of arguments") from None
        return _bounded_int(result) if isinstance(result, int) else result

    @staticmethod
    def bad(name: str) -> Any:
        raise CalcError(f"{name}: wrong arguments")

    def binop(self, op: ast.operator, a: Any, b: Any) -> Any:
        if isinstance(a, dt.date | dt.timedelta) or isinstance(b, dt.date | dt.timedelta):
            return self.dateop(op, a, b)
        if isinstance(b, _Pct) and not isinstance(a, _Pct) and isinstance(op, ast.Add | ast.Sub):
            # 200 + 15% = 230: the percentage of the left side.
            return a * (1 + b) if isinstance(op, ast.Add) else a * (1 - b)
        if isinstance(op, ast.Pow):
            self.check_pow(a, b)
        if isinstance(op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
            if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
                raise CalcRefused(f"result too large (over {MAX_INT_BITS} bits)")
        if isinstance(op, ast.Mod | ast.FloorDiv) and (isinstance(a, float) or isinstance(b, float)):
            for v in (a, b):
                if isinstance(v, int) and v.bit_length() > 1000:
                    raise CalcRefused("number too large for this operation")
        try:
            result = _BINOPS[type(op)](float(a) if isinstance(a, _Pct) else a, float(b) if isinstance(b, _Pct) else b)
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcRefused("result too large") from None
        if isinstance(result, complex):
            raise CalcError("the result is not a real number")
        return _bounded_int(result) if isinstance(result, int) else result

    @staticmethod
    def check_pow(a: Any, b: Any) -> None:
        if isinstance(b, float) and not isinstance(a, float) and abs(b) > 10_000:
            raise CalcRefused("exponent too large")
        if isinstance(a, int) and isinstance(b, int):
            if b < 0:
                if b < -10_000:
                    raise CalcRefused("exponent too large")
                return
            if abs(a) <= 1:
                return
            # |a|**b has about b * log2|a| bits: refuse before computing.
            if b * math.log2(abs(a)) > MAX_INT_BITS:
                raise CalcRefused(f"result too large (over {MAX_INT_BITS} bits)")
        if isinstance(a, float) and isinstance(b, int | float) and abs(b) > 1e6:
            raise CalcRefused("exponent too large")

    @staticmethod
    def dateop(op: ast.operator, a: Any, b: Any) -> Any:
        def days(v: Any) -> dt.timedelta:
            return v if isinstance(v, dt.timedelta) else dt.timedelta(days=_num(v))

        try:
            if isinstance(op, ast.Sub) and isinstance(a, dt.date) and isinstance(b, dt.date):
                return a - b
            if isinstance(op, ast.Add | ast.Sub) and isinstance(a, dt.date) and not isinstance(b, dt.date):
                return a + days(b) if isinstance(op, ast.Add) else a - days(b)
            if isinstance(op, ast.Add) and isinstance(b, dt.date) and not isinstance(a, dt.date):
                return b + days(a)
            if isinstance(a, dt.timedelta) and isinstance(b, dt.timedelta) and isinstance(op, ast.Add | ast.Sub):
                return a + b if isinstance(op, ast.Add) else a - b
            if isinstance(op, ast.Mult | ast.Div) and isinstance(a, dt.timedelta) and isinstance(b, int | float):
                return a * b if isinstance(op, ast.Mult) else a / b
            if isinstance(op, ast.Mult) and isinstance(b, dt.timedelta) and isinstance(a, int | float):
                return b * a
        except (OverflowError, ValueError, ZeroDivisionError):
            raise CalcError("date out of range") from None
        raise CalcError("with dates: date - date, date ± N days, N days ± N days")


def _fmt(v: Any) -> str:
    if isinstance(v, dt.date):
        return f"{v.isoformat()} ({v.strftime('%A')})"
    if isinstance(v, dt.timedelta):
        days = v.days + v.seconds / 86400
        n = _fmt(days)
        return f"{n} day" if n in ("1", "-1") else f"{n} days"
    if isinstance(v, _Pct):
        return _fmt(float(v))
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise CalcError("the result is not a finite number")
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.12g}"
    return str(v)


def _evaluate(text: str, deadline: float) -> Any:
    code = _rewrite(text)
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        raise CalcError("not an expression I can compute") from None
    except (RecursionError, MemoryError, ValueError):
        raise CalcRefused("expression too complex") from None
    _check_shape(tree)
    try:
        return _Walker(deadline).eval(tree)
    except RecursionError:
        raise CalcRefused("expression too complex") from None
    except CalcError:
        raise
    except OverflowError:  # a huge integer met a float (2340的999...9%, gcd(1e309))
        raise CalcRefused("number too large") from None
    except (ValueError, ArithmeticError) as exc:  # math's own: sqrt(-1), log(1, 1)
        raise CalcError(str(exc) or type(exc).__name__) from None


def calculate(expression: str) -> str:
    """Compute ``expression``; returns "<input> = <result>" or raises :class:`CalcError`."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalcError("give an expression, e.g. 17% of 2340")
    if len(expression) > MAX_CHARS:
        raise CalcRefused(f"expression too long (over {MAX_CHARS} characters)")
    depth = deepest = 0
    for ch in expression:
        depth += (ch in "([{（") - (ch in ")]}）")
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise CalcRefused(f"expression nested too deeply (over {MAX_DEPTH} levels)")
    deadline = time.monotonic() + MAX_SECONDS
    text = _normalise(expression)
    if not text:
        raise CalcError("give an expression, e.g. 17% of 2340")
    converted = _convert(text, deadline)
    if converted is not None:
        return converted
    value = _evaluate(text, deadline)
    return f"{expression.strip()} = {_fmt(value)}"


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


async def calculate_async(expression: str) -> str:
    """:func:`calculate` off the event loop, on the calculator's own threads (at most
    ``POOL_THREADS`` at once; more calls wait their turn instead of taking the default
    executor's threads from the prompt builder)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="botd-calc")
    return await asyncio.get_running_loop().run_in_executor(_POOL, calculate, expression)
