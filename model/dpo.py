"""DPO with trl's `DPOTrainer` on MiniMind: the two small adapters trl 1.x needs, and nothing else.

1. trl computes log-probs with a fused LM head: it calls `model.base_model(...)` for the final hidden states and
   multiplies them by `model.get_output_embeddings().weight` in chunks, so the (B, T, vocab) logits are never built.
   `MiniMindForCausalLM` has no separate backbone module, so `MiniMindForTRL.base_model` returns a callable that runs
   the model and catches the output of the final norm (the hidden states the head would project).
2. trl tokenizes `prompt + chosen` as one string and appends EOS to answers that do not end with it. Our processed
   DPO data (`data_process.py dpo`) already holds the chat-template rendering: answers end with "</s>\\n", exactly
   as SFT trained them. `MiniMindDPOTrainer` tokenizes the prompt and each answer separately (the way SFT does), adds
   nothing, and when a pair is too long keeps the end of the prompt, so an answer is never truncated away entirely.
3. Padding and the MoE balance loss. trl's text collator pads every batch to its longest row, on the right, so the
   backbone passes the padding as `token_mask` (plain causal attention, exact for the real tokens in front of it)
   rather than as an attention mask. trl adds a router aux loss only for configs with `output_router_logits`
   (computed from router logits MiniMind does not return), so `MiniMindDPOTrainer` adds the model's own
   `aux_loss` (already scaled by `aux_loss_alpha`) to the DPO loss itself, and logs it as `aux_loss`.

The reference model is whatever the script passes: a frozen copy of the policy, or, with LoRA, the policy with its
adapter disabled (trl does that itself when `ref_model` is None and the model is a peft model).
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainerState
from transformers.modeling_outputs import BaseModelOutput
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .model import MiniMindForCausalLM
from .optim import MuonInTrainer
from .run_metrics import MetricsFile, holdout_split

EVALS_PER_RUN = 10  # --eval_interval 0: about this many validation losses per run (plus one at the end)


class _HiddenStates:
    """Callable stand-in for a backbone: runs the whole model and returns the final-norm output.

    Deliberately not an nn.Module (it must not register the model as its own submodule) and without `__getattr__`
    delegation (transformers probes `base_model.get_decoder` and friends; they must simply be absent).
    """

    _tp_plan = None
    _pp_plan = None

    def __init__(self, model: MiniMindForCausalLM):
        self.model = model

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None, **kwargs):
        masks = {"attention_mask": attention_mask}
        if attention_mask is not None and self.model.right_padded_batches and _takes_token_mask(type(self.model)):
            # Every row is its real tokens, then padding: causal attention alone is exact for the real tokens (and
            # their positions are 0..n-1 either way), so no mask is built and no host sync spent looking for padding.
            masks = {"token_mask": attention_mask}
        caught = {}
        handle = self.model.norm.register_forward_hook(lambda _module, _inp, out: caught.__setitem__("h", out))
        try:
            # type(...).forward skips any per-instance forward patch (trl installs one); logits_to_keep=1 makes the
            # unused logits cost one position instead of the whole sequence.
            out = type(self.model).forward(self.model, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                           position_ids=position_ids, logits_to_keep=1, **masks)
        finally:
            handle.remove()
        # trl's fused head keeps only these hidden states, so the MoE balance loss goes out through the sink.
        if self.model.aux_sink is not None and out.aux_loss is not None:
            self.model.aux_sink.append(out.aux_loss)
        return BaseModelOutput(last_hidden_state=caught["h"])


@functools.cache
def _takes_token_mask(model_class: type) -> bool:
    """Whether the model's forward has the `token_mask` kwarg (right-padding without an attention mask)."""
    return "token_mask" in inspect.signature(model_class.forward).parameters


class MiniMindForTRL(MiniMindForCausalLM):
    """MiniMindForCausalLM with a `base_model` that trl's fused LM head can call (DPO and GRPO use the same head).
    Same parameters, same state dict."""

    # True when every batch the fused head sees is right-padded (MiniMindDPOTrainer sets it from its collator).
    right_padded_batches = False
    # A list while MiniMindDPOTrainer.compute_loss runs: the MoE balance loss of each fused forward, in call order.
    aux_sink = None

    @property
    def base_model(self):
        return _HiddenStates(self)


def _dpo_modules(model) -> list[MiniMindForTRL]:
    """The MiniMindForTRL inside whatever wraps it (peft, DDP, torch.compile), or [] for another model."""
    return [] if model is None else [m for m in model.modules() if isinstance(m, MiniMindForTRL)]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int | None) -> dict:
    """prompt/chosen/rejected ids, encoded separately (no special tokens added: the strings already hold them).

    When prompt + the longer answer exceed `max_length`, the prompt keeps its last tokens, but never fewer than
    half of `max_length`; trl's collator then cuts the answers' ends to fit.
    """
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids, chosen_ids, rejected_ids = encode(prompt), encode(chosen), encode(rejected)
    if max_length is not None:
        room = max(max_length - max(len(chosen_ids), len(rejected_ids)), max_length // 2)
        if len(prompt_ids) > room:
            prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def records_to_dataset(records: list[dict]) -> Dataset:
    """A `datasets.Dataset` of {"prompt", "chosen", "rejected"} strings, the input `MiniMindDPOTrainer` expects."""
    if not records:
        raise ValueError("no DPO records")
    return Dataset.from_dict({key: [r[key] for r in records] for key in ("prompt", "chosen", "rejected")})


class MiniMindDPOTrainer(MuonInTrainer, DPOTrainer):
    """trl's DPOTrainer with MiniMind's tokenization of already-rendered chat strings, right-padding without an
    attention mask, and the MoE balance loss (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # trl 1.x's text collator (DataCollatorForPreference.torch_call) lays each row out as prompt + answer, all
        # real, then pads with `pad(..., padding_side="right")` to the longest row (or a multiple of
        # pad_to_multiple_of): right-padded by construction. Only the vision collator left-pads prompts (then
        # `flush_left`), and padding_free is switched off in trl 1.x. A collator of any other type keeps the mask.
        right_padded = type(self.data_collator) is DataCollatorForPreference
        for module in _dpo_modules(self.model) + _dpo_modules(self.ref_model):
            module.right_padded_batches = right_padded
        policies = _dpo_modules(self.model)
        self._policy = policies[0] if policies else None
        self._padded_tokens = 0  # this rank's input_ids elements (real + padding) in training batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._policy is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._policy.aux_sink = []
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            caught, self._policy.aux_sink = self._policy.aux_sink, None
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._padded_tokens += inputs["input_ids"].numel()
        if not caught:  # dense, or eval mode (the model computes the balance loss only when training)
            return result
        # trl's _compute_loss runs the policy first (`outputs = model(...)`) and the reference after it (with LoRA
        # the same module, adapter off, under no_grad): the first loss caught is the policy's, the one to train on.
        aux = caught[0]
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        if return_outputs:
            return result[0] + aux, result[1]
        return result + aux

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            # trl logs the real tokens trained on as num_tokens (all ranks); the padded count beside it gives the
            # padding share. Summed over the ranks once per log line, not once per step.
            padded = torch.tensor(self._padded_tokens, device=self.accelerator.device)
            logs["num_padded_tokens"] = int(self.accelerator.reduce(padded, reduction="sum").item())
        super().log(logs, start_time)

    def _prepare_dataset(self, dataset, processing_class, args: DPOConfig, dataset_name: str):
        if "prompt_ids" in dataset.column_names:  # already tokenized (trl calls this again from evaluate())
            return dataset
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        return dataset.map(
            lambda ex: tokenize_pair(tokenizer, ex["prompt"], ex["chosen"], ex["rejected"], args.max_length),
            remove_columns=dataset.column_names, num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {dataset_name} pairs")


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens of each row, computed the plain way (full logits).

    An independent check of what trl's fused head computes; used by tests and handy for evaluation.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(dim=-1)


def split_pairs(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training pairs, held-out pairs or None): `holdout_split`, so every rank and every resume holds out the same."""
    train_idx, val_idx = holdout_split(len(dataset), val_fraction, seed)
    if not val_idx:
        return dataset, None
    return dataset.select(train_idx), dataset.select(val_idx)


def dpo_eval_steps(eval_interval: int, total_steps: int, logging_steps: int) -> int:
    """--eval_interval, or (0) about EVALS_PER_RUN evaluations per run, on logging steps so that each val_loss joins
    a log line (a run shorter than one log interval is evaluated at its end only)."""
    if eval_interval > 0:
        return eval_interval
    every = max(1, math.ceil(total_steps / EVALS_PER_RUN))
    return math.ceil(every / logging_steps) * logging_steps


def last_checkpoint_step(output_dir: str | Path) -> int | None:
    """The step the Trainer resumes from (its newest checkpoint-N in output_dir), None without one."""
    if not Path(output_dir).is_dir():
        return None
    ckpt = get_last_checkpoint(str(output_dir))
    if ckpt is None:
        return None
    return TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json")).global_step


# The held-out pairs' DPO loss and reward metrics (eval mode: no MoE balance loss, the model computes it in training).
_VAL_KEYS = {"eval_loss": "val_loss", "eval_rewards/margins": "val_rewards/margins",
             "eval_rewards/accuracies": "val_rewards/accuracies"}
_PLOT_KEYS = ("step", "loss", "lr", "val_loss")


class DPOLogLines(TrainerCallback):
    """Rank 0: one printed line and one metrics-file line per log step (instead of the Trainer's dicts), with the
    val_loss of that step when it evaluates, and the history for the loss plot (starting from the metrics file's
    lines, so a resumed run plots the whole run). Other trl stages subclass it with their own `line_parts`."""

    plot_keys = _PLOT_KEYS

    def __init__(self, metrics: MetricsFile, every_s: float):
        self.metrics, self.every_s = metrics, every_s
        self.history = [{k: r[k] for k in self.plot_keys if k in r} for r in metrics.read()] if metrics.is_master else []
        self.pending = None  # the line of a step whose evaluation has not reported yet
        self.max_steps = 0
        self._reset_clock()

    def _reset_clock(self):
        self.t_last, self.eval_s, self.tokens_seen = time.time(), 0.0, (0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset_clock()

    def on_step_end(self, args, state, control, **kwargs):
        # The last step always gets its line, as in train_utils.train; so does an evaluation step (DefaultFlowCallback,
        # which runs first, has just decided it), so that its val_loss has a line to go in.
        if state.global_step >= state.max_steps or control.should_evaluate:
            control.should_log = True
        # And a line whenever every_s pass without one. Single process only: a log makes the Trainer gather the loss
        # from every rank, and the ranks' clocks would not agree on when.
        elif args.world_size == 1 and time.time() - self.t_last >= self.every_s:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:  # a training log; the Trainer evaluates right after it when should_evaluate is set
            self._flush()
            self.pending = self._record(state, logs)
            if not control.should_evaluate:
                self._flush()
        elif "eval_loss" in logs:
            self.eval_s += logs.get("eval_runtime", 0.0)  # not training time: left out of the next tokens_per_s
            if self.pending is not None:
                self.pending.update({new: logs[old] for old, new in _VAL_KEYS.items() if old in logs})
                self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def _record(self, state, logs: dict) -> dict:
        """The metrics-file line: step, epoch, loss, lr, grad_norm and trl's DPO metrics, plus throughput."""
        now, self.max_steps = time.time(), state.max_steps
        record = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch)}
        record.update({("lr" if k == "learning_rate" else k): v for k, v in logs.items()
                       if k not in ("epoch", "num_padded_tokens")})
        real, padded = logs.get("num_tokens"), logs.get("num_padded_tokens")
        if real is not None and padded is not None:
            d_real, d_padded = real - self.tokens_seen[0], padded - self.tokens_seen[1]
            record["tokens_per_s"] = d_real / max(now - self.t_last - self.eval_s, 1e-6)
            record["padding_share"] = 1 - d_real / d_padded if d_padded > 0 else None
            self.tokens_seen = (real, padded)
        self.t_last, self.eval_s = now, 0.0
        return record

    def _flush(self):
        record, self.pending = self.pending, None
        if record is None:
            return
        self.metrics.log(record)
        self.history.append({k: record[k] for k in self.plot_keys if k in record})
        print(" | ".join(self.line_parts(record)), flush=True)

    def line_parts(self, record: dict) -> list[str]:
        """The printed line of one record, after the step and the loss."""
        parts = [f"step {record['step']}/{self.max_steps}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        parts += [f"margin {record.get('rewards/margins', 0.0):.4f}",
                  f"acc {record.get('rewards/accuracies', 0.0):.2f}", f"chosen {record.get('rewards/chosen', 0.0):.4f}",
                  f"rejected {record.get('rewards/rejected', 0.0):.4f}"]
        if "aux_loss" in record:
            parts.append(f"aux {record['aux_loss']:.4f}")
        parts.append(f"lr {record.get('lr', 0.0):.2e}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        return parts
