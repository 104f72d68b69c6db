"""Sweep worker layout: how to split the cores between runs (processes × threads).

    python benchmarks/sweep_layout.py [--quick] [--layouts 1x2,2x1] [--runs N]

A grid is many independent runs, so the question is whether P processes with T torch
threads each (P·T = the cores) finish it sooner than one process using every core. For
two workloads — WRN-16-2 on 32×32×3 CIFAR-100-format images (convolution-heavy, as the
paper-scale recipes) and cnn1d-32 on MNIST-1D (a tiny model, as the quick recipes) —
it runs the same grid of N runs (seeds 0..N−1) through ``kdlab.sweep.run_sweep`` with
each layout, each time from scratch, and reports the grid's wall time and its aggregate
training throughput (training images of all runs / wall time, start-up and evaluation
included: what a user waits for).

Prints a table and writes benchmarks/results/sweep_layout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.recipes import Recipe  # noqa: E402
from kdlab.sweep import run_sweep  # noqa: E402

from train_speed import _cpu, write_cifar100  # noqa: E402


def workloads(tmp: Path, quick: bool) -> dict[str, dict]:
    """name -> the recipe's base config."""
    n_cifar = 1024 if quick else 4096
    write_cifar100(tmp / "cifar-100-python", n_cifar + 128, 256)
    n_1d = 8000 if quick else 20000
    return {
        "wrn-16-2 / cifar100-format": {
            "data": {"name": "cifar100", "root": str(tmp / "cifar-100-python"), "val_size": 128},
            "model": {"name": "wrn-16-2"}, "channels_last": True, "eval_batch_size": 256,
            "optim": {"epochs": 2, "batch_size": 128, "lr": 0.1, "milestones": [100]}, "eval_every": 2,
        },
        "cnn1d-32 / mnist1d": {
            "data": {"name": "mnist1d", "num_samples": n_1d, "val_size": 200},
            "model": {"name": "cnn1d-32"},
            "optim": {"epochs": 8 if quick else 20, "batch_size": 128, "lr": 0.05, "schedule": "cosine"},
            "eval_every": 4,
        },
    }


def run_layout(base: dict, runs: int, workers: int, threads: int, out: Path) -> tuple[float, int]:
    recipe = Recipe.model_validate({
        "id": "layout", "title": "sweep layout benchmark", "source": "benchmarks/sweep_layout.py",
        "scales": {"quick": {"seeds": list(range(runs)), "base": base, "stages": [{"name": "model"}]}},
    })
    started = time.perf_counter()
    manifest = run_sweep(recipe, "quick", out, workers=workers, threads=threads, progress=False, log=lambda *a: None)
    wall = time.perf_counter() - started
    failed = [r for r in manifest["runs"] if r["status"] != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed in layout {workers}x{threads}: {failed[0]['run_dir']}")
    images = 0
    for run in manifest["runs"]:
        result = json.loads((Path(run["run_dir"]) / "result.json").read_text())
        images += result["images_per_s"] * result["train_time_s"]
    return wall, round(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 6 minutes on 2 cores)")
    cores = os.cpu_count() or 1
    default_layouts = ",".join(f"{p}x{cores // p}" for p in range(1, cores + 1) if cores % p == 0)
    parser.add_argument("--layouts", default=default_layouts,
                        help=f"comma-separated PROCESSESxTHREADS (default here: {default_layouts})")
    parser.add_argument("--runs", type=int, help="runs per grid (default: twice the largest process count)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_layout.json"))
    args = parser.parse_args()
    try:
        layouts = [tuple(int(v) for v in item.lower().split("x")) for item in args.layouts.split(",")]
        if any(len(layout) != 2 or min(layout) < 1 for layout in layouts):
            raise ValueError
    except ValueError:
        parser.error(f"--layouts takes PROCESSESxTHREADS items like 1x2,2x1; got {args.layouts!r}")
    runs = args.runs or 2 * max(p for p, _ in layouts)
    started = time.perf_counter()
    rows = []
    print(f"{cores} cores ({_cpu()}), torch {torch.__version__}, {runs} runs per grid", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, base in workloads(tmp, args.quick).items():
            for workers, threads in layouts:
                wall, images = run_layout(base, runs, workers, threads, tmp / f"{name[:8]}-{workers}x{threads}")
                row = {"workload": name, "processes": workers, "threads": threads, "runs": runs,
                       "wall_s": wall, "train_images": images, "images_per_s": images / wall}
                rows.append(row)
                print(f"  {name:28s} {workers} × {threads}: {wall:6.1f} s, {row['images_per_s']:8.1f} img/s",
                      flush=True)
    for name in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == name]
        best = max(group, key=lambda r: r["images_per_s"])
        for r in group:
            r["relative_to_best"] = r["images_per_s"] / best["images_per_s"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu": _cpu(), "cores": cores,
              "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
              "rows": rows, "wall_time_s": time.perf_counter() - started}
    print()
    print("| workload | processes × threads | grid wall time (s) | aggregate images/s | vs best |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['processes']} × {r['threads']} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} "
              f"| {r['relative_to_best']:.2f} |")
    print(f"\nwall time {result['wall_time_s']:.0f} s; wrote {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
