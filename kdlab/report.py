"""``kdlab report DIR``: tables with the paper's numbers beside ours, figures, hardware.

Reads ``DIR/sweep.json`` (written by ``kdlab sweep``), the recipe it names, and the run
dirs; writes ``DIR/report.md``, and ``DIR/report.html`` rendered from it by python-markdown
(self-contained: figures inlined as base64 PNG). Ours are mean ± std over seeds (std
omitted for one seed). A ``figures`` item draws its settings on shared axes, seeds
aggregated (``kdlab.compare``), with the table of the figures' numbers below them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from .errors import RunError
from .recipes import Recipe, ReportItem, RunSpec, expand, load_recipe
from .htmlpage import markdown_to_html
from .runs import atomic_write_json, atomic_write_text, read_json


CLAIMS_NOTE = ("Paired by seed (same seed = same initialisation and batch order): a − b per seed, its mean ± "
               "standard error (SE = the sample standard deviation of the per-seed differences / √seeds), and the "
               "seeds where the claim holds. Reproduced = the paper's sign in every seed or a mean beyond twice its "
               "standard error; opposite = the same the other way; else not resolved. MDD (80%) = the minimum "
               "detectable difference, (2 + z₀.₈)·SE ≈ 2.84·SE, in the table's units (accuracy in points): a true "
               "difference that large would pass the 2-SE test in 4 runs of 5 with this run's SE, so a claim not "
               "resolved rules out effects of about that size or more (normal approximation, and an estimate: with "
               "few seeds, 3 say, the SE is itself uncertain).")


def minimum_detectable_difference(se: float | None, threshold: float = 2.0, power: float = 0.8) -> float | None:
    """The minimum detectable difference (MDD) of a paired claim.

    Rule 6 of the quick-scale regime rule (docs/reproductions.md) calls a claim reproduced when
    the mean of the per-seed differences a − b exceeds ``threshold`` = 2 standard errors, SE =
    the sample standard deviation of those differences / √n_seeds (or has the paper's sign in
    every seed). The MDD is the true mean difference that this 2-SE test detects with
    probability ``power``, given the SE the run observed::

        MDD = (threshold + z_power) · SE = (2 + 0.8416) · SE ≈ 2.84 · SE   (power 0.8)

    with z_power the standard normal quantile (``statistics.NormalDist``: scipy is not among
    kdlab's dependencies). Normal approximation: with 3 seeds the SE is itself uncertain, so
    the MDD is an estimate. It is in the units of the claim's metric after the report item's
    ``scale`` (accuracy claims: points). None without a standard error (fewer than 2 seeds).
    See docs/reproductions.md, "Power analysis"."""
    if se is None:
        return None
    return (threshold + statistics.NormalDist().inv_cdf(power)) * se


def _axis_order(runs: list[RunSpec], axis: str) -> list[str]:
    return list(dict.fromkeys(r.labels[axis] for r in runs if axis in r.labels))


def _value(run: RunSpec, metric: str):
    """A number of a finished run: a key of result.json's ``final`` (e.g. ``test_acc``), or
    ``analysis.<dotted.path>`` into its analysis.json (e.g.
    ``analysis.temperature_scaling.ece_after``, ``analysis.projections.1.tightness.val``)."""
    if metric.startswith("analysis."):
        path = run.run_dir / "analysis" / "analysis.json"
        if not path.is_file():
            return None
        node = read_json(path)
        for part in metric.split(".")[1:]:  # dict keys, and list positions (projections.1.tightness.val)
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return None
        return float(node) if isinstance(node, (int, float)) else None
    path = run.run_dir / "result.json"
    if not path.is_file():
        return None
    return read_json(path)["final"].get(metric)


def _cells(item: ReportItem, runs: list[RunSpec], row_axis: str | None, col_axis: str | None):
    selected = [r for r in runs if r.stage == item.stage and all(r.labels.get(a) == v for a, v in item.where.items())]
    rows = _axis_order(selected, row_axis) if row_axis else [""]
    cols = _axis_order(selected, col_axis) if col_axis else [""]
    cells = {}
    for row in rows:
        for col in cols:
            values = [_value(r, item.metric) for r in selected
                      if (not row_axis or r.labels.get(row_axis) == row) and (not col_axis or r.labels.get(col_axis) == col)]
            found = [v * item.scale for v in values if v is not None]
            spread = (np.std(found) if item.spread == "std" else (min(found), max(found))) if found else None
            cells[row, col] = (np.mean(found), spread, len(found), len(values)) if found else (None, None, 0, len(values))
    return rows, cols, cells


def _seed_values(item: ReportItem, runs: list[RunSpec], row_axis: str | None, col_axis: str | None, rows, cols):
    """{(row, col): {seed: value}}: every finished run's number (times item.scale), so that
    comparisons can be paired by seed."""
    selected = [r for r in runs if r.stage == item.stage and all(r.labels.get(a) == v for a, v in item.where.items())]
    out = {}
    for row in rows:
        for col in cols:
            values = {}
            for r in selected:
                if (not row_axis or r.labels.get(row_axis) == row) and (not col_axis or r.labels.get(col_axis) == col):
                    value = _value(r, item.metric)
                    if value is not None:
                        values[r.seed] = value * item.scale
            out[row, col] = values
    return out


def _table_json(item: ReportItem, rows, cols, cells, seed_values) -> dict:
    """One table of the report as plain data (report.json)."""
    entries = []
    for row in rows:
        for col in cols:
            mean, spread, n, total = cells[row, col]
            paper = item.paper.get(row, {}).get(col if col else item.metric)
            entry = {"row": row, "col": col, "mean": mean, "n": n, "runs": total,
                     "by_seed": {str(k): v for k, v in sorted(seed_values[row, col].items())}, "paper": paper}
            if isinstance(spread, tuple):
                entry["min"], entry["max"] = spread
            elif spread is not None:
                entry["std"] = float(spread)
            entries.append(entry)
    return {"title": item.title, "kind": item.kind, "stage": item.stage, "metric": item.metric, "scale": item.scale,
            "rows_axis": item.rows if item.kind != "curve" else item.x,
            "cols_axis": item.cols if item.kind != "curve" else item.lines, "cells": entries}


def _claim_side(item: ReportItem, runs: list[RunSpec], side: dict[str, str], claim: str) -> dict[int, float | None]:
    """{seed: value} of the runs one side of a claim selects (item.where plus the side's labels,
    in the side's ``stage`` or the item's); a side that selects two runs of one seed is an error."""
    stage = side.get("stage", item.stage)
    labels = {**item.where, **{k: v for k, v in side.items() if k != "stage"}}
    chosen = [r for r in runs if r.stage == stage and all(r.labels.get(a) == v for a, v in labels.items())]
    if not chosen:
        raise RunError(f"claim {claim!r}: no run of stage {stage!r} has the labels {labels}")
    out: dict[int, float | None] = {}
    for r in chosen:
        if r.seed in out:
            raise RunError(f"claim {claim!r}: the labels {labels} select more than one run of seed {r.seed} in "
                           f"stage {stage!r}; name every axis")
        value = _value(r, item.metric)
        out[r.seed] = None if value is None else value * item.scale
    return out


def paired_verdict(diffs: list[float], weak: bool = False) -> tuple[str, float | None]:
    """The regime rule's verdict on per-seed differences a − b (docs/reproductions.md, rule 6):
    'reproduced' when every seed has the expected sign or the mean exceeds twice its standard
    error, 'opposite' for the same the other way, else 'not resolved' ('too few seeds' below 2).
    ``weak`` is a claim written with ≥: a tie (a − b = 0) counts as holding, so the sign test
    asks a − b ≥ 0 in every seed, and 'opposite' still needs a − b < 0 in every seed.
    Returns (verdict, standard error of the mean: sample SD of ``diffs`` / √n);
    ``minimum_detectable_difference`` of that SE is the effect the verdict could have resolved."""
    n = len(diffs)
    if n < 2:
        return "too few seeds", None
    d = np.asarray(diffs, dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(n))
    mean = float(d.mean())
    if ((d >= 0) if weak else (d > 0)).all() or mean > 2 * se:
        return "reproduced", se
    if (d < 0).all() or mean < -2 * se:
        return "opposite", se
    return "not resolved", se


def _claims(item: ReportItem, runs: list[RunSpec]) -> list[dict]:
    out = []
    for c in item.claims:
        a, b = _claim_side(item, runs, c.a, c.claim), _claim_side(item, runs, c.b, c.claim)
        seeds = sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None)
        diffs = [a[s] - b[s] for s in seeds]
        weak = "≥" in c.claim
        verdict, se = paired_verdict(diffs, weak=weak)
        holds = sum(d >= 0 if weak else d > 0 for d in diffs)
        out.append({"claim": c.claim, "a": c.a, "b": c.b, "seeds": seeds, "pending": len(a.keys() | b.keys()) - len(seeds),
                    "a_by_seed": {str(s): a[s] for s in seeds}, "b_by_seed": {str(s): b[s] for s in seeds},
                    "mean_a": float(np.mean([a[s] for s in seeds])) if seeds else None,
                    "mean_b": float(np.mean([b[s] for s in seeds])) if seeds else None,
                    "mean_diff": float(np.mean(diffs)) if diffs else None, "se": se,
                    "mdd": minimum_detectable_difference(se), "holds": holds,
                    "n": len(diffs), "verdict": verdict if diffs else "pending", "paper": c.paper})
    return out


def _claims_md(claims: list[dict]) -> str:
    lines = ["| claim | a | b | mean a − b ± SE | seeds where it holds | verdict | MDD (80%) | paper a − b |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for c in claims:
        if not c["n"]:
            lines.append(f"| {c['claim']} | – | – | – | – | pending | – | {_paper(c['paper'])} |")
            continue
        diff = f"{c['mean_diff']:+.2f}" + (f" ± {c['se']:.2f}" if c["se"] is not None else "")
        mdd = "–" if c.get("mdd") is None else f"{c['mdd']:.2f}"
        lines.append(f"| {c['claim']} | {c['mean_a']:.2f} | {c['mean_b']:.2f} | {diff} | {c['holds']}/{c['n']} | "
                     f"{c['verdict']} | {mdd} | {_paper(c['paper'])} |")
    return "\n".join(lines)


def _paper(value) -> str:
    return "" if value is None else f"{value:+.2f}"


def _fmt(cell, digits: int = 2) -> str:
    mean, std, n, total = cell
    if mean is None:
        return "–" if total == 0 else "pending"
    if n <= 1:
        text = f"{mean:.{digits}f}"
    elif isinstance(std, tuple):  # spread: minmax
        text = f"{mean:.{digits}f} [{std[0]:.{digits}f}, {std[1]:.{digits}f}]"
    else:
        text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" ({n}/{total} seeds)" if n < total else "")


def _table_md(item: ReportItem, rows, cols, cells) -> str:
    means = [abs(c[0]) for c in cells.values() if c[0] is not None]
    digits = 2 if means and max(means) >= 1 else 4  # accuracies in %; ECE, MI, tightness in their units
    header = [item.rows or "", *[c or item.metric for c in cols]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        entries = []
        for col in cols:
            ours = _fmt(cells[row, col], digits)
            paper = item.paper.get(row, {}).get(col if col else item.metric)  # no column axis: keyed by metric
            entries.append(ours + (f" (paper {paper:g})" if paper is not None else ""))
        lines.append("| " + " | ".join([row] + entries) + " |")
    unmatched = {r: v for r, v in item.paper.items() if r not in rows}
    if unmatched:  # the quick scale's rows stand in for other settings: show the paper's own
        lines.extend("| " + " | ".join([f"paper: {r}" if r else "paper"] + [f"{v[c]:g}" if c in v else "" for c in cols]) + " |"
                     for r, v in unmatched.items())
    return "\n".join(lines)


def _plot(item: ReportItem, rows, cols, cells, path: Path) -> Path | None:
    from .analysis.plots import _plt, _save

    plt = _plt()
    if item.kind == "heatmap":
        grid = np.array([[cells[r, c][0] if cells[r, c][0] is not None else np.nan for c in cols] for r in rows])
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cols), 0.8 + 0.5 * len(rows)))
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(cols)), [f"{item.cols}={c}" if item.cols else c for c in cols], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), [f"{item.rows}={r}" if item.rows else r for r in rows])
        fig.colorbar(image, ax=ax, label=item.metric)
        ax.set_title(item.title, fontsize=9)
        return _save(fig, path)
    if item.kind == "curve":
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for col in cols:
            xs = [r for r in rows if cells[r, col][0] is not None]
            if xs:
                means = np.array([cells[r, col][0] for r in xs])
                spreads = [cells[r, col][1] for r in xs]
                if item.spread == "minmax":  # the band from min to max over seeds
                    low, high = np.array([s[0] for s in spreads]), np.array([s[1] for s in spreads])
                else:  # mean ± std over seeds (0 for one seed)
                    std = np.array([s if s is not None else 0.0 for s in spreads], dtype=float)
                    low, high = means - std, means + std
                positions = [rows.index(r) for r in xs]
                (line,) = ax.plot(positions, means, marker="o", markersize=4, label=col or item.metric)
                ax.fill_between(positions, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
            for row in rows:
                paper = item.paper.get(row, {}).get(col if col else item.metric)  # no column axis: keyed by metric
                if paper is not None:
                    ax.scatter(rows.index(row), paper, marker="x", color="black")
        if rows:
            long = max(map(len, rows)) > 4
            ax.set_xticks(range(len(rows)), rows, rotation=30 if long else 0, ha="right" if long else "center")
        ax.set(xlabel=item.x, ylabel=f"{item.metric} ×{item.scale:g}", title=item.title)
        ax.legend(fontsize=8)
        return _save(fig, path)
    return None


def _hardware() -> dict:
    import torch

    from .device import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(directory: str | Path, log=print) -> dict:
    directory = Path(directory).resolve()
    manifest_path = directory / "sweep.json"
    if not manifest_path.is_file():
        raise RunError(f"{directory} holds no sweep.json: run `kdlab sweep RECIPE --out {directory}` first")
    manifest = read_json(manifest_path)
    # the recipe as the sweep ran it (a snapshot), so a later edit of the file cannot mislabel runs
    recipe = Recipe.model_validate(manifest["recipe_spec"]) if "recipe_spec" in manifest else load_recipe(manifest["recipe"])
    scale = manifest["scale"]
    runs = expand(recipe, scale, directory, manifest.get("settings", []))
    figure_dir = directory / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    sections = []  # _section: title, markdown table or None, [(png, caption)], comment
    tables = []  # the same numbers as data (report.json)
    for index, item in enumerate(recipe.report):
        if item.kind == "figures":
            sections.append(_figure_section(index, item, runs, directory))
            continue
        if item.kind == "claims":
            claims = _claims(item, runs)
            tables.append({"title": item.title, "kind": "claims", "stage": item.stage, "metric": item.metric,
                           "scale": item.scale, "claims": claims})
            comment = (item.comment + "\n\n" if item.comment else "") + CLAIMS_NOTE
            sections.append(_section(item.title, _claims_md(claims), [], comment))
            continue
        row_axis = item.rows if item.kind != "curve" else item.x
        col_axis = item.cols if item.kind != "curve" else item.lines
        rows, cols, cells = _cells(item, runs, row_axis, col_axis)
        tables.append(_table_json(item, rows, cols, cells, _seed_values(item, runs, row_axis, col_axis, rows, cols)))
        table = _table_md(item.model_copy(update={"rows": row_axis}), rows, cols, cells)
        png = _plot(item, rows, cols, cells, figure_dir / f"{index:02d}-{item.kind}")
        sections.append(_section(item.title, table, [(png, item.title)] if png else [], item.comment))

    results = [read_json(r.run_dir / "result.json") for r in runs if (r.run_dir / "result.json").is_file()]
    hardware = _hardware()
    info = {"recipe": recipe.id, "title": recipe.title, "source": recipe.source, "scale": scale,
            "note": recipe.scales[scale].note, "runs_total": len(runs), "runs_finished": len(results),
            "train_time_s": sum(r["train_time_s"] for r in results),
            "sweep_wall_time_s": manifest.get("wall_time_total_s", manifest.get("wall_time_s")),
            "settings": manifest.get("settings", []), "hardware": hardware, "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    md = _markdown(info, sections, directory)
    atomic_write_text(directory / "report.md", md)
    atomic_write_text(directory / "report.html", markdown_to_html(md, info["title"], directory))
    atomic_write_json(directory / "report.json", {**info, "tables": tables,
                                                  "figures": [s["data"] for s in sections if "data" in s]})
    log(f"report: {directory / 'report.html'}, {directory / 'report.md'} and {directory / 'report.json'} (the tables "
        "as data)")
    return info


def _info_lines(info: dict) -> list[str]:
    hw = info["hardware"]
    settings = info.get("settings") or []
    keys = {s.split("=", 1)[0].strip() for s in settings}
    moved = " (multistep lr drops moved with optim.epochs, at the same fractions of training)" \
        if "optim.epochs" in keys and "optim.milestones" not in keys else ""
    return [f"Scale: {info['scale']} — {info['note']}" + (" — changed by the settings below" if settings else ""),
            f"Runs: {info['runs_finished']}/{info['runs_total']} finished; training time {info['train_time_s'] / 60:.1f} min; "
            f"sweep wall time {(info['sweep_wall_time_s'] or 0) / 60:.1f} min"
            + (f"; settings for every run: {' '.join(settings)}{moved}" if settings else ""),
            f"Hardware: {hw['cpu']}, {hw['cores']} cores" + (f", {hw['cuda']}" if hw["cuda"] else "") +
            f"; torch {hw['torch']}, Python {hw['python']}; generated {info['generated_at']}"]


def _section(title: str, table: str | None, pngs: list, comment: str, figures_first: bool = False) -> dict:
    """One section of the report: a table and/or figures [(png, caption)], with the recipe's
    comment; a figure section puts its figures first and the table of their numbers below."""
    return {"title": title, "table": table, "pngs": pngs, "comment": comment, "figures_first": figures_first}


# per figure of `kdlab analyze`: the numbers of analysis.json that go beside it (header, metric, scale)
FIGURE_NUMBERS = {
    "reliability": [("ECE (test)", "analysis.calibration_test.ece.value", 1),
                    ("ECE after TS", "analysis.temperature_scaling.ece_after", 1)],
    "projection": [("tightness (val)", "analysis.projections.0.tightness.val", 1)],
    "projection_2": [("tightness (val)", "analysis.projections.1.tightness.val", 1)],
    "mutual_information": [("final Î (nats)", "analysis.mutual_information.last", 1)],
    "logit_sum": [("mean Σ_k z_k", "analysis.logit_statistics.logit_sum.mean", 1)],
    "logit_distance": [("mean ‖z_s − z_t‖ (test)", "analysis.logit_statistics.teacher.logit_distance_test.mean", 1)],
    "feature_norm": [("mean ‖r‖ (test)", "analysis.logit_statistics.feature_norm_test.mean", 1)],
    "temperature_curve": [("ECE (test)", "analysis.calibration_test.ece.value", 1)],
    "bleu_temperature": [("test BLEU (beam)", "test_bleu_beam", 1)],
}


def _label(run: RunSpec, axes: list[str]) -> str:
    """A run's setting in words: the values of the axes that vary in a section (one axis:
    its value, ``KL τ=5``; several: ``noise=40%, objective=MSE``), else its own labels'
    values (``α=0``), else its stage."""
    if not axes:
        return ", ".join(run.labels.values()) or run.stage
    if len(axes) == 1:
        return run.labels.get(axes[0], run.stage)
    return ", ".join(f"{a}={run.labels[a]}" for a in axes if a in run.labels)


def _figure_section(index: int, item: ReportItem, runs: list[RunSpec], directory: Path) -> dict:
    """A ``figures`` item: where its runs hold two settings or more and the figures can be
    overlaid (kdlab.compare.FIGURES: Kim Figs. 2 and 4, reliability, projections, MI,
    accuracy against τ), one figure per name with every setting, its seeds aggregated, the
    teacher dashed (``figures/NN-NAME.png``); else each setting's own `kdlab analyze` figure
    (its first seed). Either way a table of the figures' numbers per setting (mean ± std
    over seeds) with test accuracy, also as data (report.json's ``figures``)."""
    from .compare import CAPTIONS, FIGURE_COLUMNS, FIGURES, compare_groups, table_markdown, teacher_references

    selected = [r for r in runs if r.stage == item.stage and all(r.labels.get(a) == v for a, v in item.where.items())]
    axes = [a for a in dict.fromkeys(k for r in selected for k in r.labels)
            if a not in item.where and len({r.labels.get(a) for r in selected}) > 1]
    finished = [r for r in selected if (r.run_dir / "result.json").is_file()]
    by_label: dict[str, list[RunSpec]] = {}
    for run in sorted(finished, key=lambda r: r.seed):
        by_label.setdefault(_label(run, axes), []).append(run)
    overlaid = [name for name in item.figures if name in FIGURES]
    classifiers = all((r.run_dir / "eval_test.npz").is_file() for r in finished)
    pngs, table, data = [], None, {"title": item.title, "stage": item.stage, "labels": list(by_label)}
    if len(by_label) >= 2 and overlaid and classifiers:
        projections = next((r.projections for r in finished if r.projections), None)
        comparison = compare_groups({label: [r.run_dir for r in rs] for label, rs in by_label.items()},
                                    directory / "figures", overlaid,
                                    teacher_references([r.run_dir for r in finished]), prefix=f"{index:02d}-",
                                    classes=projections[0] if projections else None)
        pngs += [(Path(comparison["figures"][name]["png"]), CAPTIONS[name]) for name in overlaid
                 if name in comparison["figures"]]
        keys = ["test_acc"] + [key for name in overlaid for key in FIGURE_COLUMNS[name]]
        table = table_markdown(comparison, keys)
        data.update(split=comparison["split"], rows=comparison["rows"],
                    figures={name: {**entry, "png": os.path.relpath(entry["png"], directory)}
                             for name, entry in comparison["figures"].items()})
    drawn = {png for png, _ in pngs}
    for name in item.figures:  # the rest: each setting's own figure, by what it is
        if data.get("figures") and name in data["figures"]:
            continue
        for label, rs in by_label.items():
            png = rs[0].run_dir / "analysis" / f"{name}.png"
            if png.is_file() and png not in drawn:
                pngs.append((png, f"{label} (seed {rs[0].seed}): {name.replace('_', ' ')}"))
                data.setdefault("run_figures", []).append(os.path.relpath(png, directory))
    if table is None and by_label:
        columns = [("test acc (%)", "test_acc", 100.0)] + [c for name in item.figures for c in FIGURE_NUMBERS.get(name, [])]
        table, data["rows"] = _label_table(by_label, list(dict.fromkeys(columns)))
    return {**_section(item.title, table, pngs, item.comment, figures_first=True), "data": data}


def _label_table(by_label: dict[str, list[RunSpec]], columns: list[tuple]) -> tuple[str, list[dict]]:
    """Per setting: its seeds and each column's mean ± std over them (– where no run has
    it), as Markdown and as data (each seed's number)."""
    values = {(label, metric): {r.seed: v * scale for r in rs if (v := _value(r, metric)) is not None}
              for label, rs in by_label.items() for _, metric, scale in columns}
    columns = [c for c in columns if any(values[label, c[1]] for label in by_label)]
    lines = ["| | seeds | " + " | ".join(header for header, _, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    rows = []
    for label, rs in by_label.items():
        cells = [label, ", ".join(str(r.seed) for r in rs)]
        row = {"label": label, "seeds": [r.seed for r in rs]}
        for header, metric, _ in columns:
            found = list(values[label, metric].values())
            digits = 2 if found and max(abs(v) for v in found) >= 1 else 4
            cells.append("–" if not found else f"{np.mean(found):.{digits}f}" +
                         (f" ± {np.std(found):.{digits}f}" if len(found) > 1 else ""))
            row[metric] = {"header": header, "by_seed": {str(k): v for k, v in values[label, metric].items()}}
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    return "\n".join(lines), rows


def _markdown(info, sections, directory: Path) -> str:
    out = [f"# {info['title']}", "", f"Reproduces: {info['source']}", ""]
    out += [f"- {line}" for line in _info_lines(info)] + [""]
    for section in sections:
        out += [f"## {section['title']}", ""]
        if section["comment"]:
            out += [section["comment"].strip(), ""]
        table = [section["table"], ""] if section["table"] else []
        figures = []
        for png, caption in section["pngs"]:
            figures += [f"![{caption}]({os.path.relpath(png, directory)})", ""]
        out += figures + table if section["figures_first"] else table + figures
    return "\n".join(out)
