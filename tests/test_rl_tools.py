"""The sandboxed tools for tool-use RL (model/rl_tools.py): results, refusals, and the problems built on them."""

import random

import pytest

from model.rl_tools import TOOLS, calculator, date_tool, run_tool_call, tool_problem, tool_schemas, unit_converter


def test_calculator_computes_without_python_eval():
    assert calculator("12*(3+4)") == "84"
    assert calculator("2**10 / 4") == "256"
    assert calculator("7 ÷ 2") == "3.5"
    assert calculator("-3 + 1.25") == "-1.75"


@pytest.mark.parametrize("expression", ["__import__('os').system('ls')", "len('abc')", "[1, 2]", "x + 1",
                                        "2**100000", "1/0", "", "1" * 300])
def test_calculator_refuses_anything_but_arithmetic(expression):
    result = run_tool_call({"name": "calculator", "arguments": {"expression": expression}})
    assert not result.ok and result.text.startswith("error: ")


def test_unit_converter_and_dates():
    assert unit_converter(5, "mile", "km") == "8.0467"
    assert unit_converter(100, "C", "F") == "212"
    assert unit_converter(2, "公斤", "斤") == "4"
    assert date_tool("add", "2024-02-28", days=2) == "2024-03-01"
    assert date_tool("between", "2024-01-01", other_date="2024-12-31") == "365"
    assert date_tool("weekday", "2026-12-02") == "星期三"
    assert not run_tool_call({"name": "unit_converter", "arguments": {"value": 1, "from_unit": "kg",
                                                                       "to_unit": "km"}}).ok


def test_calls_are_checked_against_the_whitelist():
    assert run_tool_call({"function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}).text == "2"
    assert "unknown tool 'shell'" in run_tool_call({"name": "shell", "arguments": {}}).text
    assert "unknown ['x']" in run_tool_call({"name": "calculator", "arguments": {"expression": "1", "x": 2}}).text
    assert "must be a number" in run_tool_call({"name": "unit_converter", "arguments": {
        "value": True, "from_unit": "m", "to_unit": "km"}}).text
    assert "not JSON" in run_tool_call({"name": "calculator", "arguments": "{oops"}).text


def test_schemas_describe_every_tool():
    names = [s["function"]["name"] for s in tool_schemas()]
    assert names == list(TOOLS)
    calc = tool_schemas(["calculator"])[0]["function"]
    assert calc["parameters"]["required"] == ["expression"] and calc["description"]


def test_tool_problems_are_answered_by_their_own_calls():
    rng = random.Random(0)
    for _ in range(40):
        p = tool_problem(rng)
        results = [run_tool_call(c) for c in p["calls"]]
        assert all(r.ok for r in results) and results[-1].text == p["answer"]
