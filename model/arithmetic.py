"""A Chinese arithmetic and word-problem set with exact answers, for GRPO (and a matching SFT cold start).

    python data_process.py arithmetic                      # dataset/grpo_arithmetic.jsonl + dataset/sft_arithmetic.jsonl
    python data_process.py arithmetic --n 4000 --max_value 99 --seed 1

Every problem is made from numbers drawn with a seeded generator, and its answer is computed here, so the ground
truth is exact. Kinds: bare sums, differences and products written several ways, and one-step word problems
(buying, eating, boxes, sharing). Each record is

    {"prompt": "小明有 5 个苹果，又买了 3 个，现在一共有几个苹果？", "answer": "8", "working": "5+3=8", "kind": "add"}

`sft_record` turns one into an SFT dialogue whose reply shows the working and ends with the answer in \\boxed{},
the form the `math` reward checks, so a short SFT teaches the format and GRPO then improves the accuracy.
`tool_problem` makes problems for `--task tools` whose answers come from the sandboxed tools (model/rl_tools.py).
"""

from __future__ import annotations

import json
import random

from .checkpoint import atomic_open
from .rl_tools import run_tool_call, tool_problem, tool_schemas

NAMES = ["小明", "小红", "小刚", "小丽", "妈妈", "老师", "爷爷", "小华"]
ITEMS = [("苹果", "个"), ("铅笔", "支"), ("本子", "本"), ("糖果", "颗"), ("橘子", "个"), ("贴纸", "张")]

# (kind, template); {a} {b} are the operands, {n} a name, {i} an item and {u} its measure word.
BARE = {
    "add": ["计算 {a}+{b}。", "{a} 加 {b} 等于多少？", "{a}+{b}=?"],
    "sub": ["计算 {a}-{b}。", "{a} 减去 {b} 等于多少？", "{a}-{b}=?"],
    "mul": ["计算 {a}×{b}。", "{a} 乘以 {b} 等于多少？", "{a}×{b}=?"],
}
WORDS = {
    "add": ["{n}有 {a} {u}{i}，又买了 {b} {u}，现在一共有几{u}{i}？",
            "篮子里有 {a} {u}{i}，{n}又放进去 {b} {u}，篮子里现在有几{u}？"],
    "sub": ["{n}有 {a} {u}{i}，送给同学 {b} {u}，还剩几{u}？",
            "盒子里有 {a} {u}{i}，{n}拿走了 {b} {u}，盒子里还有几{u}？"],
    "mul": ["每盒有 {a} {u}{i}，{n}买了 {b} 盒，一共有几{u}{i}？"],
    "div": ["{n}把 {a} {u}{i}平均分给 {b} 个小朋友，每人分到几{u}？"],
}
SYMBOL = {"add": "+", "sub": "-", "mul": "×", "div": "÷"}


def _operands(kind: str, rng: random.Random, max_value: int) -> tuple[int, int]:
    """Two operands whose result stays a natural number: sub never goes negative, div divides exactly, mul keeps a
    small factor (products of two large numbers are not one-step problems for a tiny model)."""
    if kind == "mul" or kind == "div":
        small = max(2, min(9, max_value))
        x, y = rng.randint(1, small), rng.randint(2, small)
        return (x * y, y) if kind == "div" else (x, y)
    a, b = rng.randint(0, max_value), rng.randint(0, max_value)
    return (max(a, b), min(a, b)) if kind == "sub" else (a, b)


def _result(kind: str, a: int, b: int) -> int:
    if kind == "div":
        return a // b
    return {"add": a + b, "sub": a - b, "mul": a * b}[kind]


KINDS = tuple(WORDS)


def make_problem(rng: random.Random, max_value: int = 20, word_share: float = 0.5, kinds=KINDS) -> dict:
    """One problem of one of `kinds` (add, sub, mul, div): {"prompt", "answer", "working", "kind"}."""
    words = rng.random() < word_share or not any(k in BARE for k in kinds)
    kind = rng.choice([k for k in (WORDS if words else BARE) if k in kinds])
    a, b = _operands(kind, rng, max_value)
    template = rng.choice((WORDS if words else BARE)[kind])
    item, unit = rng.choice(ITEMS)
    prompt = template.format(a=a, b=b, n=rng.choice(NAMES), i=item, u=unit)
    answer = _result(kind, a, b)
    return {"prompt": prompt, "answer": str(answer), "working": f"{a}{SYMBOL[kind]}{b}={answer}",
            "kind": f"word_{kind}" if words else kind}


def make_problems(n: int, seed: int = 0, max_value: int = 20, word_share: float = 0.5, kinds=KINDS) -> list[dict]:
    """n problems (fewer when the space is smaller), the same for the same arguments, with no prompt repeated (so
    a held-out split is unseen)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown problem kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(n * 50):
        if len(out) == n:
            break
        p = make_problem(rng, max_value, word_share, kinds)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out


def answer_text(problem: dict) -> str:
    return f"{problem['working']}，所以答案是 \\boxed{{{problem['answer']}}}。"


def sft_record(problem: dict, thinking: bool = False) -> dict:
    """The problem as an SFT dialogue. thinking: the working goes into reasoning_content (MiniMind-3's
    <think> block) and the reply keeps only the boxed answer."""
    if thinking:
        reply = {"role": "assistant", "reasoning_content": problem["working"],
                 "content": f"答案是 \\boxed{{{problem['answer']}}}。"}
    else:
        reply = {"role": "assistant", "content": answer_text(problem)}
    return {"conversations": [{"role": "user", "content": problem["prompt"]}, reply]}


def tool_sft_record(problem: dict) -> dict:
    """A tool problem (model/rl_tools.tool_problem) as a MiniMind-3 SFT dialogue: the calls, their results, the
    answer. Its "tools" list is the sandbox's, so SFT renders the same system turn GRPO prompts with."""
    turns = [{"role": "user", "content": problem["prompt"]}]
    for call in problem["calls"]:
        turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
        turns.append({"role": "tool", "content": run_tool_call(call).text})
    turns.append({"role": "assistant", "content": f"答案是 \\boxed{{{problem['answer']}}}。"})
    return {"conversations": turns, "tools": tool_schemas()}


def write_jsonl_atomic(path, records) -> None:
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_sets(grpo_path, sft_path, n: int, seed: int, max_value: int, task: str = "math",
               thinking: bool = False, kinds=KINDS, word_share: float = 0.5) -> tuple[int, int]:
    """The GRPO prompts and the SFT dialogues for the same kind of problems, from disjoint seeds (so the SFT cold
    start does not see the RL prompts' exact questions). Returns the two record counts."""
    if task == "tools":
        rng_rl, rng_sft = random.Random(seed), random.Random(seed + 1)
        rl = [{k: v for k, v in tool_problem(rng_rl).items() if k != "calls"} for _ in range(n)]
        sft = [tool_sft_record(tool_problem(rng_sft)) for _ in range(n)]
    else:
        rl = [{k: p[k] for k in ("prompt", "answer", "kind")} for p in make_problems(n, seed, max_value, word_share, kinds)]
        rl_prompts = {r["prompt"] for r in rl}
        sft_problems = [p for p in make_problems(2 * n, seed + 1, max_value, word_share, kinds)
                        if p["prompt"] not in rl_prompts][:n]
        sft = [sft_record(p, thinking) for p in sft_problems]
    write_jsonl_atomic(grpo_path, rl)
    write_jsonl_atomic(sft_path, sft)
    return len(rl), len(sft)
