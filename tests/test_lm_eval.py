"""`eval_ceval.py --harness lm_eval` on a small generated C-Eval folder: lm-evaluation-harness's `hf` model, run on an
exported transformers folder, scores the same prompts as our own harness on the .pth (token for token), so it
predicts the same letter for every question and reports the same accuracy; bad --model folders are refused."""

import csv
import json
import random

import pytest
import torch
from conftest import tiny_model

import eval_ceval
import export_model
from model.checkpoint import load_tokenizer, read_checkpoint, save_weights
from model.LMConfig import PRESETS, LMConfig
from model.model import MiniMindForCausalLM

pytest.importorskip("lm_eval")

TITLES = {"computer_network": "计算机网络", "logic": "逻辑学"}


def write_ceval(root):
    """C-Eval's layout, dev and val for two subjects, with one bad val row (an answer that is not a letter)."""
    rng = random.Random(0)
    for split, n in (("dev", 4), ("val", 5)):
        for subject in TITLES:
            rows = [[str(i), f"{subject}{split}第{i}题：" + "哪一项正确" * rng.randint(1, 4) + "？",
                     *(f"选项{rng.randint(0, 99)}" for _ in "ABCD"), rng.choice("ABCD")] for i in range(n)]
            if split == "val" and subject == "logic":
                rows.append(["99", "坏答案", "1", "2", "3", "4", "E"])
            path = root / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([["id", "question", "A", "B", "C", "D", "answer"], *rows])
    (root / "subject_mapping.json").write_text(
        json.dumps({k: [k, v, "STEM"] for k, v in TITLES.items()}, ensure_ascii=False), encoding="utf-8")
    return root


def minimind3_model():
    torch.manual_seed(0)
    small = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=6400,
                 max_seq_len=512)
    model = MiniMindForCausalLM(LMConfig(**{**PRESETS["minimind-3"], **small})).eval()
    with torch.no_grad():  # spread like a trained model's, so the four letters' logits are far apart
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "tok_embeddings" in name else 0.15)
    return model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_ceval(tmp_path_factory.mktemp("ceval-exam"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (.pth, exported folder)}: v1 as native Llama, MiniMind-3 as native Qwen3."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family, model, fmt in (("v1", tiny_model(vocab_size=6400, max_seq_len=512), "llama"),
                               ("minimind3", minimind3_model(), "qwen3")):
        ckpt = save_weights(model.state_dict(), root / f"full_sft_{family}.pth", model.config)
        folder = export_model.export(model, root / f"export-{family}", fmt, verify=False)
        out[family] = (ckpt, folder)
    return out


def run_both(tmp_path, data_dir, ckpt, folder, split, shots):
    common = ["--data_dir", str(data_dir), "--split", split, "--shots", str(shots), "--device", "cpu",
              "--batch_size", "4"]
    for name, extra in (("ours", ["--ckpt", str(ckpt)]), ("lm_eval", ["--harness", "lm_eval", "--model", str(folder)])):
        assert eval_ceval.main([*extra, *common, "--out_dir", str(tmp_path / name),
                                "--chart", str(tmp_path / f"{name}.png")]) == 0
    return {name: {f: json.loads((tmp_path / name / f).read_text(encoding="utf-8"))
                   for f in ("predictions.json", "summary.json")} for name in ("ours", "lm_eval")}


def expected_prompts(tokenizer, data_dir, split, shots, max_tokens):
    """{subject: {id: prompt ids}} as our harness builds them (eval_ceval.build_prompt)."""
    out = {}
    for subject, path in eval_ceval.subject_files(data_dir, "ceval", split).items():
        questions = eval_ceval.read_questions(path, [])[0]
        dev = eval_ceval.read_questions(data_dir / "dev" / f"{subject}_dev.csv", [])[0]
        out[subject] = {q.id: eval_ceval.build_prompt(tokenizer, TITLES[subject], q,
                                                      [s for s in dev if s.id != q.id or split != "dev"][:shots],
                                                      max_tokens)[0] for q in questions}
    return out


@pytest.mark.parametrize("family, split, shots", [("v1", "val", 0), ("v1", "val", 2), ("minimind3", "dev", 2)])
def test_lm_eval_scores_our_prompts_with_our_predictions(tmp_path, data_dir, models, family, split, shots):
    ckpt, folder = models[family]
    results = run_both(tmp_path, data_dir, ckpt, folder, split, shots)
    ours, theirs = results["ours"], results["lm_eval"]

    assert theirs["predictions.json"] == ours["predictions.json"]  # every question, the same letter
    assert theirs["summary.json"]["subjects"] == ours["summary.json"]["subjects"]
    assert theirs["summary.json"]["harness"] == "lm_eval" and ours["summary.json"]["harness"] == "minimind"
    lm_eval_results = json.loads((tmp_path / "lm_eval" / "lm_eval_results.json").read_text())["results"]
    group = lm_eval_results[f"minimind_ceval_{split}"]
    # lm-eval's own group accuracy (weighted by subject size) is our TOTAL
    assert group["acc,none"] == pytest.approx(ours["summary.json"]["total"]["accuracy"])
    assert group["sample_count"]["acc,none"] == ours["summary.json"]["total"]["total"] == (10 if split == "val" else 8)

    # the prompt lm-eval scored the letters after is our prompt, token for token
    tokenizer = load_tokenizer(None, read_checkpoint(ckpt).config)
    prompts = expected_prompts(tokenizer, data_dir, split, shots, 512)
    samples = json.loads((tmp_path / "lm_eval" / "lm_eval_samples.json").read_text(encoding="utf-8"))
    for subject, records in samples.items():
        assert {r["id"] for r in records} == set(prompts[subject])
        for r in records:
            assert tokenizer.encode(r["prompt"], add_special_tokens=False) == prompts[subject][r["id"]]
            assert r["prediction"] == "ABCD"[max(range(4), key=r["loglikelihoods"].__getitem__)]


def test_bad_model_folders_and_splits_are_refused(tmp_path, data_dir, models, capsys):
    args = ["--harness", "lm_eval", "--data_dir", str(data_dir), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        eval_ceval.main([*args, "--model", str(models["v1"][0])])  # a .pth, not a folder
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "minimind", "auto_map": {"AutoConfig": "x.y"}}))
    with pytest.raises(SystemExit) as exit_info:
        eval_ceval.main([*args, "--model", str(remote)])
    assert exit_info.value.code == 2 and "--trust_remote_code" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        eval_ceval.main([*args, "--model", str(models["v1"][1]), "--split", "test"])
    assert exit_info.value.code == 2 and "labelled splits only" in capsys.readouterr().err
