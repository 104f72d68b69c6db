"""Does bf16 autocast change accuracy? The same quick recipe in fp32 and in bf16, paired.

    python benchmarks/bf16_accuracy.py [--recipe muller-table2] [--out runs/bf16-check] [--workers 2]

Runs every run of the recipe's quick scale twice — as written (fp32) and with
``--set bf16=true`` (autocast for the model, losses in float32) — in one directory (the
two get different run hashes, so they sit side by side; finished runs are reused), then
pairs them by (axes, seed) and prints each pair's final test accuracy and the mean paired
difference with its standard error. It also reports the training throughput of each
precision, since bf16 is fast only where the hardware has it (GPUs; CPUs with
avx512_bf16 or AMX).

Prints a table and writes benchmarks/results/bf16_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.recipes import expand, load_recipe  # noqa: E402
from kdlab.sweep import run_sweep  # noqa: E402

from train_speed import _cpu  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="muller-table2", help="recipe id or YAML (its quick scale is used)")
    parser.add_argument("--out", default="runs/bf16-check", help="run directory for both precisions")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (processes sharing the cores)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "bf16_accuracy.json"))
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    out = Path(args.out).resolve()
    started = time.perf_counter()
    results = {}
    for precision, settings in (("fp32", []), ("bf16", ["bf16=true"])):
        manifest = run_sweep(recipe, "quick", out, workers=args.workers, settings=settings)
        bad = [r for r in manifest["runs"] if r["status"] != "done"]
        if bad:
            raise SystemExit(f"{len(bad)} {precision} run(s) did not finish, e.g. {bad[0]['run_dir']}")
        for run in expand(recipe, "quick", out, settings):
            result = json.loads((run.run_dir / "result.json").read_text())
            key = (run.stage, tuple(sorted(run.labels.items())), run.seed)
            results.setdefault(key, {})[precision] = result

    pairs = []
    for (stage, labels, seed), by in results.items():
        pairs.append({"stage": stage, "labels": dict(labels), "seed": seed,
                      "fp32_test_acc": by["fp32"]["final"]["test_acc"], "bf16_test_acc": by["bf16"]["final"]["test_acc"],
                      "fp32_images_per_s": by["fp32"]["images_per_s"], "bf16_images_per_s": by["bf16"]["images_per_s"]})
    diffs = [p["bf16_test_acc"] - p["fp32_test_acc"] for p in pairs]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else float("nan")
    speed = {p: sum(q[f"{p}_images_per_s"] for q in pairs) / len(pairs) for p in ("fp32", "bf16")}
    summary = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "machine": platform.machine(),
               "torch": torch.__version__, "recipe": recipe.id, "scale": "quick", "pairs": pairs,
               "mean_diff_bf16_minus_fp32": mean, "std_diff": sd, "stderr_diff": sd / math.sqrt(len(diffs)),
               "max_abs_diff": max(abs(d) for d in diffs), "mean_images_per_s": speed,
               "wall_time_s": time.perf_counter() - started}
    print()
    print("| run | seed | fp32 test acc (%) | bf16 test acc (%) | bf16 − fp32 (points) |")
    print("|---|---:|---:|---:|---:|")
    for p, d in zip(pairs, diffs):
        label = ", ".join(p["labels"].values()) or p["stage"]
        print(f"| {label} | {p['seed']} | {100 * p['fp32_test_acc']:.2f} | {100 * p['bf16_test_acc']:.2f} | {100 * d:+.2f} |")
    print(f"\nmean paired difference {100 * mean:+.2f} ± {100 * summary['stderr_diff']:.2f} points (s.e., "
          f"{len(diffs)} pairs); largest |difference| {100 * summary['max_abs_diff']:.2f} points")
    print(f"mean training throughput: fp32 {speed['fp32']:.0f} img/s, bf16 {speed['bf16']:.0f} img/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wall time {summary['wall_time_s']:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
