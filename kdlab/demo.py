"""``kdlab demo``: the main job on built-in data, in a few minutes on a laptop CPU.

The setting is the quick-scale regime rule's (docs/reproductions.md): MNIST-1D at its
standard size (4,000 training signals, generated locally) with 20,000 test signals (the
standard 1,000 and 19,000 more from the same generator: ``data.extra_test``), a batch-norm MLP
teacher ``mlp-160-160-160-bn`` and ``mlp-64-64-bn`` students (1/8 of its size, as Kim's
WRN-16-2 is of WRN-28-4), Kim et al.'s schedule compressed to 100 epochs (SGD 0.1,
Nesterov, weight decay 5e-4, lr ×0.1 at 50% and 75%). Students: CE, label smoothing, KL at
τ = 1, 4, 20, ∞ and MSE on logits (α = 1 for the KD students, Kim §4.1), each with the
same seeds (same initialisation and batch order per seed, so comparisons are paired).

The table: test accuracy (mean ± std over seeds), the share of the teacher–CE-student gap
each objective closes, the paired difference to CE (and in how many seeds it is positive),
test NLL, mean logit sum Σ_k z_k (Kim Fig. 2) and ‖z_s − z_t‖ (Kim Fig. 4), then a
one-line reading of the result.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .config import build_config, merge_dicts as _merge
from .errors import ConfigError
from .report import minimum_detectable_difference
from .runs import atomic_write_json, atomic_write_text
from .train import train

# (table label, run name, config changes). MSE uses the mean over B·K, as Kim et al.'s
# code (nn.MSELoss): at K = 10 its per-logit gradient is 10× theirs at K = 100.
STUDENTS = [
    ("CE", "ce", {"loss": {"alpha": 0.0}}),
    ("LS ε=0.1", "ls0.1", {"loss": {"alpha": 0.0, "smoothing": 0.1}}),
    ("KL τ=1", "kl-tau1", {"loss": {"alpha": 1.0, "kd": "kl", "tau": 1.0}}),
    ("KL τ=4", "kl-tau4", {"loss": {"alpha": 1.0, "kd": "kl", "tau": 4.0}}),
    ("KL τ=20", "kl-tau20", {"loss": {"alpha": 1.0, "kd": "kl", "tau": 20.0}}),
    ("KL τ=∞", "kl-tauinf", {"loss": {"alpha": 1.0, "kd": "kl", "tau": math.inf}}),
    ("MSE", "mse", {"loss": {"alpha": 1.0, "kd": "mse", "mse_reduction": "mean"}}),
]


def _base(out_dir: Path, epochs: int, num_samples: int, seed: int, extra_test: int = 0) -> dict:
    milestones = sorted({max(1, round(epochs * f)) for f in (0.5, 0.75)})
    return {
        "out_dir": str(out_dir), "seed": seed,
        "data": {"name": "mnist1d", "num_samples": num_samples, "extra_test": extra_test},
        "optim": {"epochs": epochs, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "schedule": "multistep", "milestones": milestones, "gamma": 0.1},
        "eval_every": max(1, epochs // 4), "eval_batch_size": 2000,
    }


def summarise(rows: list[dict], teacher: dict) -> list[dict]:
    """Per objective: seeds' test accuracies (%), mean/std, the gap to the teacher closed
    (relative to the CE student's mean), paired differences to CE by seed."""
    teacher_acc = 100 * teacher["final"]["test_acc"]
    by_label: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], {})[row["seed"]] = row["result"]
    ce = {seed: 100 * r["final"]["test_acc"] for seed, r in by_label["CE"].items()}
    ce_mean = float(np.mean(list(ce.values())))
    gap = teacher_acc - ce_mean
    out = []
    for label, results in by_label.items():
        acc = {seed: 100 * r["final"]["test_acc"] for seed, r in results.items()}
        values = np.array(list(acc.values()))
        diffs = [acc[s] - ce[s] for s in acc if s in ce]

        def mean_of(key):
            return float(np.mean([r["final"][key] for r in results.values()]))

        out.append({
            "label": label, "acc_by_seed": acc, "acc_mean": float(values.mean()),
            "acc_std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "gap_closed": (float(values.mean()) - ce_mean) / gap if gap > 0 else None,
            "vs_ce_mean": float(np.mean(diffs)), "vs_ce_wins": sum(d > 0 for d in diffs), "seeds": len(diffs),
            "nll": mean_of("test_nll"), "logit_sum": mean_of("test_logit_sum"),
            "logit_distance": mean_of("test_logit_distance"), "agreement": mean_of("test_agreement"),
            "time_s": float(sum(r["train_time_s"] for r in results.values())),
        })
    return out


def format_table(summary: list[dict], teacher: dict) -> str:
    head = ("| run | test acc (%) | gap closed | Δ vs CE (seeds better) | test NLL | mean Σ_k z_k | "
            "mean ‖z_s − z_t‖ | agreement w/ teacher | time (s) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    t = teacher["final"]
    lines.append(f"| teacher {teacher['model']} (seed 0) | {100 * t['test_acc']:.2f} | – | – | {t['test_nll']:.3f} | "
                 f"{t['test_logit_sum']:+.2f} | – | – | {teacher['train_time_s']:.0f} |")
    for s in summary:
        acc = f"{s['acc_mean']:.2f}" + (f" ± {s['acc_std']:.2f}" if s["acc_std"] is not None else "")
        closed = "–" if s["label"] == "CE" or s["gap_closed"] is None else f"{100 * s['gap_closed']:+.0f}%"
        versus = "–" if s["label"] == "CE" else f"{s['vs_ce_mean']:+.2f} ({s['vs_ce_wins']}/{s['seeds']})"
        lines.append(f"| {s['label']} | {acc} | {closed} | {versus} | {s['nll']:.3f} | {s['logit_sum']:+.2f} | "
                     f"{s['logit_distance']:.2f} | {s['agreement']:.4f} | {s['time_s']:.0f} |")
    return "\n".join(lines)


def _lead(best: dict, summary: list[dict]) -> str:
    """Whether the best mean's lead over the runner-up is resolved, by the recipes' paired rule:
    ahead in every seed, or a mean paired difference beyond twice its standard error."""
    others = [s for s in summary if s is not best]
    if not others:
        return ""
    second = max(others, key=lambda s: s["acc_mean"])
    seeds = sorted(set(best["acc_by_seed"]) & set(second["acc_by_seed"]))
    diffs = np.array([best["acc_by_seed"][k] - second["acc_by_seed"][k] for k in seeds])
    if len(diffs) < 2:
        return f", ahead of {second['label']} on one seed only (not resolved)"
    se = float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
    resolved = bool((diffs > 0).all() or diffs.mean() > 2 * se)
    return (f", ahead of {second['label']} by {diffs.mean():+.2f} ± {se:.2f} points paired over {len(diffs)} seeds: "
            + ("resolved" if resolved else "not resolved, so no single best objective here (these seeds would "
               f"have resolved a lead of about {minimum_detectable_difference(se):.2f} points or more)"))


def reading(summary: list[dict], teacher: dict) -> str:
    """One line: the gap, the highest mean and whether its lead is resolved, which objectives
    beat CE in every seed."""
    ce = next(s for s in summary if s["label"] == "CE")
    gap = 100 * teacher["final"]["test_acc"] - ce["acc_mean"]
    best = max(summary, key=lambda s: s["acc_mean"])
    always = [s["label"] for s in summary if s["label"] != "CE" and s["seeds"] and s["vs_ce_wins"] == s["seeds"]]
    never = [s["label"] for s in summary if s["label"] != "CE" and s["seeds"] and s["vs_ce_wins"] == 0]
    if gap <= 0:
        return (f"Reading: the CE student is not below the teacher here ({-gap:.1f} points above), so there is no "
                "gap for distillation to close.")
    line = (f"Reading: the teacher is {gap:.1f} points above the CE student; {best['label']} has the highest mean "
            f"({best['acc_mean']:.1f}%")
    if best["label"] != "CE" and best["gap_closed"] is not None:
        line += f", {100 * best['gap_closed']:.0f}% of the gap closed"
    line += ")" + _lead(best, summary)
    line += f"; better than CE in every seed: {', '.join(always) if always else 'none'}"
    if never:
        line += f"; worse than CE in every seed: {', '.join(never)}"
    return line + "."


def run_demo(out_dir: str | Path = "runs/demo", *, teacher_epochs: int = 100, student_epochs: int = 100,
             num_samples: int = 5000, extra_test: int = 19000, seeds: int = 5,
             teacher_model: str = "mlp-160-160-160-bn",
             student_model: str = "mlp-64-64-bn", progress: bool = True, log=print) -> dict:
    out_dir = Path(out_dir)
    for flag, value in (("--teacher-epochs", teacher_epochs), ("--student-epochs", student_epochs),
                        ("--seeds", seeds)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    started = time.perf_counter()
    total = 1 + len(STUDENTS) * seeds
    teacher_cfg = build_config(_merge(_base(out_dir, teacher_epochs, num_samples, 0, extra_test),
                                      {"name": "teacher", "model": {"name": teacher_model}}))
    log(f"[1/{total}] teacher {teacher_model} on MNIST-1D ({teacher_epochs} epochs) -> {teacher_cfg.run_dir()}")
    teacher = train(teacher_cfg, progress=progress, log=log)
    rows, number = [], 1
    for seed in range(seeds):
        for label, slug, extra in STUDENTS:
            number += 1
            cfg_dict = _merge(_base(out_dir, student_epochs, num_samples, seed, extra_test), extra)
            cfg_dict.update(name=f"student-{slug}", model={"name": student_model},
                            teacher={"runs": [teacher["run_dir"]]})
            cfg = build_config(cfg_dict)
            log(f"[{number}/{total}] student {student_model}, {label}, seed {seed} -> {cfg.run_dir()}")
            rows.append({"label": label, "seed": seed, "result": train(cfg, progress=progress, log=log)})
    summary = summarise(rows, teacher)
    table = format_table(summary, teacher)
    line = reading(summary, teacher)
    wall = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    caption = (f"MNIST-1D test split ({num_samples // 5 + extra_test:,} signals); teacher {teacher_model} (seed 0), students "
               f"{student_model}, {seeds} seed(s) each (mean ± std; Δ vs CE paired by seed); α = 1 for KD")
    atomic_write_text(out_dir / "demo_table.md", f"{caption}\n\n{table}\n\n{line}\n\nwall time: {wall:.0f} s\n")
    atomic_write_json(out_dir / "demo_results.json", {"teacher": teacher, "students": rows, "summary": summary,
                                                      "reading": line, "wall_time_s": wall})
    log(f"\n{caption}\n")
    log(table)
    log(f"\n{line}\nwall time {wall:.0f} s; runs and tables in {out_dir}/")
    return {"teacher": teacher, "students": rows, "summary": summary, "table": table, "reading": line,
            "wall_time_s": wall}
