"""benchmark.py runs end to end (CPU smoke mode) and reports a measured throughput row per preset."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_benchmark_reports_a_row_per_preset():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "--presets", "minimind-v1-small", "minimind-v1-moe",
         "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch_size", "1", "--max_seq_len", "16"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = {m.group(1): (m.group(2), float(m.group(3).replace(",", "")))
            for m in re.finditer(r"^\| (minimind-[\w-]+) \| ([\d.]+M) \| ([\d,.]+) \|", out.stdout, re.M)}
    assert set(rows) == {"minimind-v1-small", "minimind-v1-moe"}
    assert rows["minimind-v1-small"][0] == "26.9M" and rows["minimind-v1-moe"][0] == "96.1M"
    assert all(tok_s > 0 for _, tok_s in rows.values())
