"""``kdlab compare RUN RUN ...``: several finished runs on shared axes, labelled by what they are.

Runs that differ only by their seed are one label — the objective in words, as ``kdlab runs``
writes it (``KL τ=4 α=1``, ``MSE α=1``, ``CE``), with the setting that tells two labels apart
added where two would read the same (``CE (model.name=mlp-32)``) — and are aggregated over
their seeds. The figures follow the papers':

- ``logit_sum`` (Kim Fig. 2), ``logit_distance`` and ``feature_norm`` (Kim Fig. 4a, 4b):
  densities of Σ_k z_k, ‖z_s − z_t‖₂ and ‖r‖₂ overlaid per label on the training split, as
  in the paper (the test split where a run has no ``eval_train.npz``); the line is the mean
  over seeds of each seed's density, the band the seeds' min–max; the runs' teacher dashed;
- ``reliability``: reliability diagrams overlaid (test split), ECE mean ± std over seeds;
- ``accuracy``: test accuracy against τ for the KL labels, with the seeds' min–max band, and
  the labels without a τ (MSE, CE) as levels (drawn when the runs have two τ or more);
- ``mutual_information``: Müller's MI curve per label (when every run logged it);
- ``projection`` (Müller Fig. 1, Kim Fig. 5): each label's template projection (its first
  seed; train and validation rows), one panel per label; tightness over all seeds.

Beside the figures, a table of the same numbers (mean ± std over seeds): ``comparison.json``
(the data, each seed's number), ``comparison.md`` and ``comparison.html``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, RunError
from .htmlpage import markdown_to_html
from .runs import atomic_write_json, atomic_write_text, check_writable_dir, load_eval, load_run_config, make_dirs, \
    read_json, read_metrics

FIGURES = ("logit_sum", "logit_distance", "feature_norm", "reliability", "accuracy", "mutual_information", "projection")

# (key, column header, digits): the numbers of the table beside the figures
COLUMNS = {
    "test_acc": ("test acc (%)", 2),
    "ece": ("ECE (test)", 4),
    "logit_sum": ("mean Σ_k z_k ({split})", 3),
    "logit_distance": ("mean ‖z_s − z_t‖ ({split})", 3),
    "feature_norm": ("mean ‖r‖ ({split})", 3),
    "mutual_information": ("final Î (nats)", 3),
    "tightness": ("projection tightness (val)", 4),
}
CAPTIONS = {
    "logit_sum": "Σ_k z_k per example, one density per setting, the teacher dashed (Kim Fig. 2)",
    "logit_distance": "‖z_s − z_t‖₂ per example, one density per setting (Kim Fig. 4a)",
    "feature_norm": "‖r‖₂ of the pre-logits per example, one density per setting, the teacher dashed (Kim Fig. 4b)",
    "reliability": "Reliability diagrams of every setting on one axis",
    "accuracy": "Test accuracy against τ, settings without τ as levels",
    "mutual_information": "Mutual information over training, one curve per setting (Müller §4)",
    "projection": "Template projections, one panel per setting (its first seed), train and validation",
}
FIGURE_COLUMNS = {"logit_sum": ["logit_sum"], "logit_distance": ["logit_distance"], "feature_norm": ["feature_norm"],
                  "reliability": ["ece"], "accuracy": [], "mutual_information": ["mutual_information"],
                  "projection": ["tightness"]}


@dataclass
class _Run:
    run_dir: Path
    cfg: object
    result: dict
    arrays: dict = field(default_factory=dict)  # split -> eval arrays, read once

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def eval(self, split: str) -> dict | None:
        if split not in self.arrays:
            self.arrays[split] = load_eval(self.run_dir, split)
        return self.arrays[split]


def check_runs(run_dirs) -> list[Path]:
    """The run dirs, checked before anything is written: at least two, each a finished
    classification run with its eval files, all of one dataset and number of classes."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise ConfigError(f"compare needs two runs or more, got {len(paths)}: for one run use `kdlab analyze RUN`")
    seen = {}
    for path in paths:
        if path.resolve() in seen:
            raise ConfigError(f"{path} is named twice: name each run once")
        seen[path.resolve()] = path
        if not (path / "config.yaml").is_file():
            raise RunError(f"{path} is not a kdlab run dir (no config.yaml)")
        if not (path / "result.json").is_file():
            raise RunError(f"{path} is not a finished kdlab run (no result.json): let it finish, or leave it out")
        result = read_json(path / "result.json")
        if "token_calibration" in result or not (path / "eval_test.npz").is_file():
            raise RunError(f"{path} has no eval_test.npz of class logits (a translation run?): compare classifiers only")
    data = {p: (read_json(p / "result.json").get("dataset"), read_json(p / "result.json").get("num_classes"))
            for p in paths}
    first = paths[0]
    for path in paths[1:]:
        if data[path] != data[first]:
            raise ConfigError(f"runs of different data cannot share axes: {first.name} is {data[first][0]} "
                              f"({data[first][1]} classes), {path.name} is {data[path][0]} ({data[path][1]} classes); "
                              "compare runs of one dataset")
    return paths


def _teacher_dir(run_dir: Path, teacher: str) -> Path | None:
    """A teacher run dir (or a start's) as the config names it, else beside the run (a moved
    tree of runs)."""
    for candidate in (Path(teacher), Path(run_dir).parent / Path(teacher).name):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def identity(run_dir: Path) -> str:
    """What a run is, its seed (and name, place, device) aside: two runs with the same
    identity differ only by seed. Teachers and the run a model starts from enter by their
    own identity, so students of per-seed teachers are one setting."""
    cfg = load_run_config(run_dir)

    def of(other: str) -> str:
        found = _teacher_dir(run_dir, other)
        return f"runs/{identity(found) if found else Path(other).name}"

    teacher, model = cfg.teacher, cfg.model
    if teacher is not None and teacher.runs:
        teacher = teacher.model_copy(update={"runs": [of(t) for t in teacher.runs]})
    if model.init_run:
        model = model.model_copy(update={"init_run": of(model.init_run)})
    return cfg.model_copy(update={"seed": 0, "name": "run", "teacher": teacher, "model": model}).run_hash()


def _flat(node, prefix="") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


_NOT_TELLING = ("seed", "name", "out_dir", "device", "threads", "teacher.runs", "model.init_run")


def label_runs(run_dirs) -> dict[str, list[Path]]:
    """{label: run dirs} with runs that differ only by seed under one label (kdlab runs's
    objective in words; where two settings would read the same, the config keys that tell
    them apart are added, or the teacher's name)."""
    from .run_list import objective

    settings: dict[str, list[Path]] = {}
    for path in run_dirs:
        settings.setdefault(identity(Path(path)), []).append(Path(path))
    names = {key: objective(load_run_config(dirs[0])) for key, dirs in settings.items()}
    labels = {}
    for key, dirs in settings.items():
        same = [k for k, n in names.items() if n == names[key]]
        label = names[key]
        if len(same) > 1:
            flats = {k: _flat(load_run_config(settings[k][0]).model_dump(mode="json")) for k in same}
            telling = [name for name in flats[key] if not name.startswith(_NOT_TELLING)
                       and len({repr(f.get(name)) for f in flats.values()}) > 1]
            if telling:
                label += " (" + ", ".join(f"{name}={flats[key][name]}" for name in telling[:2]) + ")"
            else:
                teachers = load_run_config(dirs[0]).teacher
                label += f" (teacher {', '.join(Path(t).name for t in teachers.runs)})" if teachers else f" ({dirs[0].name})"
        labels[label] = sorted(dirs, key=lambda d: load_run_config(d).seed)
    return dict(sorted(labels.items(), key=lambda item: _order(load_run_config(item[1][0]))))


def _order(cfg) -> tuple:
    """The papers' order of objectives: no teacher (CE, LS), KL by τ, MSE, other methods."""
    tau = _tau(cfg)
    if cfg.teacher is None or cfg.loss.alpha == 0 and cfg.distill.method == "logit":
        return (0, 0.0)
    if tau is not None:
        return (1, tau)
    return (2, 0.0) if cfg.distill.method == "logit" else (3, 0.0)


def teacher_references(run_dirs) -> dict[str, list[Path]]:
    """{``teacher (CE, MODEL)``: teacher run dirs} of runs with one teacher run each — the
    dashed reference of Kim Fig. 2 (a) — grouped like runs (seeds aggregated); a teacher
    that is itself among ``run_dirs`` is left out (it is drawn as a label already)."""
    from .run_list import objective

    chosen = {Path(p).resolve() for p in run_dirs}
    teachers: dict[Path, None] = {}
    for path in run_dirs:
        cfg = load_run_config(Path(path))
        if cfg.teacher is None or len(cfg.teacher.runs) != 1 or cfg.loss.alpha == 0 and cfg.distill.method == "logit":
            continue
        found = _teacher_dir(Path(path), cfg.teacher.runs[0])
        if found is not None and found.resolve() not in chosen and (found / "eval_test.npz").is_file():
            teachers[found] = None
    out: dict[str, list[Path]] = {}
    for key, dirs in _by_identity(list(teachers)).items():
        cfg = load_run_config(dirs[0])
        label = f"teacher ({objective(cfg)}, {cfg.model.name})"
        out[label if label not in out else f"{label} {dirs[0].name}"] = dirs
    return out


def _by_identity(run_dirs: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in run_dirs:
        out.setdefault(identity(path), []).append(path)
    return out


def _runs(paths) -> list[_Run]:
    return [_Run(Path(p), load_run_config(Path(p)), read_json(Path(p) / "result.json")) for p in paths]


def _spread(values: list[float], seeds: list[int]) -> dict | None:
    pairs = [(s, v) for s, v in zip(seeds, values) if v is not None]
    if not pairs:
        return None
    numbers = np.array([v for _, v in pairs], float)
    return {"mean": float(numbers.mean()), "std": float(numbers.std()), "min": float(numbers.min()),
            "max": float(numbers.max()), "n": len(pairs), "by_seed": {str(s): float(v) for s, v in pairs}}


def _test_accuracy(run: _Run) -> float:
    acc = run.result.get("final", {}).get("test_acc")
    if acc is None:
        test = run.eval("test")
        acc = float((test["logits"].argmax(1) == test["labels"]).mean())
    return 100.0 * acc


def _tau(cfg) -> float | None:
    """τ of a KL distillation objective, else None (MSE, CE, LS, feature methods)."""
    if cfg.teacher is None or cfg.loss.alpha == 0 or cfg.loss.kd != "kl" or cfg.distill.method != "logit":
        return None
    return float(cfg.loss.tau)


def compare_groups(groups: dict[str, list[Path]], out_dir: Path, figures=FIGURES,
                   references: dict[str, list[Path]] | None = None, prefix: str = "", classes=None) -> dict:
    """Draw ``figures`` (names of FIGURES; those the runs cannot give are skipped) for
    ``groups`` {label: finished run dirs} into ``out_dir/PREFIXNAME.png`` (+ .svg) and
    return the numbers: {"split", "rows": [per label: seeds, runs, each column's mean ±
    std and per-seed values], "figures": {name: {"png", "legend"}}, "columns"}.
    ``references`` {label: run dirs} (the teacher) are dashed in Figs. 2 and 4b and rows of
    the table marked ``reference``. ``classes``: the projection's three classes (default 0, 1, 2)."""
    from .analysis import plots
    from .analysis.calibration import expected_calibration_error
    from .analysis.logits import feature_norms, logit_distances, logit_sums

    runs = {label: _runs(dirs) for label, dirs in groups.items()}
    refs = {label: _runs(dirs) for label, dirs in (references or {}).items()}
    everyone = [r for rs in (*runs.values(), *refs.values()) for r in rs]
    split = "train" if all((r.run_dir / "eval_train.npz").is_file() for r in everyone) else "test"

    def series(which: dict, fn) -> dict:
        out = {}
        for label, rs in which.items():
            values = [fn(r.eval(split)) for r in rs]
            if all(v is not None for v in values):
                out[label] = values
        return out

    sums = series(runs, lambda e: logit_sums(e["logits"]))
    ref_sums = series(refs, lambda e: logit_sums(e["logits"]))
    distances = series(runs, lambda e: logit_distances(e["logits"], e["teacher_logits"]) if "teacher_logits" in e else None)
    norms = series(runs, lambda e: feature_norms(e["features"]) if "features" in e else None)
    ref_norms = series(refs, lambda e: feature_norms(e["features"]) if "features" in e else None)
    mi = {label: [read_metrics(r.run_dir, "mutual_information") for r in rs] for label, rs in runs.items()}
    mi = mi if all(all(curves) for curves in mi.values()) else {}
    projections = _projections(runs, classes) if "projection" in figures else {}

    rows = []
    for label, rs, reference in [*((lb, rs, False) for lb, rs in runs.items()), *((lb, rs, True) for lb, rs in refs.items())]:
        seeds = [r.seed for r in rs]
        per = {"test_acc": [_test_accuracy(r) for r in rs],
               "ece": [expected_calibration_error(r.eval("test")["logits"], r.eval("test")["labels"]) for r in rs]}
        for key, source in (("logit_sum", ref_sums if reference else sums), ("logit_distance", {} if reference else distances),
                            ("feature_norm", ref_norms if reference else norms)):
            if label in source:
                per[key] = [float(np.mean(v)) for v in source[label]]
        if not reference and label in mi:
            per["mutual_information"] = [curve[-1]["mutual_information"] for curve in mi[label]]
        if not reference and label in projections:
            per["tightness"] = [p.get("val", p.get("train"))["tightness"] for p in projections[label][0]]
        row = {"label": label, "reference": reference, "seeds": seeds, "runs": [r.run_dir.name for r in rs]}
        row.update({key: _spread(values, seeds) for key, values in per.items()})
        rows.append(row)

    drawn = {}

    def draw(name: str, fig) -> None:
        legend, titles = plots.legend_labels(fig), [ax.get_title() for ax in fig.axes if ax.get_visible()]
        drawn[name] = {"png": str(plots.save(fig, Path(out_dir) / f"{prefix}{name}")), "legend": legend,
                       "titles": titles}

    what = f"{split} split; mean of seeds, band min–max"
    if "logit_sum" in figures and sums:
        draw("logit_sum", plots.overlaid_densities(sums, "Σ_k z_k", f"Logit sums, Kim Fig. 2 ({what})", ref_sums))
    if "logit_distance" in figures and distances:
        draw("logit_distance", plots.overlaid_densities(distances, "‖z_s − z_t‖₂",
                                                        f"Student–teacher logit distance, Kim Fig. 4a ({what})"))
    if "feature_norm" in figures and norms:
        draw("feature_norm", plots.overlaid_densities(norms, "‖r‖₂", f"Pre-logit norm, Kim Fig. 4b ({what})",
                                                      ref_norms))
    if "reliability" in figures:
        draw("reliability", plots.overlaid_reliability(
            {label: [(r.eval("test")["logits"], r.eval("test")["labels"]) for r in rs] for label, rs in runs.items()},
            "Reliability (test, 15 bins, those under 10 examples left out;\nmean of seeds, band min–max)"))
    if "accuracy" in figures:
        fig = _accuracy_figure(runs, {row["label"]: row["test_acc"] for row in rows if not row["reference"]})
        if fig is not None:
            draw("accuracy", fig)
    if "mutual_information" in figures and mi:
        curves = {}
        for label, per_seed in mi.items():
            length = min(len(c) for c in per_seed)
            values = np.array([[r["mutual_information"] for r in c[:length]] for c in per_seed])
            curves[plots._seeds_note(label, len(per_seed))] = (
                [r["step"] for r in per_seed[0][:length]], values.mean(0), values.min(0), values.max(0))
        draw("mutual_information", plots.band_curves(curves, "training step", "Î (nats)",
                                                     "Mutual information, Müller §4 (mean of seeds, band min–max)"))
    if projections:
        panels = {}
        for part in ("train", "val"):
            for label, (per_seed, _) in projections.items():
                if part in per_seed[0]:
                    panels[f"{label} (seed {runs[label][0].seed}), {part}"] = per_seed[0][part]
        names = next(iter(projections.values()))[1]
        draw("projection", plots.projection_figure(panels, names, ncols=len(projections),
                                                   title="Template projections (Müller Fig. 1, Kim Fig. 5): "
                                                         "each label's first seed"))
    return {"split": split, "rows": rows, "figures": drawn,
            "columns": {key: header.format(split=split) for key, (header, _) in COLUMNS.items()}}


def _projections(runs: dict[str, list[_Run]], classes) -> dict:
    """{label: ([{split: projection} per seed], class names)} of the three classes (Müller
    §2: train and validation examples on the plane of their templates); {} when a run's
    model.pt has no final layer to take templates from."""
    from .analysis.analyze import _projections as project, class_names, resolve_class_triples

    out = {}
    for label, rs in runs.items():
        per_seed = []
        for run in rs:
            num_classes = run.result["num_classes"]
            names = list(run.result["class_names"]) if run.result.get("class_names") else \
                class_names(run.cfg.data.name, num_classes)
            triple = resolve_class_triples(classes, names, num_classes)[0]
            evals = {split: run.eval(split) for split in ("train", "val")}
            try:
                _, panels = project(run.run_dir, run.cfg, evals, [triple], names, num_classes)
            except RunError:
                return {}
            per_seed.append(panels[0])
        out[label] = (per_seed, [names[c] for c in triple])
    return out


def _accuracy_figure(runs: dict[str, list[_Run]], accuracy: dict[str, dict]):
    """Test accuracy against τ (log axis, ∞ at the right end) for the KL labels, one line
    per label with its τ taken out; the other labels (MSE, CE) as levels. None when fewer
    than two τ."""
    from .analysis import plots

    taus = {label: _tau(rs[0].cfg) for label, rs in runs.items()}
    finite = sorted({t for t in taus.values() if t is not None and math.isfinite(t)})
    if len({t for t in taus.values() if t is not None}) < 2:
        return None
    infinity = (finite[-1] * 4 if finite else 10.0)

    def position(tau: float) -> float:
        return tau if math.isfinite(tau) else infinity

    lines: dict[str, list[tuple[float, dict]]] = {}
    levels = {}
    for label, tau in taus.items():
        if tau is None:
            stat = accuracy[label]
            levels[plots._seeds_note(label, stat["n"])] = (stat["mean"], stat["min"], stat["max"])
        else:
            line = re.sub(r"\s*τ=\S+", "", label).strip() or "KL"
            lines.setdefault(line, []).append((position(tau), accuracy[label]))
    curves = {}
    for line, points in lines.items():
        points.sort(key=lambda p: p[0])
        seeds = max(p[1]["n"] for p in points)
        curves[plots._seeds_note(line, seeds)] = ([p[0] for p in points], [p[1]["mean"] for p in points],
                                                   [p[1]["min"] for p in points], [p[1]["max"] for p in points])
    ticks = [*finite, infinity] if any(not math.isfinite(t) for t in taus.values() if t is not None) else finite
    tick_labels = [f"{t:g}" for t in finite] + (["∞"] if len(ticks) > len(finite) else [])
    return plots.band_curves(curves, "τ", "test accuracy (%)", "Test accuracy against τ (mean of seeds, band min–max)",
                             levels=levels, xticks=(ticks, tick_labels), xscale="log")


def table_markdown(comparison: dict, keys=None) -> str:
    """The comparison's rows as a Markdown table: label, seeds, then each column (mean ±
    std over seeds); ``keys`` chooses the columns (default: every one the rows have)."""
    rows = comparison["rows"]
    keys = [k for k in (keys or COLUMNS) if any(row.get(k) for row in rows)]
    header = ["", "seeds", *(comparison["columns"][k] for k in keys)]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(keys)]
    for row in rows:
        cells = [row["label"], ", ".join(map(str, row["seeds"]))]
        for key in keys:
            stat, digits = row.get(key), COLUMNS[key][1]
            if not stat:
                cells.append("–")
            elif stat["n"] > 1:
                cells.append(f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}")
            else:
                cells.append(f"{stat['mean']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_out(run_dirs) -> Path:
    """``compare-<8 hex of the run names>`` beside the first run: the same runs land in the
    same folder again, other runs in another."""
    names = "\n".join(sorted(Path(p).resolve().name for p in run_dirs))
    return Path(run_dirs[0]).parent / f"compare-{hashlib.sha256(names.encode()).hexdigest()[:8]}"


def compare_runs(run_dirs, out_dir=None, log=print) -> dict:
    """``kdlab compare``: check the runs (nothing is written when one is unusable), label
    them, draw every figure they can give and write the table beside the figures."""
    paths = check_runs(run_dirs)
    out = Path(out_dir) if out_dir else default_out(paths)
    check_writable_dir(out, "--out")
    groups = label_runs(paths)
    references = teacher_references(paths)
    check_writable_dir(out, "--out", probe=True)
    make_dirs(out, "--out")
    comparison = compare_groups(groups, out, FIGURES, references)
    comparison["groups"] = {label: [str(p) for p in dirs] for label, dirs in groups.items()}
    comparison["references"] = {label: [str(p) for p in dirs] for label, dirs in references.items()}
    atomic_write_json(out / "comparison.json", comparison)
    md = ["# Comparison of " + ", ".join(groups), "",
          f"{len(paths)} runs; one label per setting, its seeds aggregated (mean ± std over seeds). Logit sums, "
          f"‖z_s − z_t‖ and ‖r‖ on the {comparison['split']} split (Kim Figs. 2 and 4), accuracy and ECE on test.", "",
          table_markdown(comparison), ""]
    md += [f"![{CAPTIONS[name]}]({Path(entry['png']).name})\n" for name, entry in comparison["figures"].items()]
    md.append("Runs: " + "; ".join(f"{label}: " + ", ".join(f"`{Path(p).name}`" for p in dirs)
                                   for label, dirs in groups.items()) + "\n")
    text = "\n".join(md)
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.html", markdown_to_html(text, "Comparison", out))
    log(table_markdown(comparison))
    log(f"figures: {', '.join(comparison['figures'])} in {out}/ (comparison.md, comparison.html; the numbers in "
        "comparison.json)")
    return comparison
