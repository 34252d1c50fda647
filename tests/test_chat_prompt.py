"""model/chat_prompt.py: the same prompts as the old ChatEngine.build_prompt (copied below as the oracle), in work
linear in the number of messages."""

import json
import random

import pytest
from conftest import TOKENIZER_DIR

from model.chat_prompt import _encode_turns, _longest_fit, build_chat_prompt, min_prompt_tokens
from model.checkpoint import load_tokenizer
from model.dataset import encode_prompt
from model.serving import LockedTokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


# ---- the oracle: ChatEngine.build_prompt as it was before this module, with the engine replaced by a tokenizer ----

def old_build_prompt(tokenizer, messages, budget):
    def render(system, turns):
        return encode_prompt(tokenizer, ([{"role": "system", "content": system}] if system else []) + list(turns))

    floor = len(render(None, [{"role": "user", "content": ""}]))
    if budget < floor:
        raise ValueError(f"a prompt needs at least {floor} tokens, the budget is {budget}")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"]) or None
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    ids = render(system, turns)
    if len(ids) <= budget:
        return ids
    starts = [i for i, t in enumerate(turns) if t["role"] == "user"]
    lo, hi = 0, len(starts) - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = render(system, turns[starts[mid]:])
        if len(candidate) <= budget:
            best, hi = candidate, mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    system_text, question = system or "", turns[-1]["content"]

    def render_cut(n_system, n_question):
        return render(system_text[:n_system], [{"role": "user", "content": question[len(question) - n_question:]}])

    # The binary search over a text cut is shared with the module (it is not what changed; the window choice is).
    n_system = _longest_fit(len(system_text), lambda k: render_cut(k, len(question)), budget)
    if n_system is not None:
        return render_cut(n_system, len(question))
    n_question = _longest_fit(len(question), lambda k: render_cut(0, k), budget)
    return render_cut(0, n_question or 0)


# ---- random conversations ------------------------------------------------------------------------------------------

PIECES = ["你好", "天空为什么是蓝色的", "hello", " world", "\n", "<s>", "</s>", "<s>user\n", "1+1=?", "  ", "。", "🙂",
          "\x00MINIMIND-CONTENT\x00", "assistant", "é"]


def random_text(rng, longest=8):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, longest)))


def random_conversation(rng):
    messages = [{"role": "system", "content": random_text(rng, 30)} for _ in range(rng.choice([0, 0, 1, 2]))]
    for _ in range(rng.randint(0, 8)):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    messages.append({"role": "user", "content": random_text(rng, rng.choice([8, 60]))})
    if messages[0]["role"] == "system" and rng.random() < 0.3:  # a system message later on is joined to the first
        messages.insert(rng.randrange(1, len(messages)), {"role": "system", "content": random_text(rng)})
    return messages


def outcome(fn, *args):
    try:
        return fn(*args)
    except ValueError as err:
        return ("ValueError", str(err))


def test_per_message_ids_equal_encode_prompt(tok):
    """The premise: for v1's template the messages encode independently, so their ids concatenate to
    encode_prompt's (and the window-rendering fallback is never needed)."""
    rng = random.Random(0)
    for _ in range(60):
        messages = [m for m in random_conversation(rng) if m["role"] != "system"]
        system = rng.choice([None, random_text(rng, 20) or None])
        conversation = ([{"role": "system", "content": system}] if system else []) + messages
        encoded = _encode_turns(tok, conversation)
        assert encoded is not None, conversation
        per_message, tail = encoded
        assert [t for ids in per_message for t in ids] + tail == encode_prompt(tok, conversation), conversation


def test_same_prompts_as_the_old_algorithm(tok):
    rng = random.Random(1)
    floor = min_prompt_tokens(tok)
    cut_text = dropped_turns = 0
    for _ in range(200):
        messages = random_conversation(rng)
        full = len(old_build_prompt(tok, messages, 10**9))
        system = "\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        last_two = len(encode_prompt(tok, ([{"role": "system", "content": system}] if system else []) + messages[-1:]))
        budget = rng.choice([floor - 1, floor, floor + 1, rng.randint(floor, full + 2), rng.randint(last_two, full),
                             rng.randint(last_two, full), full, full + 5])
        expected = outcome(old_build_prompt, tok, messages, budget)
        assert outcome(build_chat_prompt, tok, messages, budget) == expected, (messages, budget)
        cut_text += floor <= budget < last_two
        dropped_turns += last_two <= budget < full
    assert cut_text > 5 and dropped_turns > 30  # both truncation stages were exercised


def test_same_errors_as_the_old_algorithm(tok):
    bad = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"},
         {"role": "user", "content": "d"}],
        [{"role": "tool", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": None}],
    ]
    floor = min_prompt_tokens(tok)
    for messages in bad:
        for budget in (floor - 1, floor + 100):
            expected = outcome(old_build_prompt, tok, messages, budget)
            assert expected[0] == "ValueError"
            assert outcome(build_chat_prompt, tok, messages, budget) == expected


def test_keeps_system_and_last_turn(tok):
    system = {"role": "system", "content": "你是MiniMind。"}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"第{i}个问题"}, {"role": "assistant", "content": f"第{i}个回答"}]
    messages = [system, *turns, {"role": "user", "content": "现在几点？"}]
    assert build_chat_prompt(tok, messages) == encode_prompt(tok, messages)  # no budget: everything
    for budget in (64, 48, 40):
        ids = build_chat_prompt(tok, messages, budget)
        text = tok.decode(ids, skip_special_tokens=False)
        assert len(ids) <= budget and text.startswith("你是MiniMind。<s>user\n")
        assert text.endswith("<s>user\n现在几点？</s>\n<s>assistant\n")
    assert min_prompt_tokens(tok) == len(encode_prompt(tok, [{"role": "user", "content": ""}]))
    ids = build_chat_prompt(tok, [{"role": "user", "content": "很长的问题" * 50}], min_prompt_tokens(tok))
    assert tok.decode(ids, skip_special_tokens=False) == "<s>user\n</s>\n<s>assistant\n"


# ---- a template whose messages do not render independently: windows are rendered, as before -----------------------

NUMBERED_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- endif -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
    "{{ '<s>user ' + loop.index|string + '\n' + message['content'] + '</s>\n<s>assistant\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + '</s>\n' }}{%- endif -%}{%- endfor -%}")


class NumberedTemplate:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def apply_chat_template(self, messages, **kwargs):
        return self._tokenizer.apply_chat_template(messages, chat_template=NUMBERED_TEMPLATE, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_fallback_for_a_template_that_numbers_messages(tok):
    numbered = NumberedTemplate(tok)
    rng = random.Random(2)
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert _encode_turns(numbered, conversation) is None
    floor = min_prompt_tokens(numbered)
    for _ in range(30):
        messages = random_conversation(rng)
        full = len(old_build_prompt(numbered, messages, 10**9))
        budget = rng.randint(floor, full + 2)
        assert build_chat_prompt(numbered, messages, budget) == old_build_prompt(numbered, messages, budget)


# ---- the work grows linearly -------------------------------------------------------------------------------------

class CountingTokenizer(LockedTokenizer):
    """Counts the messages handed to the template and the characters handed to the tokenizer."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.messages_rendered = self.chars_tokenized = self.calls = 0

    def apply_chat_template(self, messages, **kwargs):
        self.messages_rendered += len(messages)
        self.calls += 1
        return super().apply_chat_template(messages, **kwargs)

    def __call__(self, text, **kwargs):
        self.chars_tokenized += sum(map(len, text)) if isinstance(text, list) else len(text)
        self.calls += 1
        return super().__call__(text, **kwargs)


def long_chat(n_messages):
    messages = [{"role": "system", "content": "你是MiniMind。"}]
    for i in range(n_messages // 2):
        messages += [{"role": "user", "content": f"问题{i}: " + "你好" * (i % 7)},
                     {"role": "assistant", "content": f"回答{i}"}]
    return messages + [{"role": "user", "content": "最后一个问题"}]


@pytest.mark.parametrize("budget", [None, 512, 5])
def test_work_is_linear_in_messages(tok, budget):
    work, size = {}, {}
    for n in (200, 2000):
        counting = CountingTokenizer(tok)
        messages = long_chat(n)
        budget_n = None if budget is None else budget + min_prompt_tokens(tok)
        ids = build_chat_prompt(counting, messages, budget_n)
        assert budget_n is None or len(ids) <= budget_n
        work[n] = (counting.messages_rendered, counting.chars_tokenized, counting.calls)
        size[n] = (len(messages), sum(len(m["content"]) for m in messages))
    rendered, tokenized, calls = (work[2000][i] / work[200][i] for i in range(3))
    more_messages, more_text = size[2000][0] / size[200][0], size[2000][1] / size[200][1]
    # the work grows with the input (the old code rendered ~100x the messages for 10x as many), in a fixed number of
    # template and tokenizer calls (texts are tokenized in batches)
    assert rendered <= 1.05 * more_messages and tokenized <= 1.05 * more_text, json.dumps(work)
    assert calls == 1.0, json.dumps(work)
