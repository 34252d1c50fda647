"""model/train_utils.train()'s step loss, throughput, grad norm, validation loss and metrics file: the loss is the
per-token mean over the whole optimizer step however the batch is split (and over ranks), tokens/s counts real
tokens, the held-out loss is what it says, and the metrics file and val losses survive a kill and resume."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_model
from pipeline_helpers import sft_like_batch
from server_helpers import free_port
from test_train_utils import Crash, fresh_model, make_args

from model.checkpoint import load_model
from model.errors import UsageError
from model.run_metrics import MetricsFile, holdout_split
from model.train_utils import (
    StepLogger,
    _accumulate,
    _holdout,
    _Items,
    _NoLogger,
    add_train_args,
    compute_init,
    real_token_count,
    resolve_eval_interval,
    save_loss_plot,
    train,
)

ANSWER_TOKENS = [1, 2, 14, 3, 15, 1, 9, 2]  # per row: very uneven, so a mean of micro-batch means is visibly off
T = 16


def sft_batch(seed: int = 0) -> dict:
    """8 SFT-like rows: labels -100 except each row's last ANSWER_TOKENS[i] positions."""
    return sft_like_batch(ANSWER_TOKENS, seed, T)


def split(batch: dict, parts: int) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*(v.chunk(parts) for v in batch.values()))]


def cpu_runtime(tmp_path, *flags):
    args = make_args(tmp_path, *flags)
    return compute_init(args)


def accumulate(model, rt, micro_batches: list[dict]) -> tuple[list[torch.Tensor], float]:
    """One step's gradients and logged loss through the loop's own _accumulate."""
    model.zero_grad(set_to_none=True)
    log = StepLogger(rt, model, 1, 1, 0, [], _NoLogger())
    _accumulate(model, None, iter(micro_batches), rt, rt.scaler, log, len(micro_batches))
    return [p.grad.clone() for p in model.parameters()], log.loss_sum.item()


def reference(model, batch: dict) -> tuple[list[torch.Tensor], float]:
    """Gradient and value of the per-token mean loss over the whole batch in one forward."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], loss.item()


def assert_grads_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_step_gradient_is_the_per_token_mean_however_the_batch_is_split(tmp_path):
    rt = cpu_runtime(tmp_path)
    model = tiny_model().train()
    batch = sft_batch()
    want_grads, want_loss = reference(model, batch)
    for parts in (1, 2, 4):
        grads, loss = accumulate(model, rt, split(batch, parts))
        assert_grads_close(grads, want_grads)
        assert loss == pytest.approx(want_loss, rel=1e-5)  # the logged loss is the step's per-token mean too
    # Teeth: the old mean of per-micro-batch means weighs a 1-token row like a 15-token one, and is far off.
    model.zero_grad(set_to_none=True)
    (sum(model(**mb).loss for mb in split(batch, 4)) / 4).backward()
    off = sum((p.grad - g).norm() ** 2 for p, g in zip(model.parameters(), want_grads)) ** 0.5
    assert off > 0.1 * sum(g.norm() ** 2 for g in want_grads) ** 0.5


def test_moe_balance_loss_keeps_its_mean_over_micro_batches(tmp_path):
    rt = cpu_runtime(tmp_path)
    model = tiny_model(use_moe=True, spread=0.05).train()
    micro = split(sft_batch(1), 2)
    total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
    model.zero_grad(set_to_none=True)
    want = 0.0
    for mb in micro:  # sum of token CE over the step / its tokens, plus the mean of the micro-batches' aux
        out = model(**mb)
        assert out.aux_loss is not None
        ce = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                             mb["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        want = want + ce / total + out.aux_loss / len(micro)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    grads, loss = accumulate(model, rt, micro)
    assert_grads_close(grads, want_grads)
    assert loss == pytest.approx(want.item(), rel=1e-5)


def test_micro_batch_path_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch):
    rt = cpu_runtime(tmp_path)
    model = tiny_model().train()
    log = StepLogger(rt, model, 10, 5, 0, [], _NoLogger(), every_s=1e9)
    padded = {**sft_batch(), "attention_mask": torch.ones(len(ANSWER_TOKENS), T, dtype=torch.long)}

    def host_read(*args, **kwargs):  # on a GPU each of these would wait for the device
        raise AssertionError("host sync in the per-micro-batch path")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, host_read)
        _accumulate(model, None, iter(split(sft_batch(), 4)), rt, rt.scaler, log, 4)
        log.step_done(1, 0, 1e-3, T, grad_norm=torch.ones(()))  # not a log step: nothing read
        assert real_token_count(padded).dim() == 0
    assert log.window_steps == 1 and log.positions == len(ANSWER_TOKENS) * T


# Each of 2 gloo ranks gets half the rows (as micro-batches of 2) and steps once through _accumulate under DDP.
DDP_LAUNCHER = textwrap.dedent("""
    import argparse, os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from conftest import tiny_model
    from test_train_loop_metrics import VAL_SPLITS, split, sft_batch
    from model import train_utils as tu
    args = tu.add_train_args(argparse.ArgumentParser()).parse_args(["--device", "cpu"])
    rt = tu.compute_init(args)
    model = tiny_model().train()
    items = [dict(zip(sft_batch(), row)) for row in zip(*sft_batch().values())]
    # held-out losses: 3 items (2 on rank 0, 1 on rank 1), then 1 (rank 1's share empty: it must still join in)
    val = [tu.evaluate_loss(model, tu._Items(items, idx[rt.rank::rt.world_size]), rt, 2) for idx in VAL_SPLITS]
    assert model.training
    rows = {{k: v.chunk(rt.world_size)[rt.rank] for k, v in sft_batch().items()}}
    log = tu.StepLogger(rt, model, 1, 1, 0, [], tu._NoLogger())
    tu._accumulate(DDP(model), None, iter(split(rows, 2)), rt, rt.scaler, log, 2)
    loss = log.loss_sum.clone()
    dist.all_reduce(loss)
    if rt.rank == 0:
        torch.save({{"loss": loss.item() / rt.world_size, "grads": [p.grad for p in model.parameters()], "val": val}},
                   os.path.join({out!r}, "ddp.pt"))
    tu.compute_cleanup()
""")


VAL_SPLITS = [[0, 3, 6], [5]]


def test_two_gloo_ranks_give_the_single_process_step_and_val_loss(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(DDP_LAUNCHER.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(launcher)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    want_grads, want_loss = reference(tiny_model().train(), sft_batch())
    assert_grads_close(got["grads"], want_grads)  # rank 0 answers 9 tokens of 47, rank 1 the other 38
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    model = tiny_model()  # eval mode
    with torch.no_grad():
        want_val = [model(**{k: v[idx] for k, v in sft_batch().items()}).loss.item() for idx in VAL_SPLITS]
    assert got["val"] == pytest.approx(want_val, rel=1e-5)


class Recording(torch.utils.data.Dataset):
    """A dataset that records which items are read, with an attribute the loop reads (skipped)."""

    def __init__(self, dataset, skipped=0):
        self.dataset, self.skipped, self.seen = dataset, skipped, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.dataset[i]


def test_validation_loss_is_the_held_out_per_token_mean(tmp_path, corpus, capsys):
    data = Recording(corpus, skipped=3)
    args = make_args(tmp_path, "--batch_size", "2", "--max_steps", "3", "--val_fraction", "0.1",
                     "--eval_interval", "100", "--seed", "5")
    history = train(args, compute_init(args), fresh_model(), data, "pretrain_64")
    _, val = holdout_split(len(corpus), 0.1, 5)
    out = capsys.readouterr().out
    assert f"validation: {len(val)} held-out items ({100 * len(val) / len(corpus):.2g}%)" in out
    assert "skipped 3 samples" in out
    # trained on the other items only; validation (at the last step alone here) read exactly the held-out ones
    trained, validated = data.seen[:-len(val)], data.seen[-len(val):]
    assert not set(trained) & set(val) and validated == val
    assert [("val_loss" in h) for h in history] == [False, False, True]
    model = load_model(tmp_path / "out" / "pretrain_64.pth", fresh_model().config, device="cpu")
    batch = {k: torch.stack([corpus[i][k] for i in val]) for k in ("input_ids", "targets")}
    with torch.no_grad():
        want = model(**batch).loss.item()  # eval mode: the plain per-token mean
    assert history[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    assert f"val_loss {want:.4f}" in out


def test_metrics_file_and_val_losses_survive_a_kill_and_resume(tmp_path, corpus, capsys):
    flags = ["--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "6", "--learning_rate", "3e-3",
             "--save_interval", "3", "--seed", "7", "--val_fraction", "0.1", "--eval_interval", "2"]
    args = make_args(tmp_path / "straight", *flags)
    straight = train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")

    args = make_args(tmp_path / "killed", *flags)

    def die_at_4(step, history):
        if step == 4:  # logged (and validated) at step 4, but only step 3 was saved
            raise Crash

    with pytest.raises(Crash):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64", step_callback=die_at_4)
    killed_file = tmp_path / "killed" / "out" / "pretrain_64_metrics.jsonl"
    assert [r["step"] for r in MetricsFile(killed_file, is_master=False).read()] == [1, 2, 3, 4]
    capsys.readouterr()
    # Resumed under another --val_fraction: the saved split is used, not a recomputed one.
    args = make_args(tmp_path / "killed", *flags[:-4], "--val_fraction", "0.3", "--eval_interval", "2", "--resume")
    torch.manual_seed(12345)
    resumed = train(args, compute_init(args), fresh_model(seed=99), corpus, "pretrain_64")
    n_val = len(holdout_split(len(corpus), 0.1, 7)[1])
    assert f"validation: {n_val} held-out items" in capsys.readouterr().out

    assert [h["step"] for h in straight if "val_loss" in h] == [2, 4, 6]
    assert resumed == straight  # losses and val losses bit for bit
    a = MetricsFile(tmp_path / "straight" / "out" / "pretrain_64_metrics.jsonl", is_master=False).read()
    b = MetricsFile(killed_file, is_master=False).read()
    assert set(a[1]) == {"step", "epoch", "loss", "val_loss", "lr", "tokens_per_s", "padding_share", "mfu",
                         "grad_norm"}
    assert "val_loss" not in a[0] and a[0]["mfu"] is None and a[0]["grad_norm"] > 0 and a[0]["padding_share"] == 0

    def timeless(records):  # tokens/s is the one wall-clock figure
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and timeless(b) == timeless(a)
    assert [r["val_loss"] for r in a if "val_loss" in r] == [h["val_loss"] for h in straight if "val_loss" in h]


class Padded(torch.utils.data.Dataset):
    """SFT-like right-padded items: 12 real tokens of 16 (attention_mask), the last 4 real ones answered."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(3, 256, (16,), generator=g)
        mask = torch.ones(16, dtype=torch.long)
        mask[12:] = 0
        ids[12:] = 0
        labels = torch.full_like(ids, -100)
        labels[8:12] = ids[8:12]
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_tokens_per_s_counts_real_tokens_and_logs_the_padding_share(tmp_path, capsys):
    args = make_args(tmp_path, "--batch_size", "4", "--max_steps", "2", "--val_fraction", "0")
    train(args, compute_init(args), fresh_model(), Padded(), "sft_pad")
    out = capsys.readouterr().out
    assert "validation: off" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("| pad 25.0% |" in line and "| grad_norm " in line for line in lines)
    records = MetricsFile(tmp_path / "out" / "sft_pad_metrics.jsonl", is_master=False).read()
    assert [r["padding_share"] for r in records] == [0.25, 0.25]
    assert all("val_loss" not in r and r["tokens_per_s"] > 0 for r in records)


def test_real_token_count_follows_the_batch_convention():
    ids = torch.ones(2, 4, dtype=torch.long)
    doc = torch.tensor([[0, 0, 1, -1], [0, -1, -1, -1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert real_token_count({"input_ids": ids, "document_ids": doc, "attention_mask": mask}).item() == 4
    assert real_token_count({"input_ids": ids, "attention_mask": mask}).item() == 5
    assert real_token_count({"input_ids": ids, "token_mask": mask.bool()}).item() == 5
    ready_mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)  # a 4D attention mask says nothing about padding
    assert real_token_count({"input_ids": ids, "attention_mask": ready_mask}).item() == 8
    count = real_token_count({"input_ids": ids})
    assert torch.is_tensor(count) and count.item() == 8


def test_too_large_a_held_out_share_fails_clearly(tmp_path, corpus):
    args = make_args(tmp_path, "--batch_size", "16", "--accumulation_steps", "2", "--val_fraction", "0.9")
    with pytest.raises(UsageError, match=r"dataset too small: \d+ samples \(after holding out \d+ for validation; "
                                         r"lower --val_fraction\)"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")


def test_split_helpers(tmp_path):
    args = argparse.Namespace(val_fraction=0.25, seed=3, eval_interval=0)
    data = Recording(list(range(8)), skipped=2)
    items, val = _holdout(args, data, None)
    assert val == holdout_split(8, 0.25, 3)[1] and len(items) == 6 and items.skipped == 2
    assert sorted([items[i] for i in range(6)] + val) == list(range(8))
    items, val = _holdout(args, data, {"val_indices": [1, 5]})  # a resume file's split wins
    assert val == [1, 5] and [items[i] for i in range(6)] == [0, 2, 3, 4, 6, 7]
    with pytest.raises(Exception, match="holds out item 9"):
        _holdout(args, data, {"val_indices": [1, 9]})
    assert isinstance(_Items(data, [0]), torch.utils.data.Dataset)
    # about 10 validations per run, on steps the run logs anyway; an explicit interval as given
    assert resolve_eval_interval(args, 1000, 33) == 99 and resolve_eval_interval(args, 6, 3) == 3
    assert resolve_eval_interval(args, 100, 1) == 10 and resolve_eval_interval(args, 5, 1) == 1
    args.eval_interval = 7
    assert resolve_eval_interval(args, 1000, 33) == 7
    parsed = add_train_args(argparse.ArgumentParser()).parse_args([])
    assert parsed.val_fraction == 0.005 and parsed.eval_interval == 0


def test_loss_plot_draws_the_validation_loss(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    labels = []
    original = Axes.legend

    def spy(self, handles, names, **kwargs):
        labels.extend(names)
        return original(self, handles, names, **kwargs)

    monkeypatch.setattr(Axes, "legend", spy)
    history = [{"step": s, "loss": 5 / s, "lr": 1e-3, **({"val_loss": 6 / s} if s % 5 == 0 else {})}
               for s in range(1, 21)]
    path = save_loss_plot(history, tmp_path / "val.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["loss (last 0.2500)", "val loss (last 0.3000)", "learning rate (last 1.00e-03)"]
    json.dumps(history)  # the history stays plain JSON (it goes into the resume file)
