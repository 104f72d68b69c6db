"""``kdlab analyze RUN_DIR``: every analysis of one run (and its teacher), as JSON + figures.

Reads only the run dir(s): ``eval_{train,val,test}.npz`` (logits, labels, penultimate
features, teacher logits), ``model.pt`` (last layer for the template projection) and
``metrics.jsonl`` (the mutual-information curve, when the run logged it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, RunError
from ..run_list import objective
from ..runs import atomic_write_json, check_writable_dir, load_eval, load_run_config, make_dirs, read_json, read_metrics, torch_load
from . import plots
from .calibration import calibration_report, expected_calibration_error, fit_temperature
from .logits import (
    equivalent_smoothing,
    feature_norms,
    logit_distances,
    logit_gap,
    logit_sums,
    summarize,
    teacher_student_agreement,
    teacher_student_kl,
)
from .representations import project_templates
from .translation import analyze_translation_run

CLASS_NAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "fashion-mnist": ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"],
}


def _finished(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file():
        raise RunError(f"{run_dir} is not a finished kdlab run (no result.json)")
    return run_dir


def class_names(dataset: str, num_classes: int) -> list[str]:
    return CLASS_NAMES.get(dataset, [str(k) for k in range(num_classes)])


def resolve_class_triples(classes, names: list[str], num_classes: int) -> list[list[int]]:
    """``classes``: None (0, 1, 2), one triple or a list of triples; each class an index
    or a class name (an image folder's folder name, e.g. ImageNet's n01440764)."""
    if classes is None:
        classes = [0, 1, 2]
    triples = classes if classes and isinstance(classes[0], (list, tuple)) else [classes]
    out = []
    for triple in triples:
        chosen = []
        for c in triple:
            if isinstance(c, str) and not c.lstrip("-").isdigit():
                if c not in names:
                    raise RunError(f"--classes {','.join(map(str, triple))}: no class named {c!r} (classes: "
                                   f"{', '.join(names[:8])}"
                                   f"{', ...' if len(names) > 8 else ''})")
                chosen.append(names.index(c))
            else:
                chosen.append(int(c))
        if any(not 0 <= c < num_classes for c in chosen) or len(set(chosen)) != 3:
            raise RunError(f"--classes needs three distinct classes in 0..{num_classes - 1}, got {list(triple)}")
        out.append(chosen)
    return out


def analyze_run(run_dir, teacher_dir=None, classes=None, out_dir=None, n_bootstrap: int = 200,
                figures: bool = True, log=print) -> dict:
    run_dir = _finished(run_dir)
    teacher_dir = _finished(teacher_dir) if teacher_dir else None
    out_dir = Path(out_dir) if out_dir else run_dir / "analysis"
    check_writable_dir(out_dir, "--out")
    result = read_json(run_dir / "result.json")
    teacher_result = read_json(teacher_dir / "result.json") if teacher_dir else None
    if "token_calibration" in result:  # a translation run: token rows, no logits dump (kdlab/translate.py)
        if teacher_dir:
            raise ConfigError(f"--teacher {teacher_dir}: the analysis of a translation run compares no teacher "
                              "(its token metrics against the teacher are in metrics.jsonl); leave --teacher out")

        return analyze_translation_run(run_dir, classes, out_dir, n_bootstrap, figures, log)
    cfg = load_run_config(run_dir)
    num_classes = result["num_classes"]
    evals = _load_evals(run_dir, teacher_dir, result, teacher_result)

    report: dict = {"run_dir": str(run_dir), "teacher_dir": str(teacher_dir) if teacher_dir else None,
                    "model": cfg.model.name, "dataset": cfg.data.name, "num_classes": num_classes}
    report.update(_calibration(evals["test"], evals["val"], n_bootstrap))
    report["logit_statistics"] = _logit_statistics(evals)
    # an image folder's class folders (ImageNet: n01440764, ...), else the dataset's names or indices
    names = list(result["class_names"]) if result.get("class_names") else class_names(cfg.data.name, num_classes)
    report["projections"], all_projections = _projections(run_dir, cfg, evals, classes, names, num_classes)
    report["projection"] = report["projections"][0]  # the first triple (as before several were allowed)
    mi = _mutual_information(run_dir, cfg)
    if mi is not None:
        report["mutual_information"] = mi

    check_writable_dir(out_dir, "--out", probe=True)
    make_dirs(out_dir, "--out")
    if figures:
        # figures name the run by what it is (kdlab runs's objective in words), not by its hash
        label = f"{objective(cfg)} (seed {cfg.seed})"
        report["figures"] = _figures(report, evals, all_projections, out_dir, label, teacher_dir)
    atomic_write_json(out_dir / "analysis.json", report)
    log(summary(report))
    return report


def _load_evals(run_dir: Path, teacher_dir, result: dict, teacher_result) -> dict:
    """The run's eval arrays by split (test required), each with its teacher's logits and
    features added when ``teacher_dir`` is given (the same splits, same labels)."""
    evals = {split: load_eval(run_dir, split) for split in ("train", "val", "test")}
    if evals["test"] is None:
        raise RunError(f"{run_dir}: no eval_test.npz")
    teacher_evals = {s: load_eval(teacher_dir, s) for s in ("train", "val", "test")} if teacher_dir else {}
    if teacher_dir and (teacher_evals["test"] is None or "token_calibration" in teacher_result):
        kind = "a translation run" if "token_calibration" in teacher_result else "a run without eval_test.npz"
        raise ConfigError(f"--teacher {teacher_dir} is {kind}, not a classifier evaluated on {run_dir.name}'s data "
                          f"({teacher_result.get('dataset')} vs {result.get('dataset')})")
    for split, t in teacher_evals.items():
        own = evals[split]
        if t is not None and own is not None:
            if t["logits"].shape != own["logits"].shape or not np.array_equal(t["labels"], own["labels"]):
                raise RunError(f"teacher {teacher_dir} was evaluated on a different {split} split than {run_dir}")
            own["teacher_logits"] = t["logits"]
            own["teacher_features"] = t["features"]
    return evals


def _calibration(test: dict, val: dict | None, n_bootstrap: int) -> dict:
    """Calibration on test; temperature scaling fitted on validation NLL (when there is a val split)."""
    out = {"calibration_test": calibration_report(test["logits"], test["labels"], n_resamples=n_bootstrap)}
    if val is not None and len(val["labels"]):
        temperature = fit_temperature(val["logits"], val["labels"])
        scaled = test["logits"] / temperature
        out["temperature_scaling"] = {
            "temperature": temperature, "fitted_on": "val",
            "ece_before": expected_calibration_error(test["logits"], test["labels"]),
            "ece_after": expected_calibration_error(scaled, test["labels"]),
            "calibration_after": calibration_report(scaled, test["labels"], n_resamples=n_bootstrap),
        }
    return out


def _logit_statistics(evals: dict) -> dict:
    """Logit sums (train split, else test), gaps, feature norms, equivalent smoothing; against the teacher."""
    test = evals["test"]
    sums_split = "train" if evals["train"] is not None else "test"
    stats = {"logit_sum_split": sums_split,
             "logit_sum": summarize(logit_sums(evals[sums_split]["logits"])),
             "logit_gap_test": summarize(logit_gap(test["logits"])),
             "feature_norm_test": summarize(feature_norms(test["features"])),
             "equivalent_smoothing_test": {str(t): equivalent_smoothing(test["logits"], test["labels"], t)
                                            for t in (1, 2, 4, 8)}}
    if "teacher_logits" in test:
        stats["teacher"] = {
            "agreement_test": teacher_student_agreement(test["logits"], test["teacher_logits"]),
            "kl_tau1_test": teacher_student_kl(test["logits"], test["teacher_logits"]),
            "logit_distance_test": summarize(logit_distances(test["logits"], test["teacher_logits"])),
            "teacher_logit_sum": summarize(logit_sums(evals[sums_split].get("teacher_logits", test["teacher_logits"]))),
        }
        if "teacher_features" in test:
            stats["teacher"]["teacher_feature_norm_test"] = summarize(feature_norms(test["teacher_features"]))
    return stats


def _projections(run_dir: Path, cfg, evals: dict, classes, names: list[str], num_classes: int) -> tuple[list, list]:
    """Template projection (Müller §2): train and validation panels, for each triple of
    classes. (The report's entries, the panels for the figures.)"""
    triples = resolve_class_triples(classes, names, num_classes)
    state = torch_load(run_dir / "model.pt")
    head = _classifier_key(cfg, run_dir)
    if f"{head}.weight" not in state or f"{head}.bias" not in state:
        raise RunError(f"{run_dir}/model.pt has no final layer {head!r} (weight and bias) to take templates from")
    weight, bias = state[f"{head}.weight"].double().numpy(), state[f"{head}.bias"].double().numpy()
    all_projections = []
    for chosen in triples:
        projections = {}
        for split in ("train", "val"):
            if evals[split] is not None:
                projections[split] = project_templates(evals[split]["features"].astype(np.float64),
                                                       evals[split]["labels"], weight, bias, chosen)
        all_projections.append(projections)
    entries = [{"classes": chosen, "class_names": [names[c] for c in chosen],
                "tightness": {s: p["tightness"] for s, p in projections.items()}}
               for chosen, projections in zip(triples, all_projections)]
    return entries, all_projections


def _mutual_information(run_dir: Path, cfg) -> dict | None:
    """The mutual-information curve the run logged (Müller §4), or None."""
    mi = read_metrics(run_dir, "mutual_information")
    if not mi:
        return None
    return {"step": [r["step"] for r in mi], "value": [r["mutual_information"] for r in mi],
            "first": mi[0]["mutual_information"], "last": mi[-1]["mutual_information"],
            "bound_log_n": float(np.log(cfg.mutual_information.per_class * 2))}


def _figures(report, evals, projections, out_dir: Path, label: str, teacher_dir) -> dict:
    test = evals["test"]
    figs = {}
    models = {label: (test["logits"], test["labels"])}
    if "temperature_scaling" in report:
        t = report["temperature_scaling"]["temperature"]
        models[f"{label} + TS (T={t:.2f})"] = (test["logits"] / t, test["labels"])
    if "teacher_logits" in test:
        models["teacher"] = (test["teacher_logits"], test["labels"])
    figs["reliability"] = str(plots.reliability_diagram(models, out_dir / "reliability"))
    for number, (panels, proj) in enumerate(zip(projections, report["projections"]), start=1):
        if panels:  # projection.png, projection_2.png, ...
            key = "projection" if number == 1 else f"projection_{number}"
            figs[key] = str(plots.template_projection(panels, proj["class_names"], out_dir / key, title=label))
    split = report["logit_statistics"]["logit_sum_split"]
    sums = {label: logit_sums(evals[split]["logits"])}
    if "teacher_logits" in evals[split]:
        sums["teacher"] = logit_sums(evals[split]["teacher_logits"])
    figs["logit_sum"] = str(plots.histograms(sums, out_dir / "logit_sum", "Σ_k z_k", f"Logit sums ({split} split)"))
    norms = {f"‖r‖ {label}": feature_norms(test["features"])}
    if "teacher_features" in test:
        norms["‖r‖ teacher"] = feature_norms(test["teacher_features"])
    figs["feature_norm"] = str(plots.histograms(norms, out_dir / "feature_norm", "‖r‖₂", "Pre-logit norms (test)"))
    if "teacher_logits" in test:
        figs["logit_distance"] = str(plots.histograms(
            {label: logit_distances(test["logits"], test["teacher_logits"])}, out_dir / "logit_distance",
            "‖z_s − z_t‖₂", "Student–teacher logit distance (test)"))
    if "mutual_information" in report:
        mi = report["mutual_information"]
        figs["mutual_information"] = str(plots.curve(mi["step"], {label: mi["value"]}, out_dir / "mutual_information",
                                                     "training step", "Î (nats)", "Mutual information (Müller §4)"))
    return figs


def summary(report: dict) -> str:
    cal = report["calibration_test"]
    lines = [f"{report['run_dir']}  ({report['model']} on {report['dataset']})",
             f"  test accuracy {cal['accuracy']['value']:.4f}   NLL {cal['nll']['value']:.4f}   "
             f"ECE {cal['ece']['value']:.4f} [{cal['ece']['low']:.4f}, {cal['ece']['high']:.4f}]"]
    if "temperature_scaling" in report:
        ts = report["temperature_scaling"]
        lines.append(f"  temperature scaling: T = {ts['temperature']:.3f}, ECE {ts['ece_before']:.4f} -> {ts['ece_after']:.4f}")
    stats = report["logit_statistics"]
    lines.append(f"  mean logit sum ({stats['logit_sum_split']}) {stats['logit_sum']['mean']:+.3f}, "
                 f"mean top-1/top-2 gap {stats['logit_gap_test']['mean']:.3f}, mean ‖r‖ {stats['feature_norm_test']['mean']:.3f}")
    if "teacher" in stats:
        t = stats["teacher"]
        lines.append(f"  vs teacher: agreement {t['agreement_test']:.4f}, KL(τ=1) {t['kl_tau1_test']:.4f}, "
                     f"mean ‖z_s − z_t‖ {t['logit_distance_test']['mean']:.3f}")
    for proj in report.get("projections", [report["projection"]]):
        lines.append(f"  template projection {proj['class_names']}: tightness " +
                     ", ".join(f"{s} {v:.3f}" for s, v in proj["tightness"].items()))
    if "mutual_information" in report:
        mi = report["mutual_information"]
        lines.append(f"  mutual information: {mi['value'][0]:.3f} -> {mi['value'][-1]:.3f} nats (bound {mi['bound_log_n']:.2f})")
    if "figures" in report:
        lines.append(f"  figures: {Path(next(iter(report['figures'].values()))).parent}/")
    return "\n".join(lines)


def _classifier_key(cfg, run_dir: Path) -> str:
    """The model's last linear layer in its state dict (``fc``; ``net.fc``, ``net.last_linear``, ... for timm)."""
    if not cfg.model.name.startswith("timm:"):
        return "fc"
    import torch

    from ..models import build_model, classifier_key

    result = read_json(run_dir / "result.json")
    try:
        with torch.device("meta"):
            return classifier_key(build_model(cfg.model.name, result["num_classes"], input_shape=result["input_shape"]))
    except ValueError as err:
        raise RunError(f"{run_dir}: {err}") from None
