"""1-pretrain.py end to end: a real 2-process torchrun (gloo) run that shards data disjointly (the quick start is
run by test_readme_chain.py)."""

import json
import os
import subprocess
import sys
import textwrap

from pipeline_helpers import ROOT, write_token_file

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]

# Runs the real 1-pretrain.py under torchrun, recording which windows each rank reads and the weights it ends with.
LAUNCHER = textwrap.dedent("""
    import hashlib, json, os, runpy, sys
    sys.path.insert(0, {root!r})
    from model.dataset import PretrainDataset
    seen = []
    original = PretrainDataset.__getitem__
    def recording_getitem(self, index):
        seen.append(int(index))
        return original(self, index)
    PretrainDataset.__getitem__ = recording_getitem
    import model.train_utils as train_utils
    trained = {{}}
    original_train = train_utils.train
    def recording_train(args, rt, model, *rest, **kwargs):  # keeps each rank's model to hash its final weights
        trained["model"] = model
        kwargs.pop("tokenizer", None)  # its bits/char sample would add start-up reads to `seen`
        return original_train(args, rt, model, *rest, **kwargs)
    train_utils.train = recording_train
    sys.argv = ["1-pretrain.py", *sys.argv[1:]]
    runpy.run_path({script!r}, run_name="__main__")
    digest = hashlib.sha256()
    for key, value in sorted(trained["model"].state_dict().items()):
        digest.update(key.encode()); digest.update(value.detach().float().numpy().tobytes())
    with open(os.path.join({report!r}, f"rank{{os.environ['RANK']}}.json"), "w") as f:
        json.dump({{"seen": seen, "weights": digest.hexdigest()}}, f)
""")


def test_torchrun_two_ranks_shard_data_disjointly(tmp_path):
    docs = [[1, *range(3 + i, 30 + i), 2] for i in range(40)]
    data = write_token_file(tmp_path / "corpus.bin", docs)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT), script=str(ROOT / "1-pretrain.py"), report=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(launcher), *TINY, "--max_seq_len", "16", "--data_path", str(data), "--out_dir", str(tmp_path / "out"),
           "--images_dir", str(tmp_path / "img"), "--device", "cpu", "--batch_size", "4", "--accumulation_steps", "2",
           "--max_steps", "3", "--log_interval", "1", "--num_workers", "0",
           # no held-out items: validation reads would add to `seen` (test_train_loop_metrics.py covers 2 ranks)
           "--val_fraction", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["seen"]) == len(r1["seen"]) == 3 * 2 * 4  # steps x accumulation x batch
    assert not set(r0["seen"]) & set(r1["seen"])  # disjoint shards
    assert r0["weights"] == r1["weights"]  # gradients were all-reduced: both ranks hold the same model
    assert proc.stdout.count("step 3/3") == 1  # logging on rank 0 only
    assert "world size 2" in proc.stdout
    assert (tmp_path / "out" / "pretrain_64.pth").exists() and (tmp_path / "out" / "pretrain_64.resume.pt").exists()
