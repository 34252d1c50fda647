"""DPO with trl's `DPOTrainer` on MiniMind: the two small adapters trl 1.x needs, and nothing else.

1. trl computes log-probs with a fused LM head: it calls `model.base_model(...)` for the final hidden states and
   multiplies them by `model.get_output_embeddings().weight` in chunks, so the (B, T, vocab) logits are never built.
   `MiniMindForCausalLM` has no separate backbone module, so `MiniMindForDPO.base_model` returns a callable that runs
   the model and catches the output of the final norm (the hidden states the head would project).
2. trl tokenizes `prompt + chosen` as one string and appends EOS to answers that do not end with it. Our processed
   DPO data (`data_process.py dpo`) already holds the chat-template rendering: answers end with "</s>\\n", exactly
   as SFT trained them. `MiniMindDPOTrainer` tokenizes the prompt and each answer separately (the way SFT does), adds
   nothing, and when a pair is too long keeps the end of the prompt, so an answer is never truncated away entirely.

The reference model is whatever the script passes: a frozen copy of the policy, or, with LoRA, the policy with its
adapter disabled (trl does that itself when `ref_model` is None and the model is a peft model).
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers.modeling_outputs import BaseModelOutput
from trl import DPOConfig, DPOTrainer

from .model import MiniMindForCausalLM


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
        caught = {}
        handle = self.model.norm.register_forward_hook(lambda _module, _inp, out: caught.__setitem__("h", out))
        try:
            # type(...).forward skips any per-instance forward patch (trl installs one); logits_to_keep=1 makes the
            # unused logits cost one position instead of the whole sequence.
            type(self.model).forward(self.model, input_ids=input_ids, attention_mask=attention_mask,
                                     inputs_embeds=inputs_embeds, position_ids=position_ids, logits_to_keep=1)
        finally:
            handle.remove()
        return BaseModelOutput(last_hidden_state=caught["h"])


class MiniMindForDPO(MiniMindForCausalLM):
    """MiniMindForCausalLM with a `base_model` that trl's fused LM head can call. Same parameters, same state dict."""

    @property
    def base_model(self):
        return _HiddenStates(self)


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


class MiniMindDPOTrainer(DPOTrainer):
    """trl's DPOTrainer with MiniMind's tokenization of already-rendered chat strings (see the module docstring)."""

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
