"""``RUN_DIR/metrics.jsonl``, written in one place: rank 0 alone appends a JSON line per
epoch and per probe step; on resume it keeps the lines of the epochs (and probe steps)
the checkpoint holds and drops what a killed process wrote after it (a partial last line
with a warning)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import warn
from ..runs import atomic_write_text, parse_metrics


class MetricsLog:
    def __init__(self, path: Path, main: bool):
        self.path, self.main = Path(path), main

    def resume(self, start_epoch: int, resumed_at: int) -> list[dict]:
        """Every line written so far (rank 0; [] elsewhere), after rewriting the file with
        those of the epochs done and the probe lines of the optimizer steps done."""
        if not self.main:
            return []
        previous = []
        if self.path.exists():
            previous, partial = parse_metrics(self.path)
            if partial:
                warn(f"{self.path}: dropped a partial last line (an interrupted write)")
        atomic_write_text(self.path, "".join(
            json.dumps(m) + "\n" for m in previous
            if m.get("epoch", 0) <= start_epoch or ("train_loss" not in m and m.get("step", math.inf) <= resumed_at)))
        return previous

    def write(self, record: dict) -> None:
        """Append one line (rank 0 only)."""
        if self.main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
