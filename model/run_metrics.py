"""What every training stage records besides its weights: the held-out split and the per-run metrics file.

- `holdout_split(n, fraction, seed)`: which items (windows, packed conversations, DPO pairs) are held out for the
  validation loss. It depends on (n, fraction, seed) alone, so every rank computes the same split without talking
  to the others, and the resume file stores it so a resumed run validates on exactly the same items.
- `MetricsFile`: out/{run}_metrics.jsonl, one JSON object per log step, appended and flushed line by line (a killed
  run keeps every line it logged). A resumed run first drops the lines logged after the step it resumes from (the
  killed run logged them, the resumed run logs them again), then appends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of n items: round(n * fraction) held out, at least one when fraction > 0,
    never all of them. fraction 0 holds out nothing. The held-out items are a seeded random choice (not the file's
    tail, which is often one source or one length), listed in increasing order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or n < 2:
        return list(range(n)), []
    k = min(max(1, round(n * fraction)), n - 1)
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    held = torch.randperm(n, generator=g)[:k].sort().values.tolist()
    return items_left(n, held), held


def items_left(n: int, held: list[int]) -> list[int]:
    """The indices 0..n-1 not in `held`, in order: the training items of a split."""
    held_set = set(held)
    return [i for i in range(n) if i not in held_set]


def _finite(value):
    """JSON has no NaN/Infinity; write them as null rather than produce a line other tools cannot parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile:
    """out/{run}_metrics.jsonl: `log(record)` appends one line and flushes it. Only rank 0 writes (is_master)."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, is_master: bool = True):
        self.path = Path(path)
        self.is_master = is_master
        if not is_master:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._rewrite([])  # a new run starts a new file
        else:
            self._rewrite(self._lines_up_to(resume_step))

    def _lines_up_to(self, step: int) -> list[str]:
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        return kept

    def _rewrite(self, lines: list[str]) -> None:
        """Atomically replace the file with `lines` (temp file, fsync, rename)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.is_master:
            return
        line = json.dumps({k: _finite(v) for k, v in record.items()}, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read(self) -> list[dict]:
        """Every record in the file (tests, plots)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
