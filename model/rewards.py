"""Reward functions for GRPO, in trl's calling convention, picked by name with a weight each.

    funcs, weights = build_rewards(["math:1", "format:0.2", "length:0.1"], tokenizer, max_completion_length=64)
    GRPOTrainer(..., reward_funcs=funcs, args=GRPOConfig(reward_weights=weights, ...))

trl calls each function with the batch's prompts, completions and completion ids, plus every dataset column
(``answer``) and what our rollout adds (``final_reply``, ``episode`` for tool use) as keyword lists. The reply is
read from the token ids with our own decoding (`reply_text`) rather than trl's decoded strings, which drop special
tokens: MiniMind-3's <think> and <tool_call> tags are special tokens.

* ``math``: 1 when the final answer equals the record's ground truth. Only the answer counts, never the reasoning
  (an answer hidden inside <think> scores 0); several different \\boxed{} answers score 0 (no hedging). Numbers
  are compared by math-verify; other answers (dates) as normalised text.
* ``format``: 1 for the expected structure: a closed <think> block when the prompt opened one, then a non-empty
  answer with exactly one \\boxed{} (math), or, for tool use, only well-formed calls (JSON with exactly "name" and
  "arguments", a whitelisted tool, exactly its parameters).
* ``length``: 0 up to a target length, then falling linearly to -1 at the completion limit; -1 for a reply that
  never finished (no end token, or a tool episode cut off).
* ``tool``: for multi-turn tool use: answer correct (1), every call valid (+0.2 if at least one was made), and
  -0.5 for an unfinished episode.
* ``rm``: a transformers sequence-classification model given by path; trl scores prompt + completion with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from .errors import UsageError
from .rl_tools import TOOLS, ToolError, checked_arguments
from .tool_calls import CALL_CLOSE, CALL_OPEN, parse_reply

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
REWARD_NAMES = ("math", "format", "length", "tool", "rm")


class RewardSpecError(UsageError):
    pass


def reply_text(tokenizer, ids: Sequence[int]) -> str:
    """A completion's text with its format tags, up to (not including) the end token; padding dropped."""
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in stop:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=False)


def opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves the reply inside an open <think> block (MiniMind-3, thinking on)."""
    return prompt.rstrip("\n").endswith("<think>")


def final_answer(prompt: str, reply: str) -> tuple[str, str | None]:
    """(answer text outside the reasoning, reasoning or None when a thinking reply never closed its block)."""
    parsed = parse_reply(reply, thinking=opens_thinking(prompt), parse_tools=False)
    if opens_thinking(prompt) and "</think>" not in reply:
        return "", None
    return parsed.content.strip(), parsed.reasoning


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).strip("。.，,!！")


def answer_is_correct(answer: str, gold: str) -> bool:
    """The math rule on one answer text (see the module docstring)."""
    boxed = BOXED.findall(answer)
    if len({_normalise(b) for b in boxed}) > 1:
        return False
    gold = str(gold).strip()
    if NUMBER.match(gold):
        from math_verify import parse, verify  # imported here: sympy's import costs a second

        return bool(verify(parse(gold), parse(answer)))
    if boxed:
        return _normalise(boxed[0]) == _normalise(gold)
    dates = DATE.findall(answer)
    if DATE.fullmatch(gold):
        return bool(dates) and dates[-1] == gold
    return _normalise(answer).endswith(_normalise(gold)) and bool(_normalise(gold))


def call_is_valid(body: str) -> bool:
    """A <tool_call> block's body: JSON with exactly "name" and "arguments", a whitelisted tool, its parameters."""
    try:
        call = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return False
    if not isinstance(call, dict) or set(call) != {"name", "arguments"} or call["name"] not in TOOLS:
        return False
    try:
        checked_arguments(call["name"], call["arguments"])
    except ToolError:
        return False
    return True


def _replies(tokenizer, completion_ids, kwargs) -> list[str]:
    final = kwargs.get("final_reply")
    return list(final) if final is not None else [reply_text(tokenizer, ids) for ids in completion_ids]


def math_reward(tokenizer):
    def math(prompts, completions, completion_ids, answer, **kwargs):
        replies = _replies(tokenizer, completion_ids, kwargs)
        return [float(answer_is_correct(final_answer(p, r)[0], g)) if g is not None else None
                for p, r, g in zip(prompts, replies, answer)]
    return math


def format_reward(tokenizer):
    def format(prompts, completions, completion_ids, **kwargs):
        replies, episodes = _replies(tokenizer, completion_ids, kwargs), kwargs.get("episode")
        scores = []
        for i, (p, r) in enumerate(zip(prompts, replies)):
            answer, reasoning = final_answer(p, r)
            if reasoning is None or not answer:
                scores.append(0.0)
            elif episodes is not None:  # tool use: every call the model made is well formed
                scores.append(float(all(call_is_valid(b) for b in episodes[i]["call_bodies"])))
            else:
                scores.append(float(len(BOXED.findall(answer)) == 1 and not CALL_BLOCK.search(answer)))
        return scores
    return format


def length_reward(tokenizer, max_completion_length: int, target: int | None = None):
    target = target if target is not None else int(0.75 * max_completion_length)
    span = max(1, max_completion_length - target)

    def length(prompts, completions, completion_ids, **kwargs):
        episodes, scores = kwargs.get("episode"), []
        for i, ids in enumerate(completion_ids):
            finished = episodes[i]["finished"] if episodes is not None else tokenizer.eos_token_id in list(ids)
            model_tokens = episodes[i]["model_tokens"] if episodes is not None else len(ids)
            scores.append(-1.0 if not finished else -min(1.0, max(0, model_tokens - target) / span))
        return scores
    return length


def tool_reward(tokenizer):
    def tool(prompts, completions, completion_ids, answer, episode=None, **kwargs):
        if episode is None:
            raise UsageError("the tool reward needs tool-use rollouts: run with --task tools")
        replies, scores = _replies(tokenizer, completion_ids, {"episode": episode, **kwargs}), []
        for p, r, g, ep in zip(prompts, replies, answer, episode):
            score = float(answer_is_correct(final_answer(p, r)[0], g))
            bodies = ep["call_bodies"]
            if bodies and all(call_is_valid(b) for b in bodies):
                score += 0.2
            if not ep["finished"]:
                score -= 0.5
            scores.append(score)
        return scores
    return tool


def parse_reward_spec(items: Sequence[str]) -> list[tuple[str, float]]:
    """["math:1", "format:0.2"] -> [("math", 1.0), ("format", 0.2)]; a bare name weighs 1."""
    out = []
    for item in items:
        name, _, weight = item.partition(":")
        if name not in REWARD_NAMES:
            raise RewardSpecError(f"unknown reward {name!r} in --rewards; choose from {', '.join(REWARD_NAMES)}")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise RewardSpecError(f"--rewards {item!r}: the weight after ':' must be a number") from None
    if not out:
        raise RewardSpecError("--rewards needs at least one reward")
    return out


def build_rewards(items: Sequence[str], tokenizer, max_completion_length: int, reward_model: str | None = None,
                  length_target: int | None = None) -> tuple[list, list[float]]:
    """trl's reward_funcs and reward_weights for a --rewards list (rm: the path in `reward_model`)."""
    funcs, weights = [], []
    for name, weight in parse_reward_spec(items):
        if name == "rm":
            if not reward_model:
                raise RewardSpecError("--rewards rm needs --reward_model PATH (a sequence-classification model folder)")
            funcs.append(reward_model)  # trl loads it with AutoModelForSequenceClassification
        elif name == "length":
            funcs.append(length_reward(tokenizer, max_completion_length, length_target))
        else:
            funcs.append({"math": math_reward, "format": format_reward, "tool": tool_reward}[name](tokenizer))
        weights.append(weight)
    return funcs, weights
