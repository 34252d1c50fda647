"""benchmark.py runs end to end (CPU smoke mode) and reports a measured row per preset and stage."""

import os
import re
import subprocess
import sys

from conftest import ROOT

ROW = re.compile(r"^\| (minimind-[\w-]+) \| ([\d.]+M) \| ([\w-]+) \| ([\d,.]+) \| [^|]+ \| [^|]+ \| ([\d.]+)% \|", re.M)


def test_benchmark_reports_a_row_per_preset_and_stage():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "--presets", "minimind-v1-small", "minimind-v1-moe",
         "--stages", "pretrain", "sft", "sft-padded", "--device", "cpu", "--steps", "1", "--warmup", "0",
         "--batch_size", "2", "--max_seq_len", "128"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = {(m.group(1), m.group(3)): (m.group(2), float(m.group(4).replace(",", "")), float(m.group(5)))
            for m in ROW.finditer(out.stdout)}
    assert set(rows) == {(p, s) for p in ("minimind-v1-small", "minimind-v1-moe")
                         for s in ("pretrain", "sft", "sft-padded")}
    assert rows[("minimind-v1-small", "pretrain")][0] == "26.9M" and rows[("minimind-v1-moe", "sft")][0] == "96.1M"
    assert all(tok_s > 0 for _, tok_s, _ in rows.values())
    for preset in ("minimind-v1-small", "minimind-v1-moe"):
        assert rows[(preset, "pretrain")][2] == 0.0
        # packing leaves only a window's tail empty; one padded conversation per row leaves most of it
        assert rows[(preset, "sft")][2] < 15.0 < rows[(preset, "sft-padded")][2]
    assert "minimind-v1-small sft: wall-clock per real token" in out.stdout
