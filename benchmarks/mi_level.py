"""Why Müller's mutual-information curve sits where it does (a few nats, not log N).

    python benchmarks/mi_level.py RUN_DIR [RUN_DIR ...] [--repeats 20] [--no-init] [--out DIR]

For each finished run that logged the probe (``mutual_information.every_steps > 0``) it
rebuilds the probe with kdlab's own code (``kdlab.training.probes.MutualInformationProbe``: the
same 2 × per_class training examples, the same L view ids), then computes Y = z_a − z_b
of the final model for *every* view the augmentation has (MNIST-1D ``shift1d``: 9) of
every probed example, so any number of draws is a table look-up. It reports

  a. the probe's in-sample estimate (the evaluated y_x is one of the L draws that form
     μ_x — what training logs) against a fresh (L+1)-th draw and a held-out view (one
     that is not among the example's L draws), and the estimator's L → ∞ value (μ_x
     and σ² over all views, each view evaluated with its own weight);
  b. the estimate against L, against N (subsampled examples, half per class), with the
     augmentation off and with narrower / wider shifts;
  c. the values: pooled within-example σ, the spread of the example means μ_x (overall
     and within each class), the signal-to-noise ratio and how many examples' means are
     more than 2σ from every other example's mean; a histogram of μ_x by class;
  d. Gaussian-channel bounds: 0.5·log(1 + Var(μ)/σ²), the class-split bound
     log 2 + mean_c 0.5·log(1 + Var(μ | c)/σ²), and the MI of the fitted Gaussian model
     itself (Monte Carlo);
  e. an independent estimate: scikit-learn's k-NN ``mutual_info_classif`` (Ross 2014)
     of the example index given Y, on the probe's N·L draws and on all distinct views.

Everything also for the network at initialisation (``torch.manual_seed(cfg.seed)`` then
``build_model``: an untrained network of the same architecture, not necessarily
bit-identical to the run's step-0 weights) unless ``--no-init``.
Prints tables; ``--out DIR`` writes DIR/mi_level.json and DIR/<run>_means.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.analysis.mutual_information import mutual_information  # noqa: E402
from kdlab.data import load_dataset  # noqa: E402
from kdlab.data.augment import Augmentation  # noqa: E402
from kdlab.models import build_model  # noqa: E402
from kdlab.runs import load_finished_model, load_run_config, read_metrics  # noqa: E402
from kdlab.training.evaluate import predict  # noqa: E402
from kdlab.training.probes import MutualInformationProbe  # noqa: E402


def view_table(model, probe: MutualInformationProbe, aug: Augmentation) -> np.ndarray:
    """(N, V): Y = z_a − z_b of ``model`` on every view of every probed example."""
    data, n, v = probe.data, len(probe.index), aug.num_views
    x = data.train_x[probe.index].repeat_interleave(v, dim=0)
    ids = torch.arange(v).repeat(n)
    logits = predict(model, data, aug.apply(x, ids), probe.cfg.eval_batch_size, bf16=probe.bf16)
    a, b = probe.classes
    return (logits[:, a] - logits[:, b]).view(n, v).double().numpy()


def exact_estimate(table: np.ndarray) -> float:
    """The estimator at L → ∞: μ_x, σ² over all (uniform) views, every view evaluated."""
    means = table.mean(axis=1)
    var = max(float(np.mean((table - means[:, None]) ** 2)), 1e-12)
    n = len(means)
    out = []
    for j in range(table.shape[1]):
        ld = -((table[:, j][:, None] - means[None, :]) ** 2) / (2 * var)
        peak = ld.max(axis=1, keepdims=True)
        lse = (peak + np.log(np.exp(ld - peak).sum(axis=1, keepdims=True)))[:, 0]
        out.append(np.mean(np.diagonal(ld) - lse + math.log(n)))
    return float(np.mean(out))


def draw(rng: np.random.Generator, table: np.ndarray, rows: np.ndarray, l: int):
    """L view ids per example, uniform with replacement (as Augmentation.sample)."""
    ids = rng.integers(0, table.shape[1], size=(len(rows), l))
    return ids, table[rows[:, None], ids]


def in_and_fresh(rng, table, rows, l):
    ids, values = draw(rng, table, rows, l)
    fresh = table[rows, rng.integers(0, table.shape[1], size=len(rows))]
    held = []  # a view not among this example's L draws (if there is one left)
    for r, row_ids in zip(rows, ids):
        left = np.setdiff1d(np.arange(table.shape[1]), row_ids)
        held.append(table[r, rng.choice(left)] if len(left) else np.nan)
    held = np.array(held)
    out = {"in_sample": mutual_information(values), "fresh": mutual_information(values, fresh),
           "distinct_views": float(np.mean([len(set(r)) for r in ids.tolist()]))}
    out["held_out_view"] = mutual_information(values, held) if not np.isnan(held).any() else float("nan")
    return out


def mean_sd(xs):
    xs = np.asarray(xs, dtype=float)
    return {"mean": float(np.mean(xs)), "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}


def sweep_l(table, labels, ls, repeats, seed):
    rows = np.arange(len(table))
    res = {}
    for l in ls:
        rng = np.random.default_rng([seed, l])
        reps = [in_and_fresh(rng, table, rows, l) for _ in range(repeats)]
        res[l] = {k: mean_sd([r[k] for r in reps]) for k in reps[0]}
    return res


def sweep_n(table, labels, ns, l, repeats, seed):
    res = {}
    for n in ns:
        rng = np.random.default_rng([seed, 1000 + n])
        reps = []
        for _ in range(repeats):
            rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 2, replace=False)
                                   for c in np.unique(labels)])
            reps.append(in_and_fresh(rng, table, rows, l))
        res[n] = {k: mean_sd([r[k] for r in reps]) for k in ("in_sample", "fresh")}
        res[n]["log_n"] = math.log(n)
        res[n]["exact_L_inf"] = None if n != len(table) else exact_estimate(table)
    return res


def describe(values: np.ndarray, labels: np.ndarray) -> dict:
    """σ, spread of means, SNR, separability and the Gaussian-channel bounds for (N, L)
    values (σ² pooled as the estimator pools it: over all N·L draws)."""
    means = values.mean(axis=1)
    sigma2 = float(np.mean((values - means[:, None]) ** 2))
    sigma = math.sqrt(sigma2)
    var_mu = float(np.var(means))
    within = {int(c): float(np.var(means[labels == c])) for c in np.unique(labels)}
    gaps = np.abs(means[:, None] - means[None, :])
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.min(axis=1)
    snr = var_mu / sigma2
    class_bound = math.log(len(within)) + float(np.mean([0.5 * math.log1p(v / sigma2) for v in within.values()]))
    return {
        "sigma": sigma, "sd_mu": math.sqrt(var_mu),
        "sd_mu_within_class": {c: math.sqrt(v) for c, v in within.items()},
        "mean_mu_by_class": {int(c): float(means[labels == c].mean()) for c in np.unique(labels)},
        "snr": snr, "snr_within_class": {c: v / sigma2 for c, v in within.items()},
        "gauss_bound": 0.5 * math.log1p(snr), "class_split_bound": class_bound,
        "n": len(means), "log_n": math.log(len(means)),
        "separable_2sigma": int(np.sum(nearest > 2 * sigma)), "separable_1sigma": int(np.sum(nearest > sigma)),
        "median_nearest_gap_over_sigma": float(np.median(nearest) / sigma),
        "examples_within_1sigma_of_own_mean": float(np.mean(np.abs(values - means[:, None]) < sigma)),
    }


def model_mi(means: np.ndarray, sigma: float, samples: int, seed: int) -> float:
    """I(X; Y) of the fitted model itself (X uniform, Y | x ~ N(μ_x, σ²)), Monte Carlo."""
    rng = np.random.default_rng(seed)
    n = len(means)
    total = []
    for _ in range(samples):
        y = means + sigma * rng.standard_normal(n)
        ld = -((y[:, None] - means[None, :]) ** 2) / (2 * sigma**2)
        peak = ld.max(axis=1, keepdims=True)
        lse = (peak + np.log(np.exp(ld - peak).sum(axis=1, keepdims=True)))[:, 0]
        total.append(np.mean(np.diagonal(ld) - lse + math.log(n)))
    return float(np.mean(total))


def knn(values: np.ndarray, ks, seed: int = 0) -> dict:
    """scikit-learn's k-NN estimate (Ross 2014) of I(example index; Y), in nats."""
    from sklearn.feature_selection import mutual_info_classif

    n, l = values.shape
    y = values.reshape(-1, 1)
    index = np.repeat(np.arange(n), l)
    return {k: float(mutual_info_classif(y, index, discrete_features=False, n_neighbors=k, random_state=seed)[0])
            for k in ks if k < l}


def figure(means, sigma, labels, classes, path: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins = np.linspace(means.min(), means.max(), 80)
    for c, name in zip(np.unique(labels), classes):
        ax.hist(means[labels == c], bins=bins, alpha=0.6, label=f"class {name}")
    lo = means.min()
    ax.errorbar([lo + 2 * sigma], [ax.get_ylim()[1] * 0.9], xerr=[[sigma], [sigma]], fmt="k|", capsize=4,
                label=f"±σ = {sigma:.2f} (pooled, L views)")
    ax.set_xlabel("μ_x = mean over the probe's views of z_a − z_b")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def analyse(label: str, model, probe: MutualInformationProbe, args, out_dir: Path | None) -> dict:
    torch.manual_seed(0)
    aug = probe.data.augmentation
    classes = probe.classes
    labels = np.repeat(np.arange(len(classes)), probe.cfg.mutual_information.per_class)
    table = view_table(model, probe, aug)
    views = probe.views.numpy()
    values = table[np.arange(len(table))[:, None], views]
    logged = probe(model)
    rep = {"label": label, "augmentation": aug.name, "num_views": aug.num_views,
           "probe_in_sample": mutual_information(values), "probe_call": logged,
           "probe_distinct_views_per_example": float(np.mean([len(set(r)) for r in views.tolist()])),
           "exact_L_inf": exact_estimate(table)}
    assert abs(rep["probe_in_sample"] - logged) < 1e-6, (rep["probe_in_sample"], logged)  # same values as the probe
    rng = np.random.default_rng(args.seed)
    fresh = table[np.arange(len(table)), rng.integers(0, aug.num_views, len(table))]
    rep["probe_fresh"] = mutual_information(values, fresh)
    rep["stats_probe_L"] = describe(values, labels)
    rep["stats_all_views"] = describe(table, labels)
    st = rep["stats_probe_L"]
    rep["model_mi_probe_fit"] = model_mi(values.mean(axis=1), st["sigma"], 100, args.seed)
    rep["model_mi_all_views_fit"] = model_mi(table.mean(axis=1), rep["stats_all_views"]["sigma"], 100, args.seed)
    rep["vs_L"] = sweep_l(table, labels, args.ls, args.repeats, args.seed)
    rep["vs_N"] = sweep_n(table, labels, args.ns, probe.cfg.mutual_information.views, args.repeats, args.seed)
    l = probe.cfg.mutual_information.views
    rows = np.arange(len(table))
    centre = table[:, aug.num_views // 2] if aug.num_views > 1 else table[:, 0]
    rep["augmentation_off"] = {"in_sample": mutual_information(np.repeat(centre[:, None], l, axis=1)),
                               "log_n": math.log(len(table)),
                               "distinct_means": int(len(np.unique(centre)))}
    shifts = {}
    if aug.one_d:
        for s in args.shifts:
            other = Augmentation(f"shift1d±{s}", pad_w=s, one_d=True)
            t = view_table(model, probe, other)
            rng = np.random.default_rng([args.seed, 7, s])
            reps = [in_and_fresh(rng, t, rows, l) for _ in range(args.repeats)]
            shifts[s] = {"num_views": other.num_views, **{k: mean_sd([r[k] for r in reps]) for k in
                                                          ("in_sample", "fresh")},
                         "exact_L_inf": exact_estimate(t), **{k: describe(t, labels)[k] for k in
                                                              ("sigma", "snr", "gauss_bound", "class_split_bound",
                                                               "separable_2sigma")}}
    rep["vs_shift"] = shifts
    rep["knn_probe_draws"] = knn(values, args.ks)
    rep["knn_all_views"] = knn(table, args.ks + [5, 8])
    from sklearn.feature_selection import mutual_info_classif

    rep["knn_class_label_probe_draws"] = float(mutual_info_classif(values.reshape(-1, 1), np.repeat(labels, l),
                                                                   discrete_features=False, n_neighbors=3,
                                                                   random_state=0)[0])
    if out_dir is not None:
        rep["figure"] = figure(values.mean(axis=1), st["sigma"], labels, classes,
                               out_dir / f"{label.replace('/', '_')}_means.png",
                               f"{label}: μ_x of {len(table)} examples, L = {l}; "
                               f"SNR {st['snr']:.0f}, Î = {logged:.2f} nats (log N = {math.log(len(table)):.2f})")
    return rep


def fmt(d):
    return f"{d['mean']:.3f}±{d['sd']:.3f}"


def print_report(rep: dict) -> None:
    st, sa = rep["stats_probe_L"], rep["stats_all_views"]
    print(f"\n=== {rep['label']} ({rep['augmentation']}: {rep['num_views']} distinct views; "
          f"probe draws {rep['probe_distinct_views_per_example']:.2f} distinct of L per example) ===")
    print(f"a. probe (in-sample, as logged)   {rep['probe_in_sample']:.3f} nats   (probe call {rep['probe_call']:.3f}; "
          f"exp(Î) = {math.exp(rep['probe_in_sample']):.1f} 'distinguishable examples' of {st['n']})")
    print(f"   fresh (L+1)-th draw evaluated  {rep['probe_fresh']:.3f}")
    print(f"   L → ∞ (all views, exact)       {rep['exact_L_inf']:.3f}      log N = {st['log_n']:.3f}")
    print("b. vs L (mean±sd over repeats)      in-sample      fresh          held-out view  distinct/ex")
    for l, r in rep["vs_L"].items():
        print(f"   L = {l:<3}                          {fmt(r['in_sample'])}  {fmt(r['fresh'])}  "
              f"{fmt(r['held_out_view']) if not math.isnan(r['held_out_view']['mean']) else '   (none left)  '}"
              f"  {r['distinct_views']['mean']:.2f}")
    print("   vs N (L as the probe)            in-sample      fresh          log N   L→∞")
    for n, r in rep["vs_N"].items():
        lim = f"{r['exact_L_inf']:.3f}" if r["exact_L_inf"] is not None else "  -  "
        print(f"   N = {n:<4}                         {fmt(r['in_sample'])}  {fmt(r['fresh'])}  {r['log_n']:.3f}   {lim}")
    off = rep["augmentation_off"]
    print(f"   augmentation off (identical views): {off['in_sample']:.3f} (log N {off['log_n']:.3f}; "
          f"{off['distinct_means']} distinct means)")
    if rep["vs_shift"]:
        print("   shift ±s   views  in-sample      fresh          L→∞     σ       SNR       0.5log(1+SNR)  class-split  sep>2σ")
        for s, r in rep["vs_shift"].items():
            print(f"   ±{s:<9} {r['num_views']:<6} {fmt(r['in_sample'])}  {fmt(r['fresh'])}  {r['exact_L_inf']:.3f}   "
                  f"{r['sigma']:<7.3f} {r['snr']:<9.1f} {r['gauss_bound']:<14.3f} {r['class_split_bound']:<12.3f} "
                  f"{r['separable_2sigma']}")
    for name, s in (("probe's L draws", st), ("all views", sa)):
        w = ", ".join(f"{k}: {v:.2f}" for k, v in s["sd_mu_within_class"].items())
        m = ", ".join(f"{k}: {v:.2f}" for k, v in s["mean_mu_by_class"].items())
        sw = ", ".join(f"{k}: {v:.1f}" for k, v in s["snr_within_class"].items())
        print(f"c. [{name}] σ = {s['sigma']:.3f}; sd(μ) = {s['sd_mu']:.3f} (class means {m}; within-class sd {w})")
        print(f"   SNR Var(μ)/σ² = {s['snr']:.1f} (within class {sw}); examples whose nearest other mean is "
              f"> 2σ away: {s['separable_2sigma']}/{s['n']}, > 1σ: "
              f"{s['separable_1sigma']}; median nearest gap {s['median_nearest_gap_over_sigma']:.3f}σ")
        print(f"d. [{name}] 0.5·log(1+SNR) = {s['gauss_bound']:.3f}; log 2 + mean_c 0.5·log(1+SNR_c) = "
              f"{s['class_split_bound']:.3f}; log N = {s['log_n']:.3f}")
    print(f"   MI of the fitted Gaussian model (Monte Carlo): probe fit {rep['model_mi_probe_fit']:.3f}, "
          f"all-views fit {rep['model_mi_all_views_fit']:.3f}")
    kp = ", ".join(f"k={k}: {v:.3f}" for k, v in rep["knn_probe_draws"].items())
    ka = ", ".join(f"k={k}: {v:.3f}" for k, v in rep["knn_all_views"].items())
    print(f"e. k-NN (sklearn mutual_info_classif) on the probe's N·L draws: {kp}")
    print(f"   k-NN on all N·{rep['num_views']} distinct views: {ka}")
    print(f"   k-NN I(class; Y) on the probe draws (k=3): {rep['knn_class_label_probe_draws']:.3f} (log 2 = 0.693)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=20, help="random draws per cell of the L / N / shift sweeps")
    parser.add_argument("--ls", type=int, nargs="+", default=[2, 5, 10, 20, 50])
    parser.add_argument("--ns", type=int, nargs="+", default=[100, 300, 600])
    parser.add_argument("--shifts", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-init", action="store_true", help="skip the untrained network")
    parser.add_argument("--out", type=Path, help="directory for mi_level.json and the histograms")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    for run in args.runs:
        cfg = load_run_config(run)
        if not cfg.mutual_information.every_steps:
            print(f"{run}: the run did not log the MI probe (mutual_information.every_steps = 0); skipped")
            continue
        data = load_dataset(cfg.data)
        probe = MutualInformationProbe(cfg, data, bf16=False)
        curve = [r["mutual_information"] for r in read_metrics(run, "mutual_information")]
        models = [("final", load_finished_model(run))]
        if not args.no_init:
            torch.manual_seed(cfg.seed)
            init = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
            models.append(("init", init.eval()))
        for which, model in models:
            rep = analyse(f"{Path(run).name}/{which}", model, probe, args, args.out)
            rep["logged_curve"] = {"first": curve[0], "last": curve[-1], "min": min(curve), "max": max(curve),
                                   "points": len(curve)} if curve else None
            if curve and which == "final":
                print(f"\nlogged curve of {run}: first {curve[0]:.3f}, min {min(curve):.3f}, "
                      f"max {max(curve):.3f}, last {curve[-1]:.3f} ({len(curve)} points)")
            print_report(rep)
            reports.append(rep)
    if args.out:
        (args.out / "mi_level.json").write_text(json.dumps(reports, indent=1, default=str))
        print(f"\nwrote {args.out / 'mi_level.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
