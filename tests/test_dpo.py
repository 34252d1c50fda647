"""DPO through trl's DPOTrainer on MiniMind: ln 2 at the start, and training widens the chosen-rejected margin.

The margin is measured independently of trl, with plain full-logit log-probs (`model.dpo.sequence_logps`).
"""

import copy
import inspect
import math
import types

import pytest
import torch
from conftest import tiny_config
from trl import DPOConfig, DPOTrainer

from model.checkpoint import load_tokenizer
from model.dpo import MiniMindDPOTrainer, MiniMindForTRL, records_to_dataset, sequence_logps, tokenize_pair
from model.lora import lora_config
from model.model import MiniMindForCausalLM
from model.optim import MuonWithAdamW

MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)

QA = [("天空是什么颜色？", "天空通常是蓝色的。", "我不知道。"),
      ("一加一等于几？", "一加一等于二。", "等于三吧。"),
      ("中国的首都是哪里？", "中国的首都是北京。", "上海。"),
      ("水在多少度沸腾？", "标准大气压下一百摄氏度。", "五十度。")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def records(tok):
    out = []
    for q, good, bad in QA:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False)
        out.append({"prompt": prompt, "chosen": good + "</s>\n", "rejected": bad + "</s>\n"})
    return out


def make_trainer(tmp_path, tok, use_lora, steps=6, lr=5e-3, **config):
    torch.manual_seed(0)
    policy = MiniMindForTRL(tiny_config(vocab_size=6400, max_seq_len=64, **config))
    ref = None if use_lora else copy.deepcopy(policy).eval().requires_grad_(False)
    args = DPOConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=lr,
                     max_steps=steps, beta=0.1, max_length=64, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
                     lr_scheduler_type="constant", seed=0)
    return MiniMindDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=records_to_dataset(records(tok)),
                              processing_class=tok, peft_config=lora_config(rank=8, alpha=32) if use_lora else None)


def margin(trainer, batch, use_lora):
    """Mean over pairs of (log pi/ref on chosen) - (log pi/ref on rejected), from full logits."""
    model = trainer.model.eval()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        policy = sequence_logps(model, *args)
        if use_lora:
            with model.disable_adapter():
                ref = sequence_logps(model, *args)
        else:
            ref = sequence_logps(trainer.ref_model, *args)
    chosen, rejected = (policy - ref).chunk(2)
    return float((chosen - rejected).mean())


def test_pairs_are_tokenized_like_sft(tok):
    rec = records(tok)[0]
    ids = tokenize_pair(tok, rec["prompt"], rec["chosen"], rec["rejected"], max_length=64)
    assert ids["prompt_ids"][0] == tok.bos_token_id and ids["prompt_ids"][-1] == tok("\n", add_special_tokens=False)[
        "input_ids"][-1]
    assert ids["chosen_ids"][-2:] == [tok.eos_token_id, ids["prompt_ids"][-1]]  # "...</s>\n", no extra EOS added
    assert tok.decode(ids["chosen_ids"]) == rec["chosen"]
    # too long: the prompt keeps its end, the answers are not cut away
    long = tokenize_pair(tok, "很长的问题" * 50 + rec["prompt"], rec["chosen"], rec["rejected"], max_length=32)
    assert len(long["prompt_ids"]) + len(long["chosen_ids"]) <= 32
    assert long["prompt_ids"][-4:] == ids["prompt_ids"][-4:]


@pytest.mark.parametrize("use_lora", [False, True])
def test_dpo_starts_at_ln2_and_raises_the_margin(tmp_path, tok, use_lora):
    trainer = make_trainer(tmp_path, tok, use_lora)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(QA))])

    # trl's fused log-probs agree with the plain computation (checks the MiniMindForTRL backbone adapter)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                              fused_lm_head=True).log_probs.sum(1)
        plain = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)

    # step 0: policy == reference, so every pair's loss is -log sigmoid(0) = ln 2
    with torch.no_grad():
        loss0 = trainer.compute_loss(trainer.model, batch)
    assert abs(float(loss0) - math.log(2)) < 1e-5
    assert abs(margin(trainer, batch, use_lora)) < 1e-5

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert abs(losses[0] - math.log(2)) < 1e-4
    assert losses[-1] < losses[0]
    assert margin(trainer, batch, use_lora) > 0.5
    if not use_lora:  # the reference stayed frozen
        assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    assert not any("aux_loss" in h for h in trainer.state.log_history)  # dense: no balance loss, no key


def fused_logps(trainer, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                         fused_lm_head=True).log_probs.sum(1)


def uneven_batch(trainer):
    """The four pairs as trl collates them: chosen rows then rejected rows, right-padded to the longest row."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(QA))])
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2 and int(lengths.max()) == batch["input_ids"].shape[1]  # longest, no more
    assert torch.equal(batch["attention_mask"], (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long())
    return batch


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fused_logps_match_full_logits_on_uneven_batch(tmp_path, tok, moe):
    trainer = make_trainer(tmp_path, tok, use_lora=False, **(MOE if moe else {}))
    batch = uneven_batch(trainer)
    for mode in ("eval", "train"):  # train mode: the MoE path that also computes the balance loss
        getattr(trainer.model, mode)()
        with torch.no_grad():
            fused = fused_logps(trainer, batch)
            plain = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"])
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_right_padded_batches_go_in_as_token_mask(tmp_path, tok, moe, monkeypatch):
    if "token_mask" not in inspect.signature(MiniMindForCausalLM.forward).parameters:
        pytest.skip("MiniMindForCausalLM.forward has no token_mask yet")
    trainer = make_trainer(tmp_path, tok, use_lora=False, **(MOE if moe else {}))
    assert trainer.model.right_padded_batches and trainer.ref_model.right_padded_batches
    calls = []

    def spy(self, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k in ("attention_mask", "token_mask")})
        return MiniMindForCausalLM.forward(self, **kwargs)

    monkeypatch.setattr(MiniMindForTRL, "forward", spy)
    batch = uneven_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        fused = fused_logps(trainer, batch)
        plain = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    fused_call = calls[0]  # the fused head's backbone call; sequence_logps passes its attention_mask
    assert set(fused_call) == {"token_mask"} and torch.equal(fused_call["token_mask"], batch["attention_mask"])


def test_moe_balance_loss_joins_the_dpo_loss_and_the_logs(tmp_path, tok):
    trainer = make_trainer(tmp_path, tok, use_lora=False, steps=2, **MOE)
    batch = uneven_batch(trainer)
    policy = trainer.model.train()
    gates = [m.gate.weight for m in policy.modules() if hasattr(m, "gate")]
    assert gates

    def gate_grads(loss):
        policy.zero_grad()
        loss.backward()
        return [g.grad.clone() for g in gates]

    # the model's own balance loss on this batch, fed the padding the way the fused path feeds it
    mask_kw = "token_mask" if "token_mask" in inspect.signature(MiniMindForCausalLM.forward).parameters \
        else "attention_mask"
    aux = MiniMindForCausalLM.forward(policy, input_ids=batch["input_ids"], **{mask_kw: batch["attention_mask"]}).aux_loss
    assert aux is not None and aux.item() > 0
    with_aux = trainer.compute_loss(policy, batch)
    without_aux = DPOTrainer.compute_loss(trainer, policy, batch)  # trl alone: no MoE balance loss
    assert abs(without_aux.item() - math.log(2)) < 1e-5  # step 0: policy == reference
    torch.testing.assert_close(with_aux, without_aux + aux, rtol=1e-5, atol=1e-6)
    # the balance loss trains the routers: its gradient is exactly the difference
    for g_with, g_without, g_aux in zip(gate_grads(with_aux), gate_grads(without_aux), gate_grads(aux)):
        assert g_aux.abs().sum() > 0
        torch.testing.assert_close(g_with - g_without, g_aux, rtol=1e-4, atol=1e-7)

    policy.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["aux_loss"] > 0 for h in logs)
    assert abs(logs[0]["loss"] - (math.log(2) + logs[0]["aux_loss"])) < 1e-4  # step 1: ln 2 plus the balance loss


@pytest.mark.parametrize("use_lora", [False, True])
def test_dpo_with_muon_steps_both_groups_at_their_own_lr(tmp_path, tok, use_lora):
    """--optimizer muon in trl: the Trainer's optimizer is our Muon + AdamW (LoRA: Muon on the adapters), its
    scheduler drives both groups' LRs, and DPO still learns."""
    trainer = make_trainer(tmp_path, tok, use_lora)
    trainer.muon_flags = types.SimpleNamespace(muon_lr=0.02, muon_weight_decay=0.0, learning_rate=5e-3,
                                               weight_decay=0.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(QA))])
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, MuonWithAdamW)
    muon_params = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    names = [n for n, p in trainer.model.named_parameters() if id(p) in muon_params]
    assert names and all(("lora_" in n) == use_lora and "tok_embeddings" not in n for n in names)
    assert [g["lr"] for g in optimizer.param_groups] == [0.02] + [5e-3] * (len(optimizer.param_groups) - 1)
    assert margin(trainer, batch, use_lora) > 0.5
