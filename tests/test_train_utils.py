"""model/train_utils.py: LR schedule, optimizer groups, dtype handling, checkpoints and exact resume."""

import argparse

import pytest
import torch
from conftest import tiny_config
from pipeline_helpers import write_token_file

from model.checkpoint import CheckpointError, load_model
from model.dataset import PretrainDataset
from model.model import MiniMindForCausalLM
from model.train_utils import (
    add_train_args,
    compute_init,
    cosine_lr,
    make_logger,
    make_optimizer,
    save_loss_plot,
    train,
)


def make_args(tmp_path, *flags, **defaults):
    parser = argparse.ArgumentParser()
    add_train_args(parser, **defaults)
    return parser.parse_args(["--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "img"),
                              "--device", "cpu", "--num_workers", "0", "--log_interval", "1", *flags])


@pytest.fixture
def corpus(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = [[1, *torch.randint(3, 256, (int(n),), generator=g).tolist(), 2]
            for n in torch.randint(5, 60, (40,), generator=g)]
    return PretrainDataset(write_token_file(tmp_path / "corpus.bin", docs), seq_len=16)


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


def test_resume_after_a_kill_logs_the_same_losses(tmp_path, corpus):
    flags = ["--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "6", "--learning_rate", "3e-3",
             "--warmup_iters", "2", "--save_interval", "3", "--seed", "7"]
    # 6 straight steps
    args = make_args(tmp_path / "straight", *flags)
    straight = train(args, compute_init(args), fresh_model(), corpus, "pretrain_64")

    # 3 steps, then the process dies (after the step-3 save) ...
    args = make_args(tmp_path / "killed", *flags)

    def die_after_3(step, history):
        if step == 4:  # step 4 ran but was never saved: it must be redone identically
            raise Crash

    with pytest.raises(Crash):
        train(args, compute_init(args), fresh_model(), corpus, "pretrain_64", step_callback=die_after_3)
    # ... and a new process resumes from a differently initialised model and a disturbed RNG
    args = make_args(tmp_path / "killed", *flags, "--resume")
    rt = compute_init(args)
    torch.manual_seed(12345)
    resumed = train(args, rt, fresh_model(seed=99), corpus, "pretrain_64")

    assert [h["step"] for h in straight] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]  # history carried over in the resume file
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight]  # bit-for-bit
    a = torch.load(tmp_path / "straight" / "out" / "pretrain_64.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "out" / "pretrain_64.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
