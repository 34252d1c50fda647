"""Sandboxed tools for tool-use RL (`6-grpo_train.py --task tools`), and problems whose answers need them.

    result = run_tool_call({"name": "calculator", "arguments": {"expression": "12*(3+4)"}})
    result.ok, result.text                      # True, "84"

The tools run in-process and are deterministic: a calculator, a unit converter and a date function. A model's call
is never executed as code: it is parsed JSON, checked against this module's whitelist (the tool's name, and exactly
its parameters with the right types), and the calculator walks a parsed expression tree that admits numbers and
arithmetic operators only (`ast.parse` builds the tree; nothing is evaluated by Python). A bad call is not an
exception: it returns ok=False and an error text, which the model sees as the tool's response.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
import random
from dataclasses import dataclass

MAX_EXPRESSION_CHARS = 200
MAX_POWER = 64  # 2**64 is the largest power the calculator computes: a small model must not hang the rollout

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(ValueError):
    """A call the sandbox refuses; its message becomes the tool response."""


def _walk(node):
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ToolError(f"exponent {right} is too large (at most {MAX_POWER})")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")


def format_number(value: float) -> str:
    """Integers without a decimal point, other values to at most 6 decimals (so answers compare as text too)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is not a finite number")
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. "12*(3+4)" or "2**10 / 4"."""
    text = expression.replace("×", "*").replace("÷", "/").strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression must have 1 to {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return format_number(_walk(tree))
    except ZeroDivisionError:
        raise ToolError("division by zero") from None


# unit -> (dimension, factor to the base unit); temperatures are affine and handled apart
_UNITS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mile": ("length", 1609.344), "inch": ("length", 0.0254), "foot": ("length", 0.3048),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "jin": ("mass", 0.5), "lb": ("mass", 0.45359237),
    "C": ("temperature", None), "F": ("temperature", None), "K": ("temperature", None),
}
_ALIASES = {"米": "m", "千米": "km", "公里": "km", "厘米": "cm", "毫米": "mm", "英里": "mile", "英寸": "inch",
            "英尺": "foot", "千克": "kg", "公斤": "kg", "克": "g", "斤": "jin", "磅": "lb", "摄氏度": "C",
            "华氏度": "F", "开尔文": "K", "miles": "mile", "feet": "foot", "ft": "foot", "in": "inch"}


def _unit(name: str) -> str:
    unit = _ALIASES.get(name.strip(), name.strip())
    if unit not in _UNITS:
        raise ToolError(f"unknown unit {name!r}; known: {', '.join(_UNITS)}")
    return unit


def _to_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": value * 9 / 5 + 32, "K": value + 273.15}[unit]


def unit_converter(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a length, mass or temperature, e.g. (5, "mile", "km"); the result is rounded to 4 decimals."""
    src, dst = _unit(from_unit), _unit(to_unit)
    if _UNITS[src][0] != _UNITS[dst][0]:
        raise ToolError(f"cannot convert {_UNITS[src][0]} ({src}) to {_UNITS[dst][0]} ({dst})")
    if _UNITS[src][0] == "temperature":
        result = _from_celsius(_to_celsius(value, src), dst)
    else:
        result = value * _UNITS[src][1] / _UNITS[dst][1]
    return format_number(round(result, 4))


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ToolError(f"not a YYYY-MM-DD date: {text!r}") from None


WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]


def date_tool(operation: str, date: str, days: int = 0, other_date: str = "") -> str:
    """Dates: "add" `days` to `date`; "weekday" of `date`; "between": days from `date` to `other_date`."""
    start = _date(date)
    if operation == "add":
        if abs(days) > 100_000:
            raise ToolError("days must be within 100000")
        return (start + dt.timedelta(days=days)).isoformat()
    if operation == "weekday":
        return WEEKDAYS[start.weekday()]
    if operation == "between":
        return str((_date(other_date) - start).days)
    raise ToolError(f"unknown operation {operation!r}; use add, weekday or between")


def _schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# name -> (function, {parameter: (JSON type, python types)}, required parameters)
_STR, _NUM, _INT = ("string", (str,)), ("number", (int, float)), ("integer", (int,))
TOOLS = {
    "calculator": (calculator, {"expression": _STR}, ["expression"]),
    "unit_converter": (unit_converter, {"value": _NUM, "from_unit": _STR, "to_unit": _STR},
                       ["value", "from_unit", "to_unit"]),
    "date_tool": (date_tool, {"operation": _STR, "date": _STR, "days": _INT, "other_date": _STR},
                  ["operation", "date"]),
}


def tool_schemas(names=None) -> list[dict]:
    """The OpenAI function descriptions of the whitelisted tools, for the chat template's `tools`."""
    out = []
    for name in names or TOOLS:
        fn, params, required = TOOLS[name]
        props = {p: {"type": kind[0]} for p, kind in params.items()}
        out.append(_schema(name, fn.__doc__.strip().split("\n")[0], props, required))
    return out


@dataclass
class ToolResult:
    ok: bool
    text: str  # the result, or the error the model is shown


def checked_arguments(name: str, arguments) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ToolError("arguments are not JSON") from None
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    _, params, required = TOOLS[name]
    extra, missing = set(arguments) - set(params), [p for p in required if p not in arguments]
    if extra or missing:
        raise ToolError(f"{name} takes {sorted(params)}; unknown {sorted(extra)}, missing {missing}")
    for key, value in arguments.items():
        # bool is an int subclass in Python; JSON true is not a number
        if isinstance(value, bool) or not isinstance(value, params[key][1]):
            raise ToolError(f"{name}.{key} must be a {params[key][0]}")
    return arguments


def run_tool_call(call: dict) -> ToolResult:
    """Run one parsed call ({"name", "arguments"} or OpenAI's {"function": {...}}) against the whitelist."""
    call = call.get("function", call) if isinstance(call, dict) else call
    if not isinstance(call, dict) or call.get("name") not in TOOLS:
        name = call.get("name") if isinstance(call, dict) else None
        return ToolResult(False, f"error: unknown tool {name!r}; available: {', '.join(TOOLS)}")
    try:
        arguments = checked_arguments(call["name"], call.get("arguments", {}))
        return ToolResult(True, TOOLS[call["name"]][0](**arguments))
    except ToolError as err:
        return ToolResult(False, f"error: {err}")


def tool_problem(rng: random.Random) -> dict:
    """One problem whose answer the tools compute: {"prompt", "answer", "kind", "calls"} (calls: a solution)."""
    kind = rng.choice(["calc", "convert", "date", "date_calc"])
    if kind == "calc":
        a, b, c = rng.randint(12, 999), rng.randint(12, 99), rng.randint(1, 999)
        calls = [{"name": "calculator", "arguments": {"expression": f"{a}*{b}+{c}"}}]
        prompt = f"请用计算器算出 {a}×{b}+{c} 的结果。"
    elif kind == "convert":
        v = rng.randint(1, 200)
        calls = [{"name": "unit_converter", "arguments": {"value": v, "from_unit": "mile", "to_unit": "km"}}]
        prompt = f"{v} 英里等于多少公里？"
    elif kind == "date":
        day, n = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 700)), rng.randint(1, 400)
        calls = [{"name": "date_tool", "arguments": {"operation": "add", "date": day.isoformat(), "days": n}}]
        prompt = f"{day.isoformat()} 之后 {n} 天是哪一天？用 YYYY-MM-DD 回答。"
    else:
        day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 300))
        end = day + dt.timedelta(days=rng.randint(1, 300))
        days = (end - day).days
        calls = [{"name": "date_tool", "arguments": {"operation": "between", "date": day.isoformat(),
                                                     "other_date": end.isoformat()}},
                 {"name": "calculator", "arguments": {"expression": f"{days}*24"}}]
        prompt = f"从 {day.isoformat()} 到 {end.isoformat()} 一共多少天？换算成小时是多少小时？"
    answer = run_tool_call(calls[-1]).text
    return {"prompt": prompt, "answer": answer, "kind": f"tool_{kind}", "calls": calls}
