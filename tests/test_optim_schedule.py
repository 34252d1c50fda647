"""model/optim.py and the loop's use of it: --optimizer muon (parameter split, steps, exact resume, fp16, DeepSpeed's
groups), --lr_schedule cosine|wsd|linear (exact values), and --z_loss (off: the loss as before; on: PaLM's term)."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from pipeline_helpers import sft_like_batch
from test_train_utils import fresh_model, kill_and_resume, make_args

from model import optim
from model.checkpoint import CheckpointError
from model.errors import UsageError
from model.model import MiniMindForCausalLM
from model.optim import (
    MuonWithAdamW,
    build_optimizer,
    cosine_lr,
    make_optimizer,
    muon_split,
    scheduled_lr,
    set_scheduled_lrs,
)
from model.train_utils import StepLogger, _accumulate, _NoLogger, compute_init, train

# ----------------------------------------------------------------------------------------------------------------
# Muon


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    dense = fresh_model()
    muon, adamw = muon_split(dense)
    names = {n for n, _ in muon}
    hidden = {f"layers.{i}.{m}.weight" for i in range(2) for m in
              ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
               "feed_forward.w2", "feed_forward.w3")}
    assert names == hidden
    assert {n for n, _ in adamw} == {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("attention_norm", "ffn_norm")}
    assert dense.output.weight is dense.tok_embeddings.weight  # the tied head is the embedding: AdamW's

    moe = tiny_model(use_moe=True)
    muon, adamw = muon_split(moe)
    names, others = {n for n, _ in muon}, {n for n, _ in adamw}
    assert {"layers.0.feed_forward.experts.3.w2.weight", "layers.1.feed_forward.shared_experts.w1.weight"} <= names
    assert {"layers.0.feed_forward.gate.weight", "layers.1.feed_forward.gate.weight"} <= others  # routers: AdamW
    assert all(p.dim() == 2 for _, p in muon) and not names & others
    assert len(muon) + len(adamw) == len(list(moe.parameters()))

    moe.layers[0].attention.wq.weight.requires_grad_(False)  # frozen weights go nowhere
    assert "layers.0.attention.wq.weight" not in {n for n, _ in muon_split(moe)[0]}


def muon_args(tmp_path, *flags):
    return make_args(tmp_path, "--optimizer", "muon", *flags)


def test_muon_steps_reduce_the_loss_and_the_wrapper_steps_both(tmp_path):
    args = muon_args(tmp_path, "--muon_lr", "0.02", "--learning_rate", "3e-3")
    model = fresh_model().train()
    opt = build_optimizer(args, model, "cpu")
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    assert [g.get("use_muon", False) for g in opt.param_groups] == [True, False, False]
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[1]["lr"] == 3e-3
    batch = sft_like_batch([8] * 4, seed=1)
    before = {"wq": model.layers[0].attention.wq.weight.clone(), "emb": model.tok_embeddings.weight.clone()}
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.5, losses
    assert not torch.equal(model.layers[0].attention.wq.weight, before["wq"])  # Muon moved the hidden matrix ...
    assert not torch.equal(model.tok_embeddings.weight, before["emb"])  # ... and AdamW the embedding
    assert set(opt.state_dict()) == {"muon", "adamw"}


def test_muon_resume_after_a_kill_logs_the_same_losses(tmp_path, corpus):
    flags = ["--optimizer", "muon", "--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "6",
             "--learning_rate", "3e-3", "--warmup_iters", "2", "--save_interval", "3", "--seed", "7",
             "--lr_schedule", "wsd", "--decay_fraction", "0.5"]
    straight, state, resumed = kill_and_resume(tmp_path, corpus, flags)
    assert state["step"] == 3 and state["optimizer"]["muon"]["state"]  # the momentum buffers are saved
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight]  # bit for bit

    # an AdamW run cannot pick up Muon's state, nor the other way round: one line saying which flag to use
    args = make_args(tmp_path / "killed", *flags[2:], "--resume")
    with pytest.raises(CheckpointError, match="trained with --optimizer muon.*resume with --optimizer muon"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")


def test_muon_with_float16_loss_scaling(tmp_path, corpus):
    args = muon_args(tmp_path, "--dtype", "float16", "--batch_size", "4", "--max_steps", "2", "--val_fraction", "0")
    rt = compute_init(args)
    assert rt.scaler.is_enabled()
    history = train(args, rt, fresh_model(), corpus, "pretrain_64")
    assert all(math.isfinite(h["loss"]) for h in history)
    assert rt.scaler.get_scale() > 0  # GradScaler stepped the wrapper (it would raise on an optimizer it can't)


def test_muon_flags_refused_in_one_line(tmp_path, corpus, monkeypatch):
    args = muon_args(tmp_path, "--muon_lr", "0")
    with pytest.raises(UsageError, match="--muon_lr must be > 0"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    args = make_args(tmp_path, "--lr_schedule", "wsd", "--decay_fraction", "0")
    with pytest.raises(UsageError, match=r"--decay_fraction must be in \(0, 1\]"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    with pytest.raises(UsageError, match="DeepSpeed clips the norm of Muon's orthogonalised updates.*--grad_clip 0"):
        optim.check_optim_args(muon_args(tmp_path), deepspeed=True)
    optim.check_optim_args(muon_args(tmp_path, "--grad_clip", "0"), deepspeed=True)  # this deepspeed has Muon
    monkeypatch.setattr(optim, "deepspeed_has_muon", lambda: False)
    with pytest.raises(UsageError, match="has no Muon optimizer"):
        optim.check_optim_args(muon_args(tmp_path, "--grad_clip", "0"), deepspeed=True)
    optim.refuse_loop_only_flags(make_args(tmp_path))  # the trl stages: defaults pass ...
    optim.refuse_loop_only_flags(muon_args(tmp_path))  # ... and so does Muon (the trainers build it) ...
    with pytest.raises(UsageError, match="^--lr_schedule wsd, --z_loss 0.1: only the shared training loop"):
        optim.refuse_loop_only_flags(muon_args(tmp_path, "--z_loss", "0.1", "--lr_schedule", "wsd"))  # ... these not
    with pytest.raises(UsageError, match="^--optimizer muon with --deepspeed: the trl stages take Muon under torchrun"):
        optim.refuse_loop_only_flags(muon_args(tmp_path, "--deepspeed", "ds_config_zero2.json"))
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UsageError, match=r"needs torch.optim.Muon \(torch 2.9 or later\)"):
        optim.check_optim_args(muon_args(tmp_path), deepspeed=False)
    monkeypatch.undo()
    frozen = fresh_model().requires_grad_(False)
    with pytest.raises(UsageError, match="no trainable hidden matrix"):
        build_optimizer(muon_args(tmp_path), frozen, "cpu")


def test_deepspeed_muon_gets_our_lrs_and_weight_decays(tmp_path):
    """DeepSpeed's own grouping (its tagging and its _muon_param_groups), fed with our config and groups."""
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine

    args = muon_args(tmp_path, "--muon_lr", "0.03", "--learning_rate", "1e-3", "--weight_decay", "0.1",
                     "--muon_weight_decay", "0.02")
    model = tiny_model(use_moe=True)
    config = optim.deepspeed_muon_config(args)
    assert config["type"] == "Muon"
    deepspeed.set_optimizer_flags(types.SimpleNamespace(optimizer_name="muon", optimizer_params=config["params"]),
                                  model)
    groups = DeepSpeedEngine._muon_param_groups(optim.deepspeed_muon_groups(model, args), config["params"])
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.experts.2.w3.weight",
                 "layers.0.feed_forward.gate.weight"):  # DeepSpeed also gives Muon the router (documented)
        g = by_id[id(named[name])]
        assert g["use_muon"] and g["lr"] == 0.03 and g["weight_decay"] == 0.02
    emb, norm = by_id[id(named["tok_embeddings.weight"])], by_id[id(named["norm.weight"])]
    assert not emb["use_muon"] and emb["lr"] == 1e-3 and emb["weight_decay"] == 0.1
    assert not norm["use_muon"] and norm["weight_decay"] == 0.0
    # the loop's schedule then scales each group from its own peak
    set_scheduled_lrs(types.SimpleNamespace(param_groups=groups), args, 0, 10)
    assert by_id[id(named["layers.0.attention.wq.weight"])]["lr"] == pytest.approx(0.03)
    assert emb["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------------------
# LR schedules


def test_wsd_and_linear_schedules_at_their_key_steps():
    hi, lo = 1e-3, 1e-4
    wsd = [scheduled_lr("wsd", s, 100, 10, hi, lo, decay_fraction=0.2) for s in range(101)]
    assert wsd[0] == pytest.approx(1e-4) and wsd[4] == pytest.approx(5e-4) and wsd[9] == hi  # warmup
    assert all(v == hi for v in wsd[10:81])  # stable until the last 20% (from step 80)
    assert wsd[90] == pytest.approx(hi + 0.5 * (lo - hi)) and wsd[99] == pytest.approx(hi + 0.95 * (lo - hi))
    assert wsd[100] == lo and min(wsd) == lo
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))  # strictly down, linearly
    assert scheduled_lr("wsd", 3, 10, 8, hi, lo, 0.5) == pytest.approx(hi * 4 / 8)  # decay never cuts into warmup
    assert scheduled_lr("wsd", 8, 10, 8, hi, lo, 0.5) == hi

    linear = [scheduled_lr("linear", s, 100, 10, hi, lo) for s in range(101)]
    assert linear[:10] == wsd[:10] and linear[10] == hi
    assert linear[55] == pytest.approx((hi + lo) / 2) and linear[100] == lo
    assert linear[32] - linear[33] == pytest.approx((hi - lo) / 90)

    assert scheduled_lr("linear", 0, 4, 0, hi, lo) == hi and scheduled_lr("linear", 2, 4, 0, hi, lo) == (hi + lo) / 2
    with pytest.raises(ValueError, match="unknown LR schedule"):
        scheduled_lr("step", 0, 10, 0, hi, lo)


def test_default_schedule_and_optimizer_are_exactly_the_old_ones(tmp_path):
    args = make_args(tmp_path, "--learning_rate", "7e-4", "--warmup_iters", "5", "--min_lr_ratio", "0.1")
    assert (args.optimizer, args.lr_schedule, args.z_loss) == ("adamw", "cosine", 0.0)
    model = fresh_model()
    opt = build_optimizer(args, model, "cpu")
    old = make_optimizer(model, 7e-4, args.weight_decay, "cpu")
    assert type(opt) is torch.optim.AdamW and opt.state_dict()["param_groups"] == old.state_dict()["param_groups"]
    for step in range(0, 61):  # the very floats the loop computed before --lr_schedule existed
        lr = set_scheduled_lrs(opt, args, step, 60)
        assert lr == cosine_lr(step, 60, 5, 7e-4, 7e-4 * 0.1)
        assert all(g["lr"] == lr for g in opt.param_groups)


def test_muon_and_adamw_groups_follow_the_schedule_in_proportion(tmp_path):
    args = muon_args(tmp_path, "--muon_lr", "0.02", "--learning_rate", "4e-4", "--warmup_iters", "3",
                     "--lr_schedule", "linear")
    opt = build_optimizer(args, fresh_model(), "cpu")
    for step in (0, 2, 3, 10, 19, 20):
        lr = set_scheduled_lrs(opt, args, step, 20)
        muon_lr, adamw_lr = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        assert adamw_lr == lr and muon_lr / 0.02 == pytest.approx(adamw_lr / 4e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)  # the floor: --min_lr_ratio of each peak


# ----------------------------------------------------------------------------------------------------------------
# z-loss


def z_batch():
    return sft_like_batch([5, 1, 9, 3], seed=2)


def test_z_loss_off_leaves_the_loss_as_it_was():
    model = tiny_model().train()
    batch = z_batch()
    out = model(**batch, num_items_in_batch=torch.tensor(7))
    logits, targets = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    old = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="sum") / torch.tensor(7)
    assert torch.equal(out.loss, old) and out.z_loss is None
    off = model(**batch, num_items_in_batch=torch.tensor(7), z_loss=0.0)
    assert torch.equal(off.loss, out.loss) and torch.equal(off.logits, out.logits) and off.z_loss is None


@pytest.mark.parametrize("num_items", [None, 11.0])
def test_z_loss_on_adds_palms_term_over_the_loss_tokens(num_items):
    model = tiny_model().train()
    batch = z_batch()
    plain = model(**batch, num_items_in_batch=num_items)
    out = model(**batch, num_items_in_batch=num_items, z_loss=1e-2)
    assert torch.equal(out.logits, plain.logits)  # the logits themselves are untouched
    # independently: log Z at each position that has a label, squared, averaged as the CE is
    lse = []
    for row in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["labels"].shape[1]):
            if batch["labels"][row, t] != -100:
                lse.append(torch.log(torch.exp(plain.logits[row, t - 1].double()).sum()))
    denominator = len(lse) if num_items is None else num_items
    want_z = 1e-2 * sum(v ** 2 for v in lse) / denominator
    assert out.z_loss.item() == pytest.approx(want_z.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(plain.loss.item() + want_z.item(), rel=1e-6)
    assert want_z > 1e-3  # teeth: the term is visible at this weight


def test_z_loss_training_forward_is_still_one_graph():
    torch._dynamo.reset()
    model = tiny_model(max_seq_len=64).train()
    batch = z_batch()
    explained = torch._dynamo.explain(
        lambda **b: model(**b, num_items_in_batch=torch.tensor(18), z_loss=1e-4).loss)(**batch)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_z_loss_in_the_loop_trains_on_it_but_logs_the_cross_entropy(tmp_path, monkeypatch):
    rt = compute_init(make_args(tmp_path))
    model = tiny_model().train()
    batch = z_batch()
    micro = [dict(zip(batch, part)) for part in zip(*(v.chunk(2) for v in batch.values()))]  # 2 micro-batches
    log = StepLogger(rt, model, 1, 1, 0, [], _NoLogger())

    def host_read(*args, **kwargs):  # on a GPU each of these would wait for the device
        raise AssertionError("host sync in the per-micro-batch path")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, host_read)
        _accumulate(model, None, iter(micro), rt, rt.scaler, log, 2, z_loss=0.5)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    whole = model(**batch, z_loss=0.5)  # the per-token means over the whole step, CE and z alike
    whole.loss.backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # trained on CE + z ...
    assert log.loss_sum.item() == pytest.approx((whole.loss - whole.z_loss).item(), rel=1e-5)  # ... logged: CE
    assert whole.z_loss.item() > 1.0  # teeth: at this weight the two differ by far more than the tolerance


def test_z_loss_refused_where_the_stage_computes_its_own_loss(tmp_path, corpus):
    class OwnLoss(torch.nn.Module):  # e.g. the distillation model: it takes no z_loss
        def __init__(self):
            super().__init__()
            self.inner = fresh_model()

        def forward(self, **batch):
            return self.inner(**batch)

    args = make_args(tmp_path, "--z_loss", "1e-4", "--max_steps", "1")
    with pytest.raises(UsageError, match="--z_loss: this stage's model \\(OwnLoss\\)"):
        train(args, compute_init(args), OwnLoss(), corpus, "pretrain_64")
    args = make_args(tmp_path, "--z_loss", "-1")
    with pytest.raises(UsageError, match="--z_loss must be >= 0"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    assert MiniMindForCausalLM.supports_z_loss


def test_pretraining_defaults_are_the_measured_recipe():
    """1-pretrain.py's defaults are the recipe sweep's winner (README "Recipe sweep"); SFT keeps cosine at its own LR."""
    from pipeline_helpers import script_main

    pretrain = script_main("1-pretrain.py").__wrapped__.__globals__["parser"].parse_args([])
    assert (pretrain.optimizer, pretrain.learning_rate, pretrain.lr_schedule, pretrain.warmup_iters) == \
        ("adamw", 1e-3, "wsd", 100)
    assert (pretrain.max_doc_chars, pretrain.packing, pretrain.tokenizer) == (512, "stream", None)
    sft_globals = script_main("3-full_sft.py").__wrapped__.__globals__
    import argparse
    parser = argparse.ArgumentParser()
    sft_globals["add_train_args"](parser, learning_rate=1e-4)
    assert parser.parse_args([]).lr_schedule == "cosine"
