"""Knowledge distillation (model/distill.py, 7-distill_train.py): the loss equals the divergences computed
independently here (torch's kl_div, a hand-written JSD, the model's own CE), over the answer tokens only and however
it is chunked; the MoE balance loss of the student is in the step's loss; a distilled student gets closer to its
teacher; teacher and student of different tokenizers are refused in one line; a real 2-rank torchrun launch writes
out/distill_*.pth."""

import argparse
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config, tiny_model
from pipeline_helpers import sft_like_batch, write_token_file
from server_helpers import free_port

import data_process
from model import distill
from model.checkpoint import load_model, save_weights
from model.distill import DistillationModel, VocabularyMismatchError, check_same_vocabulary
from model.model import MiniMindForCausalLM
from model.train_utils import StepLogger, _accumulate, _NoLogger, add_train_args, compute_init

STUDENT = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
STUDENT_FLAGS = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1"]
ANSWER_TOKENS = [9, 1, 14, 4]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy machine a second thread per op costs
    many times the op itself; the previous count is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sft_batch(seed: int = 0, T: int = 16) -> dict:
    """4 SFT-like rows: labels -100 except each row's last ANSWER_TOKENS[i] positions."""
    return sft_like_batch(ANSWER_TOKENS, seed, T)


def pair(**student_overrides):
    teacher = tiny_model(seed=0)
    student = tiny_model(seed=1, **{**STUDENT, **student_overrides})
    return teacher, student


def answer_logits(model, batch) -> torch.Tensor:
    """(N, V) float64 logits at the positions that predict an answer token, found from the labels here."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    return logits[batch["labels"][:, 1:] != -100].double()


def reference_divergence(teacher_logits, student_logits, kind: str, temperature: float) -> torch.Tensor:
    """Mean per-token divergence, each written directly from its definition."""
    t = F.log_softmax(teacher_logits / temperature, -1)
    s = F.log_softmax(student_logits / temperature, -1)
    if kind == "forward":  # KL(teacher || student): kl_div(input=log q, target=log p)
        return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
    if kind == "reverse":
        return F.kl_div(t, s, log_target=True, reduction="none").sum(-1).mean()
    p, q = t.exp(), s.exp()
    m = (p + q) / 2
    return (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()


def reference_ce(student_logits, batch) -> torch.Tensor:
    return F.cross_entropy(student_logits, batch["labels"][:, 1:][batch["labels"][:, 1:] != -100])


def test_alpha0_t1_is_the_forward_kl_over_answer_tokens_and_chunking_changes_nothing(monkeypatch):
    teacher, student = pair()
    batch = sft_batch()
    want = reference_divergence(answer_logits(teacher, batch), answer_logits(student, batch), "forward", 1.0)
    model = DistillationModel(student, teacher, alpha=0.0, temperature=1.0, kl="forward").eval()
    assert model(**batch).loss.item() == pytest.approx(want.item(), rel=1e-5)
    n = sum(ANSWER_TOKENS)  # every answer token is predicted (the first by the prompt's last token)
    assert model(**batch, num_items_in_batch=1).loss.item() == pytest.approx(want.item() * n, rel=1e-5)

    # With grad: the one-chunk loss and gradient equal those of many recomputed chunks of 5 rows.
    model.train()
    grads = []
    for elements in (1 << 23, 5 * 256):
        monkeypatch.setattr(distill, "CHUNK_ELEMENTS", elements)
        student.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        grads.append([p.grad.clone() for p in student.parameters()])
    for one, chunked in zip(*grads):
        torch.testing.assert_close(one, chunked, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())  # frozen


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_each_divergence_and_the_alpha_mix_match_independent_sums(kind):
    teacher, student = pair()
    batch = sft_batch(seed=3)
    t_logits, s_logits = answer_logits(teacher, batch), answer_logits(student, batch)
    temperature, alpha = 2.0, 0.3
    div = reference_divergence(t_logits, s_logits, kind, temperature)
    want = alpha * reference_ce(s_logits, batch) + (1 - alpha) * temperature ** 2 * div
    model = DistillationModel(student, teacher, alpha=alpha, temperature=temperature, kl=kind).eval()
    assert model(**batch).loss.item() == pytest.approx(want.item(), rel=1e-5)
    pure = DistillationModel(student, teacher, alpha=0.0, temperature=temperature, kl=kind).eval()
    assert pure(**batch).loss.item() == pytest.approx(temperature ** 2 * div.item(), rel=1e-5)
    if kind == "jsd":
        assert 0 < div.item() < math.log(2)


def test_alpha1_is_plain_ce_for_labels_and_for_pretraining_targets():
    teacher, student = pair()
    model = DistillationModel(student, teacher, alpha=1.0, temperature=1.5).eval()
    batch = sft_batch(seed=5)
    assert model(**batch).loss.item() == pytest.approx(student(**batch).loss.item(), rel=1e-6)
    window = torch.randint(3, 256, (2, 17), generator=torch.Generator().manual_seed(6))
    pretrain = {"input_ids": window[:, :-1], "targets": window[:, 1:]}  # every position carries loss
    assert model(**pretrain).loss.item() == pytest.approx(student(**pretrain).loss.item(), rel=1e-6)


def test_moe_students_balance_loss_is_in_the_step_and_the_state_dict_is_the_students(tmp_path):
    teacher, student = pair(use_moe=True, spread=0.05)
    model = DistillationModel(student, teacher, alpha=0.5, temperature=1.5).train()
    assert set(model.state_dict()) == set(student.state_dict())  # what the loop saves: a plain student
    assert not teacher.training  # train() never wakes the teacher
    batch = sft_batch(seed=7)
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    # The reference: each micro-batch's summed loss over the step's answer tokens, plus the mean of their aux.
    total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
    want = 0.0
    for mb in micro:
        s_logits, t_logits = answer_logits(student, mb), answer_logits(teacher, mb).detach()
        n = s_logits.shape[0]
        div = reference_divergence(t_logits, s_logits, "forward", 1.5) * n
        ce = reference_ce(s_logits, mb) * n
        aux = student(**mb).aux_loss
        assert aux is not None and aux.item() > 0
        want = want + (0.5 * ce + 0.5 * 1.5 ** 2 * div) / total + aux / len(micro)
    student.zero_grad(set_to_none=True)
    want.backward()
    want_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    rt = compute_init(add_train_args(argparse.ArgumentParser()).parse_args(["--device", "cpu"]))
    log = StepLogger(rt, model, 1, 1, 0, [], _NoLogger())
    _accumulate(model, None, iter(micro), rt, rt.scaler, log, len(micro))
    assert log.loss_sum.item() == pytest.approx(want.item(), rel=1e-5)
    for got, ref in zip((p.grad for p in student.parameters()), want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_different_tokenizers_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(VocabularyMismatchError) as err:
        check_same_vocabulary(tiny_config(), tiny_config(vocab_size=128), "the teacher t.pth", "the student s.pth")
    assert "\n" not in str(err.value) and "256" in str(err.value) and "128" in str(err.value)
    family3 = tiny_config(qk_norm=True, rope_layout="half")  # same 256 tokens, MiniMind-3's tokenizer
    with pytest.raises(VocabularyMismatchError, match="MiniMind-3 tokenizer .* v1 one"):
        DistillationModel(tiny_model(**STUDENT), MiniMindForCausalLM(family3))

    # Through the script: a v1 teacher and a fresh student from flags with another vocabulary.
    teacher = tmp_path / "teacher.pth"
    save_weights(tiny_model().state_dict(), teacher, tiny_config())
    with pytest.raises(SystemExit) as exit_code:
        script_main()(["--teacher", str(teacher), *STUDENT_FLAGS, "--device", "cpu", "--out_dir", str(tmp_path)])
    assert exit_code.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and str(teacher) in message and "6,400 tokens" in message


def script_main():
    spec = importlib.util.spec_from_file_location("distill_train", ROOT / "7-distill_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def random_docs(seed: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 256, (int(k),), generator=g).tolist(), 2] for k in torch.randint(8, 40, (n,),
                                                                                                generator=g)]


def mean_kl_to_teacher(student, teacher, windows: torch.Tensor) -> float:
    """KL(teacher || student) per position at T = 1, over held-out windows, written out here."""
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=windows).logits.double(), -1)
        s = F.log_softmax(student(input_ids=windows).logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_distilled_student_is_closer_to_its_teacher(tmp_path, capsys):
    teacher_path, student_path = tmp_path / "teacher.pth", tmp_path / "student.pth"
    # Small layer weights: the teacher's next token hangs mostly on the current one, which a smaller student can
    # learn in a few dozen steps (a teacher of wide random layers is noise no student matches that fast).
    teacher = tiny_model(seed=0, spread=0.02, max_seq_len=16)
    save_weights(teacher.state_dict(), teacher_path, teacher.config)
    student = MiniMindForCausalLM(tiny_config(**STUDENT, max_seq_len=16))
    save_weights(student.state_dict(), student_path, student.config)
    data = write_token_file(tmp_path / "train.bin", random_docs(0, 120))
    held_out = torch.tensor([sum(random_docs(1, 40), [])[:16 * 12]]).view(12, 16)  # never trained on

    common = ["--teacher", str(teacher_path), "--data", "pretrain", "--data_path", str(data), "--device", "cpu",
              "--num_workers", "0", "--batch_size", "8", "--learning_rate", "1e-2", "--warmup_iters", "0", "--alpha", "0",
              "--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "img"), "--log_interval", "10"]
    script_main()([*common, "--init", str(student_path), "--max_steps", "40"])
    log = capsys.readouterr().out
    assert "step 40/40" in log and log.count("forward kl ") == 4  # the KL and CE after each of the 4 log lines
    out = tmp_path / "out" / "distill_32.pth"
    before = mean_kl_to_teacher(student, teacher, held_out)
    after = mean_kl_to_teacher(load_model(out, device="cpu"), teacher, held_out)  # strict: a plain student
    assert after < 0.5 * before, (before, after)
    assert (tmp_path / "img" / "distill_32_loss.png").exists()
    assert (tmp_path / "out" / "distill_32_metrics.jsonl").read_text().count("\n") == 4

    # --resume continues from the resume file (the student's state alone) to the new end.
    script_main()([*common, "--init", str(student_path), "--max_steps", "42", "--resume"])
    assert "resumed from" in capsys.readouterr().out


def test_torchrun_two_ranks_distil_sft_data(tmp_path):
    sft = tmp_path / "sft.bin"
    assert data_process.main(["sft", "--input", str(ROOT / "dataset" / "sft_sample.jsonl"), "--output", str(sft),
                              "--workers", "1"]) == 0
    teacher = tmp_path / "teacher.pth"
    config = tiny_config(vocab_size=6400, max_seq_len=128)
    save_weights(MiniMindForCausalLM(config).state_dict(), teacher, config)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "7-distill_train.py"), "--teacher", str(teacher), *STUDENT_FLAGS, "--max_seq_len", "128",
           "--data_path", str(sft), "--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "img"),
           "--device", "cpu", "--batch_size", "2", "--max_steps", "3", "--log_interval", "1", "--num_workers", "0",
           "--kl", "jsd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and proc.stdout.count("step 3/3") == 1  # rank 0 logs
    assert proc.stdout.count("jsd kl ") == 3
    student = load_model(tmp_path / "out" / "distill_32.pth", device="cpu")
    assert student.config.dim == 32 and student.config.vocab_size == 6400
