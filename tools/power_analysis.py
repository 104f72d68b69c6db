"""Statistical power of the quick-scale claims (issue 25): how many seeds and how large a test
set each recipe needs for rule 6 to resolve a paired effect of a given size.

    python tools/power_analysis.py --eval-runs runs/kim-logits-quick [--effect 0.5] [--out FILE]

Reads every ``docs/results/*-quick.json`` (each claim's per-seed numbers are there) and writes
a Markdown table and ``docs/results/power_analysis.json``.

The model. A claim compares objectives a and b paired by seed: d_s = acc(a, s) − acc(b, s) on
the same n test examples. Its seed-to-seed variance has two parts,

    Var(d_s) = σ²_train + p_disc / n                                   (points², ×10⁴)

- σ²_train: how much the population accuracy difference of the two trained models moves with
  the seed (initialisation and data order) — only more seeds reduce it;
- p_disc / n: the finite test set. Given the two models, d_s is a mean over n i.i.d. examples
  of c_a − c_b ∈ {−1, 0, 1}, whose variance is p_disc − Δ² ≈ p_disc, the share of examples on
  which exactly one of the two models is right. Which examples those are changes with the seed
  (two seeds of one objective disagree on about as many examples as two objectives do), so
  this part also averages out over seeds — and shrinks with n.

The committed JSON hold accuracies, not per-example predictions, so p_disc is measured on run
dirs that kept their eval arrays (``--eval-runs``: students of several objectives and seeds,
``eval_test.npz``) as a ratio κ = p_disc / (err_a + err_b) over same-seed pairs of different
objectives, and applied to each claim's error rates. σ²_train is what the pooled observed
variance leaves (clipped at 0). Rule 6 resolves a true difference δ with 80% probability when
δ ≥ (2 + z₀.₈)·SE = 2.84·SE with SE² = (σ²_train + p_disc/n)/S over S seeds (normal
approximation); the tool gives the S needed at several n, and the S needed if σ²_train were
as large as its one-sided 90% upper bound (the pooled variance's χ² bound, minus nothing).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
Z = 2.0 + statistics.NormalDist().inv_cdf(0.8)  # rule 6's 2 SE plus 80% power: 2.8416

FASHION_TEST = 10000  # Fashion-MNIST's test set (all it has): kim-table5, muller-mnist
SMALL = 10.0  # points: claims with a larger |mean difference| (a method that fails) are resolved at any power
# and their variance (a failure mode's) says nothing about the small effects; they are left out of the pooling
ISSUE_RECIPES = ["kim-table2", "kim-fig3", "kim-logits", "kim-ensemble", "kim-table3", "kim-table4", "kim-table5",
                 "kim-table6", "kim-fig6", "muller-distill", "muller-mnist"]


def test_size(recipe: str) -> int:
    """Test examples of a recipe's quick scale, from its YAML: MNIST-1D's generator keeps a fifth
    of ``num_samples`` (1,000 of the standard 5,000) as test signals, plus ``data.extra_test``;
    Fashion-MNIST recipes use its whole test set."""
    import yaml

    path = ROOT / "kdlab" / "assets" / "recipes" / f"{recipe}.yaml"
    if not path.is_file():  # the studies of docs/studies/
        path = ROOT / "docs" / "studies" / f"{recipe}.yaml"
    spec = yaml.safe_load(path.read_text())
    data = spec["scales"]["quick"]["base"].get("data", {})
    if data.get("name") != "mnist1d":
        return FASHION_TEST
    return int(data.get("num_samples", 5000)) // 5 + int(data.get("extra_test", 0))


def discordance(eval_dirs: list[Path]) -> dict:
    """p_disc of same-seed pairs of different objectives, and κ = p_disc / (err_a + err_b)."""
    import yaml

    correct = {}
    for d in eval_dirs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        loss = cfg["loss"]
        label = "MSE" if loss.get("kd") == "mse" else f"KL τ={loss.get('tau')}"
        with np.load(d / "eval_test.npz") as f:
            correct[label, cfg["seed"]] = f["logits"].argmax(1) == f["labels"]
    pairs, same_objective = [], []
    for (la, sa), ca in correct.items():
        for (lb, sb), cb in correct.items():
            if (la, sa) < (lb, sb) and sa == sb and la != lb:
                pairs.append((float(np.mean(ca != cb)), float(2 - ca.mean() - cb.mean())))
            if (la, sa) < (lb, sb) and la == lb:
                same_objective.append(float(np.mean(ca != cb)))
    p = np.array(pairs)
    return {"runs": len(correct), "pairs": len(pairs), "n_test": int(len(next(iter(correct.values())))),
            "p_disc_mean": float(p[:, 0].mean()), "p_disc_range": [float(p[:, 0].min()), float(p[:, 0].max())],
            "p_disc_same_objective_other_seed": float(np.mean(same_objective)) if same_objective else None,
            "kappa": float(p[:, 0].sum() / p[:, 1].sum())}


def claims_of(path: Path) -> list[dict]:
    report = json.loads(path.read_text())
    out = []
    for table in report["tables"]:
        if table.get("kind") != "claims" or table.get("metric") != "test_acc":
            continue
        for c in table["claims"]:
            if c.get("n", 0) >= 2:
                seeds = c["seeds"]
                d = [c["a_by_seed"][str(s)] - c["b_by_seed"][str(s)] for s in seeds]
                out.append({"claim": c["claim"], "seeds": len(seeds), "mean_diff": float(np.mean(d)),
                            "sd": float(np.std(d, ddof=1)), "se": c["se"], "verdict": c["verdict"],
                            "err_a": 1 - c["mean_a"] / 100, "err_b": 1 - c["mean_b"] / 100})
    return out


def chi2_upper(variance: float, df: int, level: float = 0.9) -> float:
    """One-sided upper confidence bound of a normal variance with df degrees of freedom
    (Wilson–Hilferty approximation of the χ² quantile)."""
    z = statistics.NormalDist().inv_cdf(1 - level)
    q = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return variance * df / q


def seeds_needed(var_train: float, p_disc: float, n: int, effect: float) -> int:
    se_target = effect / Z
    return max(3, math.ceil((var_train + p_disc / n * 1e4) / se_target ** 2))


def analyse(results: Path, kappa: float, effect: float, sizes=(1000, 10000, 20000, 50000)) -> dict:
    recipes = {}
    for path in sorted(results.glob("*-quick.json")):
        recipe = path.name.removesuffix("-quick.json")
        claims = claims_of(path)
        if not claims:
            continue
        report = json.loads(path.read_text())
        n = test_size(recipe)
        for c in claims:
            c["p_disc"] = kappa * (c["err_a"] + c["err_b"])
            c["var_test"] = c["p_disc"] / n * 1e4
            c["mdd"] = Z * c["se"]
        small = [c for c in claims if abs(c["mean_diff"]) <= SMALL]
        seeds_now = max(c["seeds"] for c in claims)
        if not small:
            recipes[recipe] = {"n_test": n, "claims": claims, "seeds": seeds_now, "small_claims": 0, "in_issue": recipe in ISSUE_RECIPES,
                               "sweep_wall_time_s": report.get("sweep_wall_time_s")}
            continue
        var_obs = float(np.mean([c["sd"] ** 2 for c in small]))
        df = sum(c["seeds"] - 1 for c in small)
        var_test = float(np.mean([c["var_test"] for c in small]))
        p_disc = float(np.mean([c["p_disc"] for c in small]))
        var_train = max(0.0, var_obs - var_test)
        var_train_hi = max(0.0, chi2_upper(var_obs, df) - var_test)
        grow = [n] + [m for m in sizes if m > n] if recipe not in ("kim-table5", "muller-mnist") else [n]  # MNIST-1D can
        # generate more test signals; Fashion-MNIST has its 10k
        options = []
        for m in grow:
            s, s_hi = seeds_needed(var_train, p_disc, m, effect), seeds_needed(var_train_hi, p_disc, m, effect)
            options.append({"n_test": m, "seeds": s, "seeds_if_var_train_at_upper_bound": s_hi,
                            "mdd_at_3_seeds": Z * math.sqrt((var_train + p_disc / m * 1e4) / 3),
                            "mdd_at_10_seeds": Z * math.sqrt((var_train + p_disc / m * 1e4) / 10),
                            "wall_time_s_at_needed_seeds": (report.get("sweep_wall_time_s") or 0) * s / seeds_now})
        recipes[recipe] = {
            "n_test": n, "claims": claims, "seed_runs": report["runs_total"],
            "sweep_wall_time_s": report.get("sweep_wall_time_s"), "torch": report["hardware"].get("torch"),
            "seeds": seeds_now, "small_claims": len(small),
            "var_observed": var_obs, "df": df, "var_test": var_test, "var_train": var_train,
            "var_train_upper90": var_train_hi, "p_disc": p_disc, "test_share": var_test / var_obs if var_obs else None,
            "options": options, "in_issue": recipe in ISSUE_RECIPES}
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--eval-runs", required=True, help="a folder of student run dirs with eval_test.npz "
                        "(several objectives × seeds, e.g. runs/kim-logits-quick)")
    parser.add_argument("--effect", type=float, default=0.5, help="the paired effect to resolve, in points")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "power_analysis.json"))
    args = parser.parse_args()
    dirs = [Path(p) for p in sorted(glob.glob(str(Path(args.eval_runs) / "*")))
            if (Path(p) / "eval_test.npz").is_file() and "teacher" not in Path(p).name]
    if len(dirs) < 4:
        sys.exit(f"--eval-runs {args.eval_runs}: needs student run dirs with eval_test.npz (found {len(dirs)})")
    disc = discordance(dirs)
    recipes = analyse(Path(args.results), disc["kappa"], args.effect)
    print(f"discordance from {disc['runs']} runs ({disc['pairs']} same-seed pairs of objectives, "
          f"{disc['n_test']} test examples): p_disc {disc['p_disc_mean']:.3f} "
          f"({disc['p_disc_range'][0]:.3f}–{disc['p_disc_range'][1]:.3f}); same objective, other seed "
          f"{disc['p_disc_same_objective_other_seed']:.3f}; κ = p_disc / (err_a + err_b) = {disc['kappa']:.3f}\n")
    print(f"| recipe | seeds, n test now | small claims | sd of d (pts) | test-set part | training part (90% bound) | "
          f"seeds for {args.effect} pt at n test (if σ_train at its bound); wall time at the point estimate |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, r in recipes.items():
        if not r["small_claims"]:
            print(f"| {name} | {r['seeds']}, {r['n_test']:,} | 0 of {len(r['claims'])} | – | – | – | every effect "
                  f"> {SMALL:g} points |")
            continue
        opts = "; ".join(f"{o['n_test']:,}: {o['seeds']} ({o['seeds_if_var_train_at_upper_bound']}), "
                         f"{o['wall_time_s_at_needed_seeds'] / 60:.0f} min" for o in r["options"])
        print(f"| {name} | {r['seeds']}, {r['n_test']:,} | {r['small_claims']} of {len(r['claims'])} | "
              f"{math.sqrt(r['var_observed']):.2f} | {math.sqrt(r['var_test']):.2f} | {math.sqrt(r['var_train']):.2f} "
              f"({math.sqrt(r['var_train_upper90']):.2f}) | {opts} |")
    out = {"effect_points": args.effect, "z": Z, "discordance": disc, "recipes": recipes,
           "eval_runs": str(args.eval_runs), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
