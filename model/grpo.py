"""GRPO with trl's `GRPOTrainer` on MiniMind: our data, our batched engine for the rollouts, tool-use episodes.

1. Data: jsonl records ``{"prompt": str}`` or ``{"conversations": [...]}`` (the last message the user's), with an
   optional ground truth ``"answer"`` (or ``"gt"``) and ``"tools"``. `load_grpo_records` counts and reports bad
   lines with their numbers; `records_to_dataset` renders each prompt with the model family's chat template, so
   trl sees plain text prompts (and passes ``answer`` to the reward functions).
2. Rollouts (`EngineRollout`, trl's ``rollout_func``): the prompts of a step go through model/engine.py together,
   the same continuous-batching engine that serves the API, with a seed per completion (reproducible runs).
   ``--generator trl`` keeps trl's own ``model.generate``; ``--use_vllm`` is trl's vLLM mode.
3. Tool use (`ToolRollout`, ``--task tools``): model turn -> parsed <tool_call> blocks run by the sandbox
   (model/rl_tools.py) -> the tool responses rendered by the chat template -> the next model turn, at most
   ``max_tool_turns`` times. The tool-response tokens are in the completion but masked out of the loss
   (trl's ``env_mask``); the episode's record goes to the rewards as ``episode`` and ``final_reply``.
4. `MiniMindGRPOTrainer`: the reference model is ours (trl would rebuild it from a hub path we do not have), the
   MoE balance loss joins the GRPO loss (as in model/dpo.py), and the held-out accuracy is logged as
   ``val_accuracy`` (greedy replies) and ``val_accuracy_sampled`` (num_generations sampled replies per prompt,
   the same seeds each time) at the start, every ``eval_steps`` and at the end, by the math rule.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from .dataset import DataFileError, iter_json_lines, validate_messages
from .dpo import DPOLogLines, _dpo_modules
from .engine import Engine
from .optim import MuonInTrainer
from .rewards import CALL_BLOCK, answer_is_correct, final_answer, reply_text
from .rl_tools import run_tool_call, tool_schemas
from .run_metrics import holdout_split
from .sampling import SamplingParams
from .tool_calls import parse_call

MAX_BAD_LINES_SHOWN = 10


def _record_from_line(obj: dict) -> dict:
    """One jsonl object -> {"messages", "answer", "tools"}; ValueError says what is wrong."""
    if isinstance(obj.get("conversations"), list):
        # An SFT-style dialogue is a prompt up to its last user turn (the reply after it is not needed).
        turns = obj["conversations"]
        users = [i for i, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "user"]
        messages = turns[:users[-1] + 1] if users else turns
        validate_messages(messages, last_role="user")
    elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise ValueError('needs "prompt" (text) or "conversations" (messages ending with the user\'s)')
    answer = obj.get("answer", obj.get("gt"))
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError('"tools" must be a list of function descriptions')
    return {"messages": messages, "answer": None if answer is None else str(answer), "tools": tools}


def load_grpo_records(path) -> list[dict]:
    """The records of a GRPO jsonl file; malformed lines are counted and reported with their line numbers."""
    if not Path(path).is_file():
        raise DataFileError(f"{path} not found; make the bundled arithmetic set with `python data_process.py arithmetic`")
    records, bad = [], []
    for lineno, obj, err in iter_json_lines(path):
        if obj is not None:
            try:
                records.append(_record_from_line(obj))
                continue
            except ValueError as e:
                err = str(e)
        bad.append(f"line {lineno}: {err}")
    if bad:
        shown = "; ".join(bad[:MAX_BAD_LINES_SHOWN])
        print(f"{path}: skipped {len(bad)} malformed record(s): {shown}", file=sys.stderr, flush=True)
    if not records:
        raise DataFileError(f"{path}: no usable GRPO records; each line needs a prompt or conversations "
                            "(make one with: python data_process.py arithmetic)")
    return records


def render_prompt(tokenizer, record: dict, thinking: bool | None, tools: list | None) -> str:
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return tokenizer.apply_chat_template(record["messages"], tools=tools or None, add_generation_prompt=True,
                                         tokenize=False, **kwargs)


def records_to_dataset(records: list[dict], tokenizer, thinking: bool | None = None, task: str = "math") -> Dataset:
    """trl's dataset: the rendered "prompt", the "answer", and the messages/tools the tool rollout re-renders."""
    rows = {"prompt": [], "answer": [], "messages": [], "tools": []}
    for r in records:
        tools = r["tools"] or (tool_schemas() if task == "tools" else None)
        rows["prompt"].append(render_prompt(tokenizer, r, thinking, tools))
        rows["answer"].append(r["answer"])
        rows["messages"].append(json.dumps(r["messages"], ensure_ascii=False))
        rows["tools"].append(json.dumps(tools, ensure_ascii=False) if tools else "")
    return Dataset.from_dict(rows)


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    train_idx, val_idx = holdout_split(len(records), val_fraction, seed)
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def _policy(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


class EngineRollout:
    """trl's rollout_func: every prompt of the step through our batched engine at once."""

    def __init__(self, tokenizer, max_completion_length: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0):
        self.tokenizer, self.max_new = tokenizer, max_completion_length
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.seed, self.calls = seed, 0

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def params(self, index: int, max_new: int, greedy: bool, call: int) -> SamplingParams:
        """Sampling settings of one completion; its seed comes from the run's seed, the call number and its index,
        so a run repeats exactly."""
        if greedy:
            return SamplingParams(max_new_tokens=max_new, temperature=0)
        return SamplingParams(max_new_tokens=max_new, seed=self.seed * 1_000_003 + call * 4099 + index,
                              **self.sampling)

    def generate(self, model, prompt_ids: list[list[int]], max_new: Sequence[int] | None = None,
                 greedy: bool = False, call: int | None = None) -> list[list[int]]:
        """One completion per prompt, all through one engine (one batch). call: a fixed call number (the same
        seeds every time, for evaluation); by default each call draws new ones."""
        if call is None:
            self.calls += 1
            call = self.calls
        params = [self.params(i, max_new[i] if max_new else self.max_new, greedy, call)
                  for i in range(len(prompt_ids))]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return _generate_each(model, prompt_ids, params)
        finally:
            model.train(was_training)

    def __call__(self, prompts: list[str], trainer) -> dict:
        prompt_ids = self.encode(prompts)
        completions = self.generate(_policy(trainer), prompt_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}


def _generate_each(model, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Several prompts with their own sampling parameters through one engine (one batch)."""
    capacity = min(model.config.context_length, max(len(p) for p in prompt_ids) + max(p.max_new_tokens for p in params))
    engine = Engine(model, max_batch=min(len(prompt_ids), 64), capacity=capacity)
    handles = [engine.submit(ids, p) for ids, p in zip(prompt_ids, params)]
    return [h.tokens() for h in handles]


@dataclass
class Episode:
    """One tool-use rollout: the completion tokens (model turns and tool responses), which of them the model wrote."""

    completion: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)  # each model turn's text
    call_bodies: list[str] = field(default_factory=list)  # every <tool_call> body the model wrote, in order
    results: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # the turns and tool messages so far, for the template
    finished: bool = False

    def record(self) -> dict:
        return {"call_bodies": self.call_bodies, "results": self.results, "finished": self.finished,
                "model_tokens": sum(self.env_mask), "turns": self.turns}


def tool_suffix_ids(tokenizer, messages: list[dict], turn_reply: dict, results: list[str], tools, thinking) -> list[int]:
    """The tokens that follow a model turn ending in its end token: the template's text after that token, the
    tool responses and the next generation prompt, as the chat template renders them."""
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    before = messages + [turn_reply]
    after = before + [{"role": "tool", "content": r} for r in results]
    head = tokenizer.apply_chat_template(before, tools=tools, tokenize=False, **kwargs)
    full = tokenizer.apply_chat_template(after, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)
    if not full.startswith(head):
        raise ValueError("the chat template does not render a tool turn as a continuation of the conversation")
    end = tokenizer.eos_token
    tail = head[head.rindex(end) + len(end):] if end in head else ""
    return tokenizer(tail + full[len(head):], add_special_tokens=False)["input_ids"]


class ToolRollout(EngineRollout):
    """Multi-turn tool-use episodes: at most `max_tool_turns` rounds of calls, each episode within
    max_completion_length tokens in all (model and tool tokens)."""

    def __init__(self, tokenizer, max_completion_length: int, max_tool_turns: int = 3, thinking: bool | None = None,
                 **sampling):
        super().__init__(tokenizer, max_completion_length, **sampling)
        self.max_tool_turns, self.thinking = max_tool_turns, thinking

    def run_episodes(self, prompts: list[str], messages: list[list[dict]], tools: list, generate_fn: Callable,
                     ) -> tuple[list[list[int]], list[Episode]]:
        """generate_fn(token lists, max new tokens each) -> completions; a test passes a scripted one."""
        prompt_ids = self.encode(prompts)
        episodes = [Episode() for _ in prompts]
        active = list(range(len(prompts)))
        for turn in range(self.max_tool_turns + 1):
            room = [self.max_new - len(episodes[i].completion) for i in active]
            outs = generate_fn([prompt_ids[i] + episodes[i].completion for i in active], room)
            still = []
            for i, out in zip(active, outs):
                if self._take_turn(episodes[i], out, prompts[i], messages[i], tools[i], last=turn == self.max_tool_turns):
                    still.append(i)
            active = [i for i in still if len(episodes[i].completion) < self.max_new]
            if not active:
                break
        return prompt_ids, episodes

    def _take_turn(self, ep: Episode, out: list[int], prompt: str, messages, tools, last: bool) -> bool:
        """Add one model turn; True when its tool calls were run and the episode goes on."""
        ep.completion += out
        ep.env_mask += [1] * len(out)
        text = reply_text(self.tokenizer, out)
        ep.turns.append(text)
        ended = bool(out) and out[-1] == self.tokenizer.eos_token_id
        answer, _ = final_answer(prompt, text)
        bodies = CALL_BLOCK.findall(answer)
        ep.call_bodies += bodies
        if not bodies:
            ep.finished = ended
            return False
        if last or not ended:
            return False  # calls it may not make any more, or a cut-off turn: unfinished
        results = [self._run(b) for b in bodies]
        ep.results += results
        calls = [c for c in (parse_call(b.strip("\n")) for b in bodies) if c is not None]
        turn_reply = {"role": "assistant", "content": CALL_BLOCK.sub("", answer).strip(), "tool_calls": calls}
        suffix = tool_suffix_ids(self.tokenizer, messages + ep.history, turn_reply, results, tools, self.thinking)
        ep.completion += suffix
        ep.env_mask += [0] * len(suffix)
        ep.history += [turn_reply] + [{"role": "tool", "content": r} for r in results]
        return True

    @staticmethod
    def _run(body: str) -> str:
        try:
            call = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return "error: the tool call is not JSON"
        return run_tool_call(call).text if isinstance(call, dict) else "error: the tool call is not a JSON object"

    def __call__(self, prompts: list[str], trainer) -> dict:
        model = _policy(trainer)
        rows = _rows_for_prompts(trainer, prompts)
        messages = [json.loads(r["messages"]) for r in rows]
        tools = [json.loads(r["tools"]) if r["tools"] else None for r in rows]
        prompt_ids, episodes = self.run_episodes(prompts, messages, tools,
                                                 lambda ids, room: self.generate(model, ids, room))
        return {"prompt_ids": prompt_ids, "completion_ids": [e.completion for e in episodes], "logprobs": None,
                "env_mask": [e.env_mask for e in episodes], "episode": [e.record() for e in episodes],
                "final_reply": [e.turns[-1] if e.turns else "" for e in episodes]}


def _rows_for_prompts(trainer, prompts: list[str]) -> list[dict]:
    """The dataset rows of rendered prompts (trl hands the rollout only the prompt text)."""
    index = getattr(trainer, "_rows_by_prompt", None)
    if index is None:
        data = trainer.train_dataset
        index = trainer._rows_by_prompt = {p: {"messages": m, "tools": t}
                                           for p, m, t in zip(data["prompt"], data["messages"], data["tools"])}
    return [index[p] for p in prompts]


EVAL_CALL = -1  # the call number of held-out sampling: the same seeds at every evaluation, so they compare


def held_out_accuracy(model, rollout: EngineRollout, dataset: Dataset | None, samples: int = 0,
                      limit: int = 256) -> dict:
    """The held-out prompts scored by the math rule: "val_accuracy", the share whose greedy reply is right, and
    with samples > 0 "val_accuracy_sampled", the mean over `samples` sampled replies per prompt (the quantity GRPO
    optimises; the same seeds at every evaluation). {} without a split."""
    if dataset is None or len(dataset) == 0:
        return {}
    rows = dataset.select(range(min(limit, len(dataset))))
    prompts, answers = rows["prompt"], rows["answer"]
    ids, tok = rollout.encode(prompts), rollout.tokenizer

    def share_right(outs, k):
        right = [answer_is_correct(final_answer(prompts[i // k], reply_text(tok, o))[0], answers[i // k])
                 for i, o in enumerate(outs)]
        return sum(right) / len(right)

    scores = {"val_accuracy": share_right(rollout.generate(model, ids, greedy=True), 1)}
    if samples > 0:
        repeated = [x for x in ids for _ in range(samples)]
        scores["val_accuracy_sampled"] = share_right(rollout.generate(model, repeated, call=EVAL_CALL), samples)
    return scores


class MiniMindGRPOTrainer(MuonInTrainer, GRPOTrainer):
    """trl's GRPOTrainer with our reference model, the MoE balance loss and the held-out accuracy."""

    def __init__(self, *args, ref_model=None, val_dataset: Dataset | None = None, accuracy_every: int = 0,
                 **kwargs):
        config = kwargs["args"]
        beta = config.beta
        if beta != 0.0 and ref_model is not None:
            config.beta = 0.0  # keeps trl from rebuilding a reference from a hub path; ours is set below
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.beta = beta
        self.beta = beta
        if beta != 0.0 and ref_model is not None:
            self._set_reference(ref_model)
        policies = _dpo_modules(self.model)
        self._policy_module = policies[0] if policies else None
        self.val_dataset, self.accuracy_every = val_dataset, accuracy_every
        self.accuracy_rollout = EngineRollout(self.processing_class, self.args.max_completion_length,
                                              temperature=self.args.temperature, top_p=self.args.top_p,
                                              top_k=self.args.top_k or 0, seed=self.args.seed)

    def _set_reference(self, ref_model):
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = self._policy_module
        if policy is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        policy.aux_sink = []
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            caught, policy.aux_sink = policy.aux_sink, None
        if caught:  # the policy's forward is the only one under compute_loss (old/ref log-probs come before it)
            aux = caught[0]
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
            loss = loss + aux
        return loss

    def accuracy_now(self) -> dict:
        return held_out_accuracy(_policy(self), self.accuracy_rollout, self.val_dataset, self.args.num_generations)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        step, last = self.state.global_step, self.state.global_step >= self.state.max_steps
        due = self.accuracy_every > 0 and step % self.accuracy_every == 0
        if self.model.training and "loss" in logs and (due or last) and self.val_dataset is not None:
            logs.update(self.accuracy_now())
        super().log(logs, start_time)


def save_reward_plot(history: list[dict], path, title: str = "GRPO"):
    """The GRPO curve as a PNG: the mean reward per logged step and the held-out accuracy where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [(h["step"], h["reward"]) for h in history if h.get("reward") is not None]
    curves = {key: [(h["step"], h[key]) for h in history if h.get(key) is not None]
              for key in ("val_accuracy", "val_accuracy_sampled")}
    if not rewards and not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if rewards:
        ax.plot(*zip(*rewards), label=f"reward (last {rewards[-1][1]:.3f})")
    for points, label in zip(curves.values(), ("held-out accuracy, greedy", "held-out accuracy, sampled")):
        if points:
            ax.plot(*zip(*points), linestyle="--", marker="s", label=f"{label} (last {points[-1][1]:.3f})")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.set_title(title, loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class GRPOLogLines(DPOLogLines):
    """The GRPO line: reward (total and per function), KL, completion length, clip ratio, held-out accuracy."""

    plot_keys = ("step", "loss", "lr", "reward", "val_accuracy", "val_accuracy_sampled")

    def log_start(self, accuracy: dict) -> None:
        """Step 0's line: the held-out accuracy of the starting policy (the before of before/after)."""
        if accuracy and self.metrics.is_master:
            self.metrics.log({"step": 0, **accuracy})
            self.history.append({"step": 0, **accuracy})

    def line_parts(self, record: dict) -> list[str]:
        parts = [f"step {record['step']}/{self.max_steps}", f"reward {record.get('reward', 0.0):.3f}"]
        parts += [f"{k.split('/')[1]} {v:.3f}" for k, v in record.items()
                  if k.startswith("rewards/") and k.endswith("/mean")]
        # trl's two "clipped" figures: replies cut at the length limit, and tokens whose ratio the loss clipped
        for key, label in (("kl", "kl"), ("completions/mean_length", "len"), ("completions/clipped_ratio", "cut"),
                           ("clip_ratio/region_mean", "clip"),
                           ("aux_loss", "aux"), ("val_accuracy", "val_acc"),
                           ("val_accuracy_sampled", "val_acc_sampled")):
            if record.get(key) is not None:
                parts.append(f"{label} {record[key]:.3f}")
        parts.append(f"lr {record.get('lr', 0.0):.2e}")
        return parts
