"""`kdlab analyze` end to end on tiny digits runs, including the MI probe in training."""

import json
from pathlib import Path

import numpy as np
import pytest

from kdlab.analysis.analyze import analyze_run
from kdlab.cli import main
from kdlab.config import build_config
from kdlab.runs import read_metrics
from kdlab.train import train

pytest.importorskip("matplotlib")

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = {"out_dir": str(out), "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "milestones": [2]}}
    teacher = train(build_config({**base, "name": "teacher", "model": {"name": "mlp-128"},
                                  "mutual_information": {"every_steps": 10, "classes": [0, 1], "per_class": 40,
                                                         "views": 3}}), **QUIET)
    student = train(build_config({**base, "name": "student", "model": {"name": "mlp-32"},
                                  "loss": {"alpha": 1.0, "tau": 4.0}, "teacher": {"runs": [teacher["run_dir"]]}}),
                    **QUIET)
    return teacher, student


def test_mutual_information_is_logged_during_training(runs):
    teacher, _ = runs
    mi = read_metrics(teacher["run_dir"], "mutual_information")
    steps_per_epoch = -(-(1797 - 297 - 200) // 64)
    assert [r["step"] for r in mi] == list(range(10, 3 * steps_per_epoch + 1, 10))
    assert all(-0.5 < r["mutual_information"] <= np.log(80) + 1e-9 for r in mi)
    assert len(read_metrics(teacher["run_dir"])) == 3  # epoch records unaffected


def test_analyze_student_with_teacher(runs, tmp_path):
    teacher, student = runs
    lines = []
    report = analyze_run(student["run_dir"], teacher["run_dir"], classes=[0, 1, 2], out_dir=tmp_path,
                         n_bootstrap=50, log=lines.append)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["calibration_test"]["ece"]["value"] == pytest.approx(report["calibration_test"]["ece"]["value"])
    cal = saved["calibration_test"]
    for name in ("accuracy", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier"):
        assert cal[name]["low"] <= cal[name]["value"] <= cal[name]["high"]
    ts = saved["temperature_scaling"]
    assert ts["temperature"] > 0 and ts["fitted_on"] == "val"
    teacher_stats = saved["logit_statistics"]["teacher"]
    assert 0 <= teacher_stats["agreement_test"] <= 1 and teacher_stats["logit_distance_test"]["mean"] > 0
    assert saved["logit_statistics"]["logit_sum_split"] == "train"
    assert set(saved["projection"]["tightness"]) == {"train", "val"}
    for name in ("reliability", "projection", "logit_sum", "feature_norm", "logit_distance"):
        png = Path(saved["figures"][name])
        assert png.stat().st_size > 5000 and png.with_suffix(".svg").exists()
    assert "test accuracy" in lines[0]


def test_analyze_cli_with_mutual_information_and_errors(runs, tmp_path, capsys):
    teacher, _ = runs
    assert main(["analyze", teacher["run_dir"], "--out", str(tmp_path / "a"), "--bootstrap", "20"]) == 0
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert Path(saved["figures"]["mutual_information"]).exists()
    assert "mutual information" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert main(["analyze", teacher["run_dir"], "--classes", "0,1"]) == 2
    assert main(["analyze", teacher["run_dir"], "--classes", "a,b,c"]) == 2
    err = capsys.readouterr().err
    assert err.count("kdlab: error:") == 3
