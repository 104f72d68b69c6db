"""`kdlab compare` (and `kdlab analyze` of several runs) on tiny digits runs: one label per
setting with its seeds aggregated, figures on shared axes with their table, bad input
refused before anything is written; the report's HTML rendered from its Markdown."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdlab.analysis import plots
from kdlab.cli import main
from kdlab.compare import compare_runs, label_runs
from kdlab.config import build_config
from kdlab.htmlpage import markdown_to_html
from kdlab.train import train

pytest.importorskip("matplotlib")
pytest.importorskip("markdown")

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CE teacher, two KL τ=4 students (seeds 0 and 1) and one MSE student, on digits;
    and an MNIST-1D run (other data)."""
    out = tmp_path_factory.mktemp("runs")
    base = {"out_dir": str(out), "data": {"name": "digits", "val_size": 200},
            "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}}
    teacher = train(build_config({**base, "name": "teacher", "model": {"name": "mlp-64"}}), **QUIET)["run_dir"]
    student = {**base, "name": "student", "model": {"name": "mlp-16"}, "teacher": {"runs": [teacher]}}
    kl = [train(build_config({**student, "seed": seed, "loss": {"alpha": 1.0, "tau": 4.0}}), **QUIET)["run_dir"]
          for seed in (0, 1)]
    mse = train(build_config({**student, "loss": {"alpha": 1.0, "kd": "mse"}}), **QUIET)["run_dir"]
    other = train(build_config({"out_dir": str(out), "name": "other", "model": {"name": "mlp-16"},
                                "data": {"name": "mnist1d", "num_samples": 500}, "optim": {"epochs": 1}}),
                  **QUIET)["run_dir"]
    return {"teacher": teacher, "kl": kl, "mse": mse, "other": other}


def test_three_runs_on_shared_axes_labelled_by_objective(runs, tmp_path):
    kl, mse = runs["kl"], runs["mse"]
    out = tmp_path / "cmp"
    comparison = compare_runs([kl[1], mse, kl[0]], out, log=lambda *a: None)
    # runs differing only by seed are one label, its seeds in order; KL before MSE (the papers' order)
    assert comparison["groups"] == {"KL τ=4 α=1": [kl[0], kl[1]], "MSE α=1": [mse]}
    assert list(comparison["references"]) == ["teacher (CE, mlp-64)"]
    figures = comparison["figures"]
    assert set(figures) == {"logit_sum", "logit_distance", "feature_norm", "reliability", "projection"}  # one τ: no τ axis
    # the legends read from the drawn matplotlib Figures: what the runs are, not their hashes
    assert figures["logit_sum"]["legend"] == ["KL τ=4 α=1 (2 seeds)", "MSE α=1", "teacher (CE, mlp-64)"]
    assert figures["feature_norm"]["legend"] == ["KL τ=4 α=1 (2 seeds)", "MSE α=1", "teacher (CE, mlp-64)"]
    assert figures["logit_distance"]["legend"] == ["KL τ=4 α=1 (2 seeds)", "MSE α=1"]
    assert figures["reliability"]["legend"][0] == "perfect calibration"
    assert [t.split(", ECE")[0] for t in figures["reliability"]["legend"][1:]] == ["KL τ=4 α=1 (2 seeds)", "MSE α=1"]
    assert [t.split(" (seed")[0] for t in figures["projection"]["titles"]] == ["KL τ=4 α=1", "MSE α=1"] * 2
    for entry in figures.values():
        png = Path(entry["png"])
        assert png.parent == out and png.stat().st_size > 5000 and png.with_suffix(".svg").is_file()
    assert not any("student-" in text for entry in figures.values() for text in entry["legend"])
    # the table beside the figures: each seed's number and their mean
    rows = {row["label"]: row for row in comparison["rows"]}
    kl_row = rows["KL τ=4 α=1"]
    accuracies = [100 * json.loads((Path(d) / "result.json").read_text())["final"]["test_acc"] for d in kl]
    assert kl_row["seeds"] == [0, 1] and kl_row["test_acc"]["by_seed"] == pytest.approx({"0": accuracies[0], "1": accuracies[1]})
    assert kl_row["test_acc"]["mean"] == pytest.approx(np.mean(accuracies))
    train_0 = np.load(Path(kl[0]) / "eval_train.npz")
    assert comparison["split"] == "train"
    assert kl_row["logit_sum"]["by_seed"]["0"] == pytest.approx(train_0["logits"].astype(float).sum(1).mean())
    assert rows["teacher (CE, mlp-64)"]["reference"] and "logit_distance" not in rows["teacher (CE, mlp-64)"]
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(comparison["rows"]))
    md = (out / "comparison.md").read_text()
    assert "| KL τ=4 α=1 | 0, 1 |" in md and "| MSE α=1 | 0 |" in md and "![" in md
    html = (out / "comparison.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures) and "<table>" in html
    assert "`" not in html and "<code>" in html  # run names as code, rendered


def test_accuracy_against_tau_with_seed_bands(runs, tmp_path):
    """Two τ: test accuracy against τ, KL as a line with a band, MSE as a level."""
    config = json.loads(json.dumps({"out_dir": str(tmp_path), "name": "tau1", "seed": 0,
                                    "data": {"name": "digits", "val_size": 200}, "model": {"name": "mlp-16"},
                                    "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05},
                                    "loss": {"alpha": 1.0, "tau": 1.0}, "teacher": {"runs": [runs["teacher"]]}}))
    tau1 = train(build_config(config), **QUIET)["run_dir"]
    comparison = compare_runs([*runs["kl"], tau1, runs["mse"]], tmp_path / "cmp", log=lambda *a: None)
    assert list(comparison["groups"]) == ["KL τ=1 α=1", "KL τ=4 α=1", "MSE α=1"]
    assert comparison["figures"]["accuracy"]["legend"] == ["KL α=1 (2 seeds)", "MSE α=1"]


def test_densities_are_the_mean_of_the_seeds_with_their_range_as_band():
    rng = np.random.default_rng(0)
    seeds = [rng.normal(0, 1, 400), rng.normal(0.5, 1, 400)]
    fig = plots.overlaid_densities({"KL τ=4": seeds, "MSE": [rng.normal(0, 0.3, 400)]}, "Σ_k z_k", "t",
                                   references={"teacher": [rng.normal(0, 0.2, 400)]}, bins=20)
    ax = fig.axes[0]
    assert plots.legend_labels(fig) == ["KL τ=4 (2 seeds)", "MSE", "teacher"]
    kl_line, _, teacher_line = ax.get_lines()
    assert teacher_line.get_linestyle() == "--"
    low, high = ax.get_xlim()
    edges = np.linspace(low, high, 21)
    width = edges[1] - edges[0]
    expected = np.mean([np.histogram(s, edges)[0] / (400 * width) for s in seeds], axis=0)
    assert kl_line.get_ydata() == pytest.approx(expected)
    assert len(ax.collections) == 1  # a band for the label with two seeds only


def test_analyze_of_several_runs_is_the_comparison(runs, tmp_path):
    out = tmp_path / "both"
    assert main(["analyze", runs["kl"][0], runs["mse"], "--out", str(out)]) == 0
    assert set(json.loads((out / "comparison.json").read_text())["groups"]) == {"KL τ=4 α=1", "MSE α=1"}
    assert label_runs([runs["teacher"], runs["mse"]]).keys() == {"CE", "MSE α=1"}


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["mse"], unfinished)
    (unfinished / "result.json").unlink()
    out = tmp_path / "never"
    cases = {
        "one run": ([runs["mse"]], "compare needs two runs or more, got 1"),
        "unfinished": ([runs["mse"], str(unfinished)], "is not a finished kdlab run (no result.json)"),
        "other data": ([runs["mse"], runs["other"]], "runs of different data cannot share axes"),
        "twice": ([runs["mse"], runs["mse"]], "is named twice"),
        "no run dir": ([runs["mse"], str(tmp_path / "nothing")], "is not a kdlab run dir"),
    }
    for args, message in cases.values():
        assert main(["compare", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("kdlab: error: ") and message in err, err
        assert not out.exists()
    assert main(["analyze", runs["mse"], runs["kl"][0], "--teacher", runs["teacher"], "--out", str(out)]) == 2
    assert "--teacher and --classes are for one run" in capsys.readouterr().err and not out.exists()


def test_report_html_renders_its_markdown(tmp_path):
    """Code spans become <code> (no literal backticks), tables tables, figures inlined with
    their caption."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [0, 1])
    (tmp_path / "figures").mkdir()
    plots.save(fig, tmp_path / "figures" / "line")
    text = ("# Title\n\n- Scale: quick — figures from `kdlab analyze` (seed 0)\n\n"
            "![KL τ=4: ‖z_s − z_t‖](figures/line.png)\n\n| | KL τ=1 | Σ_k z_k |\n|---|---:|---:|\n| a | 1 | 2 |\n")
    html = markdown_to_html(text, "Title", tmp_path)
    assert "<code>kdlab analyze</code>" in html and "`" not in html
    assert "<table>" in html and "<th>Σ_k z_k</th>" in html.replace(' style="text-align: right;"', "")
    assert "<em>" not in html  # the underscores of z_s and z_k are not emphasis
    assert '<figcaption>KL τ=4: ‖z_s − z_t‖</figcaption>' in html and html.count("data:image/png;base64,") == 1
    assert "<title>Title</title>" in html
