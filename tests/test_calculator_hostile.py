"""The calculator under hostile input (issue 25 item 14): 500-character inputs shaped to make
its text rewriting backtrack answer at once with a clear error, and the event loop keeps
turning while many are computed (the calculator runs on its own threads); and a ``/tool``
command's typed arguments read in linear time. No model, no Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import TypeAdapter

from core.tools import ToolBox
from core.tools.calculator import MAX_CHARS, CalcError, calculate
from core.tools.config import ToolConfig
from tests.helpers import loop_gaps

# Each 500 characters, each quadratic (or worse) for the regexes the calculator used to rewrite with.
BACKTRACKING = [
    "1" * (MAX_CHARS - 1) + "x",  # a digit run each number regex restarted inside
    "1" * 240 + "的" + "1" * 259,  # "A 的 B%"
    "1" * (MAX_CHARS - 1) + "%",  # a percentage of a huge number
    "1" * (MAX_CHARS - 5) + " dayx",  # a span of days
    "1" + " " * (MAX_CHARS - 2) + "x",  # the unit conversion's spaces
    "1 " + "in" * ((MAX_CHARS - 3) // 2) + "!",  # its unit and keyword
    "1" + " " * (MAX_CHARS - 4) + "多少x",  # "... 多少" at the end
]
# Numbers that used to escape as a bare OverflowError / ValueError (an "error: OverflowError").
UNCAUGHT = ["2340的" + "9" * 400 + "%", "gcd(1e309)", "10**1000 + 15%", "sqrt(-1)", "log(1, 1)", "sqrt(10**1000)"]


def calculator() -> ToolBox:
    return ToolBox({"calc": TypeAdapter(ToolConfig).validate_python({"type": "calculator"})})


@pytest.mark.parametrize("expr", BACKTRACKING, ids=range(len(BACKTRACKING)))
def test_hostile_500_characters_answer_at_once_with_a_clear_error(expr: str) -> None:
    assert len(expr) <= MAX_CHARS
    times = []
    for _ in range(3):  # the best of three: this box is shared
        start = time.monotonic()
        with pytest.raises(CalcError) as err:
            calculate(expr)
        times.append(time.monotonic() - start)
    assert str(err.value)
    assert min(times) < 0.02, times


async def test_many_hostile_calls_leave_the_event_loop_responsive() -> None:
    async with calculator() as box:
        await box.call("calc", {"expression": "1+1"}, bot="b", user="u")  # first-use imports (jsonschema)
        async with loop_gaps() as gaps:
            await asyncio.sleep(0.01)
            start = time.monotonic()
            results = await asyncio.gather(*(box.call("calc", {"expression": e}, bot="b", user=f"u{i}")
                                             for i, e in enumerate(BACKTRACKING * 4 + UNCAUGHT * 4)))
            took = time.monotonic() - start
    assert all(not r.ok and r.text.startswith("error: ") for r in results), [r.text for r in results]
    assert took < 2.0, took
    assert max(gaps) < 0.05, max(gaps)


@pytest.mark.parametrize("expr", UNCAUGHT)
async def test_huge_numbers_and_math_domain_errors_are_said_plainly(expr: str) -> None:
    with pytest.raises(CalcError):
        calculate(expr)
    async with calculator() as box:
        result = await box.call("calc", {"expression": expr}, bot="b", user="u")
    assert result.error is not None
    assert result.error.startswith(("refused: ", "cannot compute: ")), result.error


@pytest.mark.parametrize(("expr", "want"), [
    ("3 km in m", "3000 m"), ("5 km in miles", "3.10685596119 miles"), ("2 nautical miles in km", "3.704 km"),
    ("3kmin m", "3000 m"), ("10 km -> mi", "6.21371192237 mi"), ("3 in in cm", "7.62 cm"),
    ("100 °F = °C", "37.7777777778 °C"),
    ("5斤是多少kg", "2.5 kg"), ("3公里换算成米", "3000 米"), ("2+3等于多少？", "5"), ("2340 的 17%", "397.8"),
    ("1,000 km to m?", "1000000 m"), ("(1 + 2) km in m", "3000 m"),
])
def test_conversions_read_from_the_right_still_read_as_before(expr: str, want: Any) -> None:
    assert calculate(expr).endswith(f"= {want}"), calculate(expr)


def test_a_long_number_in_a_tool_command_is_read_in_linear_time() -> None:
    """``/tool lookup n=111...1x``: the number pattern for a "number" property backtracked
    (quadratic: 8,000 digits took 3.6 s on the event loop)."""
    cfg = {"type": "http", "base_url": "http://127.0.0.1:9/api", "path": "/n", "description": "d",
           "parameters": {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}}
    box = ToolBox({"lookup": TypeAdapter(ToolConfig).validate_python(cfg)})
    for value in ("1" * 20_000 + "x", "1" * 10_000 + "." + "1" * 10_000 + "e"):
        start = time.monotonic()
        assert box.parse_command("lookup", f"n={value}") == {"n": value}  # not a number: kept as text
        assert time.monotonic() - start < 0.1
    assert box.parse_command("lookup", "n=2.5e3") == {"n": 2500.0}
    assert box.parse_command("lookup", "n=-12") == {"n": -12}
