"""``kdlab analyze`` of a translation run (Müller A.3, Table 3's EN-DE row; Appendix B, Fig. 7).

Reads what the run dir keeps (kdlab/translate.py): ``eval_val_tokens.npz`` (per validation
token: confidence and correctness at T = 1 and at the fitted T, the label's
log-probability, decoder features), ``eval_train_tokens.npz`` (the same for as many
training tokens), ``model.pt`` (the tied softmax: embedding rows + ``fc_bias``),
``tokenizer.model`` (piece names) and ``result.json`` (BLEU, the ECE/NLL-vs-T grid).

Convention (as Müller, "~10k validation tokens"): the first ``data.calibration_tokens``
target tokens of the validation split in corpus order, whole sentences, teacher-forced;
EOS counts as a token, padding and the BOS input do not. T is fitted on these tokens by
the training process with the full logits (kdlab.analysis.calibration.fit_temperature).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RunError
from ..runs import atomic_write_json, check_writable_dir, load_eval, make_dirs, read_json, torch_load
from . import plots
from .calibration import ece_of_confidence, token_calibration_report
from .representations import project_templates


def _tokens(run_dir: Path, split: str) -> dict:
    arrays = load_eval(run_dir, f"{split}_tokens")
    if arrays is None:
        raise RunError(f"{run_dir}: no eval_{split}_tokens.npz (a translation run finished by an older kdlab?)")
    return arrays


def piece_names(run_dir: Path) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer.model"))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def resolve_tokens(classes, names: list[str], val: dict) -> list[list[int]]:
    """Token triples for Fig. 7: given (ids or pieces, e.g. ▁die), or by default the three
    most frequent whole-word pieces among the stored validation tokens."""
    if classes:
        triples = classes if isinstance(classes[0], (list, tuple)) else [classes]
        out = []
        for triple in triples:
            ids = []
            for c in triple:
                if isinstance(c, str) and not c.isdigit():
                    if c not in names:
                        raise RunError(f"--classes: no piece {c!r} in this run's vocabulary (e.g. "
                                       f"{', '.join(names[4:10])})")
                    ids.append(names.index(c))
                else:
                    ids.append(int(c))
            if len(set(ids)) != 3 or not all(0 <= i < len(names) for i in ids):
                raise RunError(f"--classes needs three distinct tokens of the vocabulary, got {list(triple)}")
            out.append(ids)
        return out
    counts = np.bincount(val["labels"], minlength=len(names))
    words = np.array([n.startswith("▁") and len(n) >= 3 and n[1:].isalpha() for n in names])
    counts[~words] = 0  # whole words only (a piece that starts a word, 2+ letters): not '-', '▁', 's'
    counts[:4] = 0  # pad, unk, bos, eos
    if np.count_nonzero(counts) < 3:  # a tiny vocabulary: any pieces
        counts = np.bincount(val["labels"], minlength=len(names))
        counts[:4] = 0
    return [[int(i) for i in np.argsort(-counts, kind="stable")[:3]]]


def analyze_translation_run(run_dir: Path, classes=None, out_dir=None, n_bootstrap: int = 200,
                            figures: bool = True, log=print) -> dict:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "analysis"
    result = read_json(run_dir / "result.json")
    val, train = _tokens(run_dir, "val"), _tokens(run_dir, "train")
    summary = result["token_calibration"]
    temperature = float(val["temperature"])
    report: dict = {"run_dir": str(run_dir), "model": result["model"], "dataset": result["dataset"],
                    "num_classes": result["num_classes"], "kind": "translation",
                    "tokens": {"count": int(len(val["labels"])), "sentences": summary["sentences"],
                               "eos_included": True, "split": "val (first tokens in corpus order, teacher-forced)"}}
    report["calibration_val_tokens"] = token_calibration_report(val["confidence"], val["correct"],
                                                                val["label_logprob"], n_resamples=n_bootstrap)
    report["temperature_scaling"] = {
        "temperature": temperature, "fitted_on": "the same validation tokens (NLL, full logits)",
        "ece_before": ece_of_confidence(val["confidence"], val["correct"]),
        "ece_after": ece_of_confidence(val["confidence_ts"], val["correct"]),
        "nll_before": float(-val["label_logprob"].mean()), "nll_after": float(-val["label_logprob_ts"].mean()),
        "calibration_after": token_calibration_report(val["confidence_ts"], val["correct"], val["label_logprob_ts"],
                                                      n_resamples=n_bootstrap)}
    report["temperature_curve"] = summary["grid"]
    report["bleu"] = result.get("bleu", {})
    if "bleu_temperature" in result:
        report["bleu_temperature"] = result["bleu_temperature"]
    report["train_token_accuracy"] = float(train["correct"].mean())

    names = piece_names(run_dir)
    all_projections = _token_projections(run_dir, classes, names, train, val)
    report["projections"] = [{"classes": chosen, "class_names": [names[c] for c in chosen],
                              "tightness": {s: p["tightness"] for s, p in panels.items()}}
                             for chosen, panels in all_projections]
    report["projection"] = report["projections"][0]

    check_writable_dir(out_dir, "--out", probe=True)
    make_dirs(out_dir, "--out")
    if figures:
        report["figures"] = _figures(report, result, val, all_projections, out_dir, run_dir.name)
    atomic_write_json(out_dir / "analysis.json", report)
    log(summary_lines(report))
    return report


def _token_projections(run_dir: Path, classes, names: list[str], train: dict, val: dict) -> list:
    """Fig. 7: (token triple, {split: template projection}) for each triple, on the tied
    softmax's rows; a split gets a panel only where all three tokens occur in it."""
    state = torch_load(run_dir / "model.pt")
    if "embed.weight" not in state or "fc_bias" not in state:
        raise RunError(f"{run_dir}/model.pt has no tied softmax (embed.weight, fc_bias)")
    weight, bias = state["embed.weight"].double().numpy(), state["fc_bias"].double().numpy()
    all_projections = []
    for chosen in resolve_tokens(classes, names, val):
        panels = {}
        for split, arrays in (("train", train), ("val", val)):
            present = [c for c in chosen if np.any(arrays["labels"] == c)]
            if len(present) == 3:
                panels[split] = project_templates(arrays["features"].astype(np.float64), arrays["labels"], weight,
                                                  bias, chosen)
        all_projections.append((chosen, panels))
    return all_projections


def _figures(report: dict, result: dict, val: dict, all_projections: list, out_dir: Path, label: str) -> dict:
    temperature = report["temperature_scaling"]["temperature"]
    figs = {"reliability": str(plots.reliability_diagram(
        {label: (val["confidence"], val["correct"]),
         f"{label} + TS (T={temperature:.2f})": (val["confidence_ts"], val["correct"])},
        out_dir / "reliability"))}
    grid = result["token_calibration"]["grid"]
    figs["temperature_curve"] = str(plots.curve(
        grid["temperature"], {"ECE": grid["ece"], "NLL / 10": [v / 10 for v in grid["nll"]]},
        out_dir / "temperature_curve", "temperature T", "value",
        "Validation tokens against the softmax temperature (Fig. 6's shape)"))
    if "bleu_temperature" in result:
        curve = result["bleu_temperature"]
        figs["bleu_temperature"] = str(plots.curve(
            curve["temperature"], {f"beam {curve['beam']}": curve["bleu"]}, out_dir / "bleu_temperature",
            "temperature T", "BLEU (uncased)",
            f"Validation BLEU against T ({curve['sentences']} sentences)"))
    for number, ((chosen, panels), proj) in enumerate(zip(all_projections, report["projections"]), start=1):
        if panels:
            key = "projection" if number == 1 else f"projection_{number}"
            figs[key] = str(plots.template_projection(panels, proj["class_names"], out_dir / key))
    return figs


def summary_lines(report: dict) -> str:
    cal, ts = report["calibration_val_tokens"], report["temperature_scaling"]
    lines = [f"{report['run_dir']}  ({report['model']} on {report['dataset']}, {report['tokens']['count']:,} "
             "validation tokens)",
             f"  token accuracy {cal['accuracy']['value']:.4f}   NLL {cal['nll']['value']:.4f}   "
             f"ECE {cal['ece']['value']:.4f} [{cal['ece']['low']:.4f}, {cal['ece']['high']:.4f}]",
             f"  temperature scaling: T = {ts['temperature']:.3f}, ECE {ts['ece_before']:.4f} -> {ts['ece_after']:.4f}"]
    bleu = {k: v["bleu"] for k, v in report["bleu"].items() if isinstance(v, dict)}
    if bleu:
        lines.append("  BLEU (uncased): " + ", ".join(f"{k} {v:.2f}" for k, v in bleu.items()))
    for proj in report["projections"]:
        lines.append(f"  template projection {proj['class_names']}: tightness " +
                     ", ".join(f"{s} {v:.3f}" for s, v in proj["tightness"].items()))
    return "\n".join(lines)
