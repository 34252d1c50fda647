"""model/train_utils.py: LR schedule, optimizer groups, dtype handling, checkpoints and exact resume."""

import argparse
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from model import train_utils
from model.checkpoint import CheckpointError, load_model
from model.model import MiniMindForCausalLM
from model.train_utils import (
    LOSS_BAND,
    LR_BAND,
    _fit_band,
    add_train_args,
    auto_log_interval,
    compute_init,
    cosine_lr,
    make_logger,
    make_optimizer,
    resolve_log_interval,
    save_loss_plot,
    train,
)


def make_args(tmp_path, *flags, **defaults):
    parser = argparse.ArgumentParser()
    add_train_args(parser, **defaults)
    return parser.parse_args(["--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "img"),
                              "--device", "cpu", "--num_workers", "0", "--log_interval", "1", *flags])


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(max_seq_len=16))


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    lrs = [cosine_lr(s, 100, 10, 1e-3, 1e-4) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lrs[100] == pytest.approx(1e-4) and min(lrs) == pytest.approx(1e-4)
    assert cosine_lr(55, 100, 10, 1e-3, 1e-4) == pytest.approx((1e-3 + 1e-4) / 2)


def test_optimizer_decays_matrices_only_and_skips_frozen_params():
    model = fresh_model()
    model.layers[0].attention.wq.weight.requires_grad_(False)
    opt = make_optimizer(model, 1e-3, 0.1, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.layers[0].attention.wq.weight) not in ids
    assert len(ids) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_runtime_autocasts_to_exactly_the_requested_dtype(tmp_path, dtype):
    rt = compute_init(make_args(tmp_path, "--dtype", dtype))
    assert rt.device.type == "cpu" and not rt.ddp and rt.is_master and rt.world_size == 1
    a = torch.randn(4, 4)
    with rt.autocast():
        assert (a @ a).dtype == getattr(torch, dtype)
    assert rt.scaler.is_enabled() == (dtype == "float16")  # loss scaling only for float16


def test_default_dtype_on_cpu_is_float32(tmp_path):
    args = make_args(tmp_path)
    compute_init(args)
    assert args.dtype == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_runs_in_fp32_and_bf16_and_saves_v1_weights(tmp_path, corpus, dtype):
    args = make_args(tmp_path, "--dtype", dtype, "--batch_size", "4", "--max_steps", "4", "--learning_rate", "1e-2",
                     "--save_interval", "2")
    rt = compute_init(args)
    model = fresh_model()
    history = train(args, rt, model, corpus, "pretrain_64")
    losses = [h["loss"] for h in history]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    weights = tmp_path / "out" / "pretrain_64.pth"
    state = torch.load(weights, weights_only=True)
    assert "tok_embeddings.weight" in state and not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    loaded = load_model(weights, tiny_config(max_seq_len=16), device="cpu")  # strict v1 load
    torch.testing.assert_close(loaded.norm.weight, model.norm.weight)
    assert (tmp_path / "img" / "pretrain_64_loss.png").stat().st_size > 1000


class Crash(Exception):
    pass


def kill_and_resume(tmp_path, corpus, flags) -> tuple[list, dict, list]:
    """6 straight steps; and the same run killed after its step-3 save (step 4 ran, unsaved), then resumed by a new
    process from a differently initialised model and a disturbed RNG. The final weights must be equal. Returns
    (straight history, the resume file's state at the kill, resumed history)."""
    args = make_args(tmp_path / "straight", *flags)
    straight = train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    args = make_args(tmp_path / "killed", *flags)

    def die_at_4(step, history):
        if step == 4:  # step 4 ran but was never saved: it must be redone identically
            raise Crash

    with pytest.raises(Crash):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64", step_callback=die_at_4)
    state = torch.load(tmp_path / "killed" / "out" / "pretrain_64.resume.pt", weights_only=True)
    args = make_args(tmp_path / "killed", *flags, "--resume")
    rt = compute_init(args)
    torch.manual_seed(12345)
    resumed = train(args, rt, fresh_model(seed=99), corpus, "pretrain_64")
    a = torch.load(tmp_path / "straight" / "out" / "pretrain_64.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "out" / "pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    return straight, state, resumed


def test_resume_after_a_kill_logs_the_same_losses(tmp_path, corpus):
    flags = ["--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "6", "--learning_rate", "3e-3",
             "--warmup_iters", "2", "--save_interval", "3", "--seed", "7"]
    straight, state, resumed = kill_and_resume(tmp_path, corpus, flags)
    assert state["step"] == 3
    assert [h["step"] for h in straight] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]  # history carried over in the resume file
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight]  # bit-for-bit


def test_resume_without_a_resume_file_fails_clearly(tmp_path, corpus):
    args = make_args(tmp_path, "--resume", "--max_steps", "1")
    with pytest.raises(CheckpointError, match="no resume file"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")


def test_too_small_dataset_fails_clearly(tmp_path, corpus):
    args = make_args(tmp_path, "--batch_size", "1000")
    with pytest.raises(ValueError, match="dataset too small"):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")


def test_noop_logger_and_loss_plot(tmp_path):
    logger = make_logger(make_args(tmp_path), "run", {})
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    path = save_loss_plot([{"step": i, "loss": 5 / i, "lr": 1e-3} for i in range(1, 20)], tmp_path / "p" / "l.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("total", [1, 7, 19, 20, 44, 45, 59, 60, 74, 75, 299, 1000, 12_345, 1_000_000])
def test_default_log_interval_gives_20_to_45_lines_per_run(total):
    interval = auto_log_interval(total)
    lines = total // interval + (total % interval > 0)  # the last step always gets a line too
    if total < 20:
        assert interval == 1  # short runs: every step
    else:
        assert 20 <= lines <= 45, (interval, lines)
    args = argparse.Namespace(log_interval=None)
    assert resolve_log_interval(args, total) == interval
    args.log_interval = 7  # an explicit --log_interval is kept as given
    assert resolve_log_interval(args, total) == 7


def parse_without_log_interval(tmp_path, *flags):
    parser = add_train_args(argparse.ArgumentParser())
    return parser.parse_args(["--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "img"),
                              "--device", "cpu", "--num_workers", "0", *flags])


def test_default_log_interval_and_closing_list_of_written_files(tmp_path, corpus, capsys):
    args = parse_without_log_interval(tmp_path, "--batch_size", "2", "--max_steps", "60")
    assert args.log_interval is None
    history = train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    assert [h["step"] for h in history] == list(range(2, 61, 2))  # 60 steps: every 2nd, 30 lines
    out = capsys.readouterr().out
    assert "logging every 2 steps (and at least every 30 s)" in out
    assert out.count("step ") == 30
    # the log ends with one block naming every file written, and those files exist
    block = out.rstrip().splitlines()[-5:]
    assert block[0] == "wrote:"
    written = [Path(line.split()[-1]) for line in block[1:]]  # "  {what}  {path}"
    assert [p.name for p in written] == ["pretrain_64.pth", "pretrain_64.resume.pt", "pretrain_64_metrics.jsonl",
                                         "pretrain_64_loss.png"]
    assert all(p.is_file() for p in written)


def test_progress_lines_by_time_leave_the_history_alone(tmp_path, corpus, capsys, monkeypatch):
    flags = ["--batch_size", "2", "--max_steps", "6", "--log_interval", "3"]
    args = make_args(tmp_path / "plain", *flags)
    plain = train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    assert capsys.readouterr().out.count("step ") == 2  # steps 3 and 6

    monkeypatch.setattr(train_utils, "LOG_EVERY_S", 0.0)  # every step is "30 s after the last line"
    args = make_args(tmp_path / "timed", *flags)
    timed = train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")
    out = capsys.readouterr().out
    assert [f"step {s}/6" in out for s in range(1, 7)] == [True] * 6  # a line at every step ...
    assert timed == plain  # ... but the history (and so the resume file and the plot) has the interval's only
    assert [h["step"] for h in timed] == [3, 6]


def test_loss_and_lr_each_get_their_own_band_of_the_plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # DPO's shape: both fall together, which on two auto-scaled axes drew one line over the other
    losses = [0.6893, 0.6833, 0.6762, 0.6734, 0.6635, 0.6647]
    lrs = [cosine_lr(s, 60, 0, 5e-6, 5e-7) for s in range(10, 61, 10)]
    fig, ax = plt.subplots()
    ax2 = ax.twinx()
    _fit_band(ax, losses, LOSS_BAND)
    _fit_band(ax2, lrs, LR_BAND, floor=0.0)

    def height(axis, v):  # a value's position as a fraction of the plot's height
        lo, hi = axis.get_ylim()
        return (v - lo) / (hi - lo)

    assert min(height(ax, v) for v in losses) == pytest.approx(LOSS_BAND[0])
    assert max(height(ax2, v) for v in lrs) == pytest.approx(LR_BAND[1])
    assert LR_BAND[1] < LOSS_BAND[0]  # so the curves cannot cross
    assert height(ax2, 0.0) == pytest.approx(LR_BAND[0])  # the LR axis starts at 0
    assert all(LOSS_BAND[0] - 0.05 <= height(ax, t) <= LOSS_BAND[1] + 0.05 for t in ax.get_yticks())
    plt.close(fig)


@pytest.mark.parametrize("history", [[{"step": 40, "loss": 8.68, "lr": 2e-4}], [{"step": 1, "loss": 3.0}],
                                     [{"step": s, "loss": 9 - s / 10} for s in range(1, 4)]],
                         ids=["single-point", "no-lr", "no-lr-3-points"])
def test_loss_plot_of_few_points(tmp_path, history):
    path = save_loss_plot(history, tmp_path / "few.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_loss_plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
