"""Coverage of kdlab's bootstrap intervals of the calibration metrics, on simulated models.

    python benchmarks/bootstrap_coverage.py [--quick] [--ns 1000,10000] [--reps 200,100]
        [--resamples 200] [--scales 1,0.6,1.5] [--truth-examples 1000000] [--seed 0] [--out FILE]

The study behind docs/operations.md, "Bootstrap intervals of the calibration metrics".
A 10-class model whose logits are z ~ N(0, 4·I₁₀) and whose labels are drawn from
softmax(a·z): a = 1 is calibrated (every binned error is 0), a < 1 over-confident (the
labels are less predictable than the model says; 0.6 by default), a > 1 under-confident
(1.5). For each sample size n, model and repetition, n fresh examples are drawn and every
metric of ``kdlab.analysis.calibration.CALIBRATION_METRICS`` gets its 95% interval from
kdlab's own ``bootstrap_interval`` (``--resamples`` resamples, the same resamples for
both methods), with

- ``method="percentile"``: [q_lo, q_hi], what kdlab reported before 2026-11-30;
- ``method="basic"``: the basic (reverse-percentile) interval widened to include the
  value and clipped to ``METRIC_RANGE``, what kdlab reports now;

and, derived from those two, the unwidened basic interval [2θ̂ − q_hi, 2θ̂ − q_lo] (clipped)
and the hull of the two intervals (θ̂ ± the larger quantile distance, clipped).

The truth each interval should cover is the metric of the model's population: the same
estimator on ``--truth-examples`` (10⁶) fresh examples with every label indicator 1[y = k]
replaced by its probability softmax(a·z)_k — for the top-label binned errors (ECE, MCE,
adaptive ECE) the correctness 1[y = ŷ] by the probability of the predicted class, for the
classwise ECE 1[y = k] by softmax(a·z)_k in each class's bins, for accuracy, NLL and Brier
the expectation over the label (Brier: Σ_k p_k² − 2 Σ_k q_k p_k + 1, which keeps the
label's own variance). With indicators these functions equal kdlab's metrics (checked at
start); a second population from another seed gives the truth's Monte Carlo error.

Reported per (n, model, metric): the share of repetitions whose interval covers the truth
(with the share of intervals wholly above / below it), the share that contains their own
value θ̂, the mean width, the truth and the mean and spread of θ̂. A coverage from R
repetitions has a Monte Carlo standard error of about √(p(1 − p)/R) (0.015 for p = 0.95,
R = 200). Prints Markdown tables and writes benchmarks/results/bootstrap_coverage.json;
``--quick`` (4 repetitions, 50 resamples, a 10⁵-example truth: a smoke run of seconds)
writes nothing unless ``--out`` is given. Run it single-threaded (OMP_NUM_THREADS=1): the
work is many small metric evaluations, and the statistics do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.analysis.calibration import (  # noqa: E402
    CALIBRATION_METRICS,
    METRIC_RANGE,
    bootstrap_interval,
    confidence_bins,
    ece_of_confidence,
)
from kdlab.device import cpu_name  # noqa: E402
from kdlab.version import __version__ as kdlab_version  # noqa: E402

CLASSES = 10
LOGIT_SD = 2.0  # z ~ N(0, 4·I)
N_BINS = 15  # the metrics' default, what calibration_report uses
LEVEL = 0.95
BINNED = ("ece", "adaptive_ece", "classwise_ece", "mce")
SMOOTH = ("accuracy", "nll", "brier")
METHODS = ("percentile", "basic", "basic_unwidened", "hull")
LABELS = {"accuracy": "accuracy", "ece": "ECE", "mce": "MCE", "adaptive_ece": "adaptive ECE",
          "classwise_ece": "classwise ECE", "nll": "NLL", "brier": "Brier"}


def model_name(scale: float) -> str:
    return "calibrated" if scale == 1 else "over-confident" if scale < 1 else "under-confident"


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def draw(rng: np.random.Generator, n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """n examples of the model: logits z ~ N(0, LOGIT_SD²·I) and labels ~ softmax(scale·z)."""
    z = rng.normal(0.0, LOGIT_SD, (n, CLASSES))
    cdf = np.cumsum(softmax(scale * z), axis=1)
    labels = np.minimum((rng.random((n, 1)) > cdf).sum(1), CLASSES - 1)
    return z, labels


# --- the metrics with label indicators replaced by probabilities (the population's value) ---

def expected_metrics(logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Every metric of CALIBRATION_METRICS, with the one-hot label matrix replaced by
    ``target`` (N, K): with one-hot rows these are kdlab's estimators, with rows
    softmax(a·z) their expectation over the labels bin by bin (the population value when N
    is large)."""
    p = softmax(logits)
    pred = p.argmax(1)
    rows = np.arange(len(p))
    confidence, correct = p[rows, pred], target[rows, pred]
    bins = confidence_bins(confidence, correct, N_BINS)
    gaps = np.abs(bins["accuracy"] - bins["confidence"])[bins["count"] > 0]
    conf_t, corr_t = torch.as_tensor(confidence), torch.as_tensor(correct)
    adaptive = 0.0
    for chunk in torch.tensor_split(torch.argsort(conf_t), N_BINS):  # as adaptive_calibration_error
        if len(chunk):
            adaptive += len(chunk) * abs(corr_t[chunk].mean().item() - conf_t[chunk].mean().item())
    return {
        "accuracy": float(correct.mean()),
        "ece": ece_of_confidence(confidence, correct, N_BINS),
        "mce": float(gaps.max()) if gaps.size else 0.0,
        "adaptive_ece": adaptive / len(p),
        "classwise_ece": float(np.mean([ece_of_confidence(p[:, k], target[:, k], N_BINS) for k in range(p.shape[1])])),
        "nll": float(-(target * np.log(p)).sum(1).mean()),
        "brier": float(((p ** 2).sum(1) - 2 * (target * p).sum(1) + target.sum(1)).mean()),
    }


def check_expected_metrics(seed: int) -> float:
    """Largest difference between expected_metrics on one-hot labels and kdlab's metrics."""
    z, labels = draw(np.random.default_rng([seed, 99]), 3000, 0.8)
    ours = expected_metrics(z, np.eye(CLASSES)[labels])
    worst = max(abs(ours[name] - fn(z, labels)) for name, fn in CALIBRATION_METRICS.items())
    if worst > 1e-9:
        raise SystemExit(f"expected_metrics differs from kdlab's metrics by {worst:.3g} on one-hot labels")
    return worst


def truth(scale: float, examples: int, seed: int) -> dict[str, float]:
    z = np.random.default_rng([seed, 7, int(scale * 1000)]).normal(0.0, LOGIT_SD, (examples, CLASSES))
    return expected_metrics(z, softmax(scale * z))


# --- one repetition ---

class Memo:
    """A metric that remembers its values: ``bootstrap_interval`` draws the same resamples
    for the same seed, so the second method's call costs no metric evaluations. The key is
    (sum of logits, sum of labels) of the rows; every metric here is invariant to the order
    of the rows, so equal keys mean equal values (barring a float coincidence)."""

    def __init__(self, fn):
        self.fn, self.values, self.hits = fn, {}, 0

    def __call__(self, logits, labels) -> float:
        key = (float(np.sum(logits)), int(np.sum(labels)), len(labels))
        if key in self.values:
            self.hits += 1
        else:
            self.values[key] = self.fn(logits, labels)
        return self.values[key]


def repetition(z: np.ndarray, labels: np.ndarray, resamples: int, seed: int) -> dict[str, dict]:
    """θ̂ and the four intervals of every metric on one sample."""
    out = {}
    for name, fn in CALIBRATION_METRICS.items():
        metric = Memo(fn)
        bounds = METRIC_RANGE[name]
        p_lo, p_hi = bootstrap_interval(metric, z, labels, resamples, LEVEL, seed, method="percentile")
        b_lo, b_hi = bootstrap_interval(metric, z, labels, resamples, LEVEL, seed, method="basic", bounds=bounds)
        if metric.hits < resamples:  # the basic call must have reused the percentile call's resamples
            raise RuntimeError(f"{name}: the two methods did not see the same resamples ({metric.hits} hits)")
        value = metric(z, labels)
        unwidened = (float(np.clip(2 * value - p_hi, *bounds)), float(np.clip(2 * value - p_lo, *bounds)))
        out[name] = {"value": value, "percentile": (p_lo, p_hi), "basic": (b_lo, b_hi),
                     "basic_unwidened": unwidened, "hull": (min(p_lo, b_lo), max(p_hi, b_hi))}
    return out


def summarise(reps: list[dict], truths: dict[str, float]) -> dict[str, dict]:
    out = {}
    for name in CALIBRATION_METRICS:
        values = np.array([r[name]["value"] for r in reps])
        entry = {"truth": truths[name], "mean_value": float(values.mean()),
                 "sd_value": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        for method in METHODS:
            lo, hi = (np.array([r[name][method][i] for r in reps]) for i in (0, 1))
            t = truths[name]
            entry[method] = {"coverage": float(((lo <= t) & (t <= hi)).mean()),
                             "above_truth": float((lo > t).mean()), "below_truth": float((hi < t).mean()),
                             "contains_value": float(((lo <= values) & (values <= hi)).mean()),
                             "mean_width": float((hi - lo).mean())}
        out[name] = entry
    return out


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def print_tables(rows: list[dict]) -> None:
    def arrow(cell: dict, key: str, fmt: str = ".2f") -> str:
        return f"{cell['percentile'][key]:{fmt}} → {cell['basic'][key]:{fmt}}"

    print("\nshare of repetitions whose interval covers the truth, percentile → basic (widened):\n")
    print("| n, repetitions | model | " + " | ".join(LABELS[m] for m in BINNED) + " |")
    print("|---|---|" + "---|" * len(BINNED))
    for row in rows:
        cells = " | ".join(arrow(row["metrics"][m], "coverage") for m in BINNED)
        print(f"| {row['n']:,}, {row['reps']} | {row['model']} | {cells} |")
    print("\nthe same for the smooth metrics, percentile → basic (widened):\n")
    print("| n, repetitions | model | " + " | ".join(LABELS[m] for m in SMOOTH) + " |")
    print("|---|---|" + "---|" * len(SMOOTH))
    for row in rows:
        cells = " | ".join(arrow(row["metrics"][m], "coverage") for m in SMOOTH)
        print(f"| {row['n']:,}, {row['reps']} | {row['model']} | {cells} |")
    print("\ncoverage of the unwidened basic interval and of the hull of both (basic unwidened / hull):\n")
    print("| n | model | " + " | ".join(LABELS[m] for m in CALIBRATION_METRICS) + " |")
    print("|---|---|" + "---|" * len(CALIBRATION_METRICS))
    for row in rows:
        cells = " | ".join(f"{row['metrics'][m]['basic_unwidened']['coverage']:.2f} / "
                           f"{row['metrics'][m]['hull']['coverage']:.2f}" for m in CALIBRATION_METRICS)
        print(f"| {row['n']:,} | {row['model']} | {cells} |")
    print("\nshare of intervals that contain their own value θ̂, percentile → basic (widened):\n")
    print("| n | model | " + " | ".join(LABELS[m] for m in CALIBRATION_METRICS) + " |")
    print("|---|---|" + "---|" * len(CALIBRATION_METRICS))
    for row in rows:
        cells = " | ".join(arrow(row["metrics"][m], "contains_value") for m in CALIBRATION_METRICS)
        print(f"| {row['n']:,} | {row['model']} | {cells} |")
    print("\nmean width, percentile / basic (widened) / hull; truth and mean θ̂:\n")
    print("| n | model | metric | percentile | basic | hull | truth | mean θ̂ (sd) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        for m in CALIBRATION_METRICS:
            c = row["metrics"][m]
            print(f"| {row['n']:,} | {row['model']} | {LABELS[m]} | {c['percentile']['mean_width']:.4f} | "
                  f"{c['basic']['mean_width']:.4f} | {c['hull']['mean_width']:.4f} | {c['truth']:.4f} | "
                  f"{c['mean_value']:.4f} ({c['sd_value']:.4f}) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 repetitions, 50 resamples, 10^5-example truth; writes no file unless --out")
    parser.add_argument("--ns", default="1000,10000", help="sample sizes (comma-separated)")
    parser.add_argument("--reps", default="200,100", help="repetitions per sample size (one number for all, or one per n)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per interval (kdlab's default)")
    parser.add_argument("--scales", default="1,0.6,1.5",
                        help="label temperatures a: labels ~ softmax(a·z); 1 calibrated, <1 over-, >1 under-confident")
    parser.add_argument("--truth-examples", type=int, default=1_000_000, help="examples of the population truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/bootstrap_coverage.json)")
    args = parser.parse_args()
    from tqdm import tqdm

    torch.set_num_threads(1)
    ns = _ints(args.ns)
    reps = _ints(args.reps)
    resamples, truth_examples = args.resamples, args.truth_examples
    if args.quick:
        reps, resamples, truth_examples = [4], 50, 100_000
    if len(reps) == 1:
        reps = reps * len(ns)
    if len(reps) != len(ns):
        parser.error(f"--reps needs one number or one per n ({len(ns)}), got {args.reps!r}")
    scales = [float(a) for a in args.scales.split(",")]
    out = args.out or (None if args.quick else str(Path(__file__).parent / "results" / "bootstrap_coverage.json"))

    started = time.perf_counter()
    check = check_expected_metrics(args.seed)
    truths, truth_error = {}, {}
    for a in tqdm(scales, desc="population truth", leave=False):
        truths[a] = truth(a, truth_examples, args.seed)
        other = truth(a, truth_examples, args.seed + 1)
        truth_error[a] = {m: abs(truths[a][m] - other[m]) for m in truths[a]}
    truth_s = time.perf_counter() - started

    rows = []
    with tqdm(total=sum(r * len(scales) for r in reps), desc="repetitions", unit="rep", smoothing=0.05) as bar:
        for n, n_reps in zip(ns, reps):
            for a in scales:
                bar.set_postfix(n=n, model=model_name(a))
                t0 = time.perf_counter()
                results = []
                for r in range(n_reps):
                    rng = np.random.default_rng([args.seed, n, int(a * 1000), r])
                    z, labels = draw(rng, n, a)
                    results.append(repetition(z, labels, resamples, int(rng.integers(2 ** 62))))
                    bar.update()
                rows.append({"n": n, "reps": n_reps, "scale": a, "model": model_name(a),
                             "wall_s": time.perf_counter() - t0, "metrics": summarise(results, truths[a])})
    wall = time.perf_counter() - started

    print(f"\nbootstrap coverage: z ~ N(0, {LOGIT_SD ** 2:g}·I{CLASSES}), labels ~ softmax(a·z), {resamples} resamples "
          f"per {LEVEL:.0%} interval, {N_BINS} bins, truth from {truth_examples:,} examples "
          f"(kdlab {kdlab_version}, torch {torch.__version__}, numpy {np.__version__}; {wall:.0f} s)")
    print_tables(rows)
    worst_truth = {m: max(truth_error[a][m] for a in scales) for m in CALIBRATION_METRICS}
    print("\ntruth, two populations' largest difference: "
          + ", ".join(f"{LABELS[m]} {v:.1e}" for m, v in worst_truth.items()))

    if out:
        result = {
            "study": "coverage of kdlab.analysis.calibration.bootstrap_interval (percentile vs basic)",
            "command": "python benchmarks/bootstrap_coverage.py " + " ".join(sys.argv[1:]),
            "settings": {"ns": ns, "reps": reps, "resamples": resamples, "level": LEVEL, "bins": N_BINS,
                         "classes": CLASSES, "logits": f"N(0, {LOGIT_SD ** 2:g}·I)", "scales": scales,
                         "labels": "softmax(a·z)", "truth_examples": truth_examples, "seed": args.seed,
                         "quick": args.quick, "methods": {
                             "percentile": "bootstrap_interval(method='percentile')",
                             "basic": "bootstrap_interval(method='basic', bounds=METRIC_RANGE): widened to the value",
                             "basic_unwidened": "[2θ̂ − q_hi, 2θ̂ − q_lo] clipped to METRIC_RANGE",
                             "hull": "[min of both lows, max of both highs]"}},
            "truth": {f"a={a:g} ({model_name(a)})": truths[a] for a in scales},
            "truth_two_population_difference": {f"a={a:g} ({model_name(a)})": truth_error[a] for a in scales},
            "truth_check_one_hot_max_difference": check,
            "rows": rows,
            "wall_s": wall, "truth_wall_s": truth_s,
            "versions": {"kdlab": kdlab_version, "python": platform.python_version(), "numpy": np.__version__,
                         "torch": torch.__version__},
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                    "OPENBLAS_NUM_THREADS")}},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, ensure_ascii=False, default=_json_default) + "\n")
        print(f"\nwrote {out}")
    return 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
