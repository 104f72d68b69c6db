"""A real recipe end to end at quick scale: `kdlab reproduce muller-mi` (two MNIST-1D runs
with the mutual-information probe, analysis, report). About two minutes on 2 cores."""

import json
import math

import pytest

from kdlab.cli import main

pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_reproduce_muller_mi_quick(tmp_path):
    out = tmp_path / "muller-mi"
    assert main(["reproduce", "muller-mi", "--workers", "2", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
    report = (out / "report.md").read_text()
    assert "Mutual information at the end of training" in report and "pending" not in report
    for analysis in out.glob("*/analysis/analysis.json"):
        mi = json.loads(analysis.read_text())["mutual_information"]
        assert len(mi["value"]) >= 30 and all(-0.5 < v < math.log(600) for v in mi["value"])
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
