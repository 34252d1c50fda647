"""scripts/recipe_sweep.py on the bundled samples: two tiny equal-budget runs, scored on held-out SFT answers."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import ROOT

from model.checkpoint import load_model, load_tokenizer, read_checkpoint


def sweep_main():
    spec = importlib.util.spec_from_file_location("recipe_sweep", ROOT / "scripts" / "recipe_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_runs_side_by_side_in_bits_per_char(tmp_path):
    sweep = sweep_main()
    argv = ["--corpus", str(ROOT / "dataset" / "pretrain_sample.jsonl"), "--heldout",
            str(ROOT / "dataset" / "sft_sample.jsonl"), "--heldout_n", "5", "--runs", "cosine:", "wsd:--lr_schedule wsd",
            "--steps", "3", "--batch_size", "2", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
            "--max_seq_len", "64", "--val_fraction", "0.1", "--device", "cpu", "--out", str(tmp_path)]
    assert sweep.main(argv) == 0
    report = json.loads((tmp_path / "sweep.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in report["runs"]] == ["cosine", "wsd"]
    assert all(math.isfinite(r["heldout_bpc"]) and r["val_bpc_curve"] for r in report["runs"])
    assert (tmp_path / "sweep.png").is_file() and "| wsd | `--lr_schedule wsd` |" in (tmp_path / "sweep.md").read_text()

    # the table's figure, recomputed independently: summed next-token NLL / ln 2 / characters of the held-out text
    texts = sweep.heldout_texts(str(ROOT / "dataset" / "sft_sample.jsonl"), 5)
    tok = load_tokenizer()
    model = load_model(read_checkpoint(tmp_path / "wsd" / "pretrain_64.pth"), device="cpu").eval()
    nll = chars = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]])
            assert ids.shape[1] <= 65  # short answers: one window each
            logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)
            nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
            chars += len(tok.decode(ids[0, 1:]))
    assert report["runs"][1]["heldout_bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-4)

    # a sweep grows: another run in the same --out keeps the earlier rows; other settings are refused
    argv_more = [*argv[:argv.index("--runs")], "--runs", "linear:--lr_schedule linear", *argv[argv.index("--steps"):]]
    assert sweep.main(argv_more) == 0
    report = json.loads((tmp_path / "sweep.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in report["runs"]] == ["cosine", "wsd", "linear"]
    with pytest.raises(SystemExit) as exit_:
        sweep.main([*argv_more[:argv_more.index("--steps")], "--steps", "4", *argv_more[argv_more.index("--steps") + 2:]])
    assert exit_.value.code == 2
