"""How closely each distilled student of a finished sweep fits its teacher's logits, on the
training split (unaugmented) and the test split, from the run dirs' eval_*.npz: mean norm
of the centred student and teacher logits (the scale τ=∞ and MSE ask the student to copy),
mean distance between them, and the correlation of the two norms over examples.
Train ≈ test distance means the student's shortfall is fit, not generalisation.

    python benchmarks/logit_fit.py runs/bn-kd-ln [--stage kd]

Used for the batch-norm studies in docs/reproductions.md ("Studies")."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def centred(z: np.ndarray) -> np.ndarray:
    return z - z.mean(1, keepdims=True)


def fit(run_dir: Path) -> dict[str, float]:
    out = {}
    for split in ("train", "test"):
        with np.load(run_dir / f"eval_{split}.npz") as e:
            if "teacher_logits" not in e:
                raise SystemExit(f"{run_dir}: eval_{split}.npz has no teacher logits (not a distilled run)")
            zs, zt = centred(e["logits"].astype(np.float64)), centred(e["teacher_logits"].astype(np.float64))
        ns, nt = np.linalg.norm(zs, axis=1), np.linalg.norm(zt, axis=1)
        out[f"{split} ‖z_s‖"], out[f"{split} ‖z_t‖"] = ns.mean(), nt.mean()
        out[f"{split} ‖z_s − z_t‖"] = np.linalg.norm(zs - zt, axis=1).mean()
        out[f"{split} corr(‖z_s‖, ‖z_t‖)"] = np.corrcoef(ns, nt)[0, 1] if ns.std() > 0 else float("nan")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--stage", default="kd", help="the sweep stage of the distilled students (default kd)")
    args = p.parse_args(argv)
    sweep = args.sweep_dir / "sweep.json"
    if not sweep.is_file():
        raise SystemExit(f"{args.sweep_dir} holds no sweep.json")
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in json.loads(sweep.read_text())["runs"]:
        if run["stage"] == args.stage and run["status"] == "done":
            groups[", ".join(f"{k}={v}" for k, v in run["labels"].items())].append(fit(Path(run["run_dir"])))
    if not groups:
        raise SystemExit(f"no finished run of stage {args.stage!r} in {sweep}")
    cols = ["train ‖z_s‖", "train ‖z_t‖", "train ‖z_s − z_t‖", "test ‖z_s − z_t‖", "test corr(‖z_s‖, ‖z_t‖)"]
    print("| run (mean over seeds) | seeds | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for name, fits in groups.items():
        print(f"| {name} | {len(fits)} | " + " | ".join(f"{np.mean([f[c] for f in fits]):.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
