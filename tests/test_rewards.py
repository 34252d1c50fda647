"""GRPO reward functions (model/rewards.py) on hand-written replies, adversarial ones included."""

import pytest

from model.checkpoint import TOKENIZER3_DIR, load_tokenizer
from model.rewards import (
    RewardSpecError,
    answer_is_correct,
    build_rewards,
    call_is_valid,
    final_answer,
    parse_reward_spec,
    reply_text,
)

V1 = load_tokenizer()
M3 = load_tokenizer(TOKENIZER3_DIR)
PLAIN = "<s>user\n3+4=?</s>\n<s>assistant\n"  # a v1 prompt: no thinking block
THINKING = "<|im_start|>user\n3+4=?<|im_end|>\n<|im_start|>assistant\n<think>\n"  # MiniMind-3, thinking on


def ids(tokenizer, text, end=True):
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    return out + [tokenizer.eos_token_id] if end else out


def score(name, tokenizer, prompt, replies, answer="7", **kwargs):
    funcs, _ = build_rewards([name], tokenizer, max_completion_length=kwargs.pop("max_len", 64), **kwargs)
    completion_ids = [r if isinstance(r, list) else ids(tokenizer, r) for r in replies]
    return funcs[0](prompts=[prompt] * len(replies), completions=[""] * len(replies), completion_ids=completion_ids,
                    answer=[answer] * len(replies))


def test_math_reward_reads_the_answer_only():
    replies = ["3+4=7，所以答案是 \\boxed{7}。", "答案是 \\boxed{8}。", "3+4=7，答案 7", "我不知道"]
    assert score("math", V1, PLAIN, replies) == [1.0, 0.0, 1.0, 0.0]


def test_answer_hidden_inside_the_thinking_scores_zero():
    hidden = "答案是 \\boxed{7}\n</think>\n\n我算不出来。"
    shown = "3+4=7\n</think>\n\n答案是 \\boxed{7}。"
    never_closed = "答案是 \\boxed{7}"  # the reasoning never ends: no answer at all
    assert score("math", M3, THINKING, [hidden, shown, never_closed]) == [0.0, 1.0, 0.0]
    # without a thinking prompt, an inline <think> block still does not count as the answer
    assert score("math", V1, PLAIN, ["<think>\\boxed{7}</think>不知道"]) == [0.0]


def test_several_different_boxed_answers_score_zero():
    assert score("math", V1, PLAIN, ["\\boxed{3} 或者 \\boxed{7}", "\\boxed{7}，即 \\boxed{7}"]) == [0.0, 1.0]


def test_non_numeric_answers_compare_as_text():
    assert answer_is_correct("那天是 2024-03-05。", "2024-03-05")
    assert not answer_is_correct("2024-03-05 或 2024-03-06", "2024-03-05")
    assert answer_is_correct("\\boxed{星期二}", "星期二")
    assert answer_is_correct("\\boxed{0.5}", "0.5") and answer_is_correct("\\boxed{1/2}", "0.5")


def test_format_reward_wants_closed_thinking_and_one_boxed_answer():
    replies = ["3+4=7\n</think>\n\n答案是 \\boxed{7}。", "答案是 \\boxed{7}。", "x\n</think>\n\n7",
               "x\n</think>\n\n\\boxed{7} \\boxed{7}"]
    assert score("format", M3, THINKING, replies) == [1.0, 0.0, 0.0, 0.0]


def test_length_reward_penalises_unfinished_and_long_replies():
    short = ids(V1, "\\boxed{7}")
    unfinished = ids(V1, "\\boxed{7}", end=False)
    long = ids(V1, "很" * 60)  # 61 tokens with the end token: past the target (48) of a 64-token limit
    scores = score("length", V1, PLAIN, [short, unfinished, long])
    assert scores[0] == 0.0 and scores[1] == -1.0
    assert -1.0 < scores[2] < 0.0
    assert scores[2] == pytest.approx(-(len(long) - 48) / 16)


def test_tool_calls_are_checked_against_the_whitelist():
    good = '{"name": "calculator", "arguments": {"expression": "1+2"}}'
    assert call_is_valid(good)
    assert not call_is_valid('{"name": "calculator", "arguments": {"expression": "1+2"}, "id": 3}')  # extra key
    assert not call_is_valid('{"name": "calculator", "arguments": {"expression": "1+2", "x": 1}}')  # extra argument
    assert not call_is_valid("calculator(1+2)")  # not JSON
    assert not call_is_valid('{"name": "shell", "arguments": {"cmd": "ls"}}')  # not whitelisted
    assert not call_is_valid('{"name": "unit_converter", "arguments": {"value": "5", "from_unit": "m", "to_unit": "km"}}')


def test_tool_reward_needs_tool_rollouts():
    funcs, _ = build_rewards(["tool"], M3, 64)
    with pytest.raises(Exception, match="--task tools"):
        funcs[0](prompts=[THINKING], completions=[""], completion_ids=[[1]], answer=["7"])


def test_reply_text_keeps_format_tags_and_stops_at_the_end_token():
    out = ids(M3, "a\n</think>\n\n<tool_call>\n{}\n</tool_call>") + ids(M3, "junk after the end")
    assert reply_text(M3, out) == "a\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    assert final_answer(THINKING, reply_text(M3, out))[1] == "a"


def test_reward_spec_parsing_and_errors():
    assert parse_reward_spec(["math", "format:0.2"]) == [("math", 1.0), ("format", 0.2)]
    with pytest.raises(RewardSpecError, match="unknown reward 'speed'"):
        parse_reward_spec(["speed"])
    with pytest.raises(RewardSpecError, match="must be a number"):
        parse_reward_spec(["math:lots"])
    with pytest.raises(RewardSpecError, match="--reward_model"):
        build_rewards(["rm"], V1, 64)
    funcs, weights = build_rewards(["math:2", "rm:0.5"], V1, 64, reward_model="some/folder")
    assert weights == [2.0, 0.5] and funcs[1] == "some/folder" and funcs[0].__name__ == "math"
