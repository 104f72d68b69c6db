"""Sweeps end to end on a tiny recipe: local processes, Ray, resume/skip, report, browser."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.errors import ConfigError
from kdlab.recipes import expand, load_recipe
from kdlab.report import write_report
from kdlab.runs import read_json
from kdlab.sweep import run_sweep

TINY = {
    "id": "tiny", "title": "Tiny test recipe", "source": "tests",
    "scales": {
        "quick": {"note": "digits, 2 epochs", "seeds": [0, 1],
                  "base": {"data": {"name": "digits", "val_size": 200},
                           "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
                  "stages": [
                      {"name": "teacher", "seeds": [0], "config": {"model": {"name": "mlp-64"}}},
                      {"name": "student", "teachers": ["teacher"], "analyze": True,
                       "config": {"model": {"name": "mlp-16"}, "loss": {"alpha": 1.0}},
                       "axes": {"objective": [{"label": "KL τ=∞", "set": {"loss.tau": float("inf")}},
                                              {"label": "MSE", "set": {"loss.kd": "mse", "loss.mse_reduction": "mean"}}]}},
                  ]},
        "paper": {"stages": [{"name": "teacher"}]},
    },
    "report": [
        {"kind": "table", "title": "Accuracy", "stage": "student", "cols": "objective",
         "paper": {"": {"KL τ=∞": 90.0, "MSE": 91.0}, "CIFAR-100": {"MSE": 70.5}}},
        {"kind": "curve", "title": "Accuracy by objective", "stage": "student", "x": "objective", "spread": "minmax"},
        {"kind": "figures", "title": "Reliability", "stage": "student", "figures": ["reliability"]},
        {"kind": "claims", "title": "Claims", "stage": "student",
         "claims": [{"claim": "MSE ≥ KL τ=∞", "a": {"objective": "MSE"}, "b": {"objective": "KL τ=∞"}, "paper": 0.5},
                    {"claim": "student > teacher", "a": {"objective": "MSE"}, "b": {"stage": "teacher"}}]},
    ],
}


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("# tiny\n" + yaml.safe_dump(TINY, allow_unicode=True))
    return path


def _quiet(*args):
    pass


def test_local_sweep_with_two_processes_then_skip_then_report(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe)
    out = tmp_path / "sweep"
    manifest = run_sweep(recipe, "quick", out, workers=2, progress=False, log=_quiet)
    assert [r["status"] for r in manifest["runs"]] == ["done"] * 5
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    lines = []
    again = run_sweep(recipe, "quick", out, workers=2, progress=False, log=lines.append)
    assert "5 finished already" in lines[0] and all(r["status"] == "done" for r in again["runs"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == mtimes  # nothing retrained
    # a run without result.json (killed, or deleted) is trained again by the next sweep
    victim = expand(recipe, "quick", out)[-1].run_dir
    (victim / "result.json").unlink()
    run_sweep(recipe, "quick", out, progress=False, log=_quiet)
    assert (victim / "result.json").is_file()

    write_report(out, log=_quiet)
    md = (out / "report.md").read_text()
    assert "(paper 90)" in md and "Tiny test recipe" in md and "Hardware:" in md
    assert "| paper: CIFAR-100 |  | 70.5 |" in md  # paper rows the quick scale does not have
    assert md.count(" ± ") >= 2 and "[" in md.split("Accuracy by objective")[1]  # std, then min/max
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 and "<table>" in html
    # the same tables as data, with each seed's number (paired comparisons across seeds)
    data = json.loads((out / "report.json").read_text())
    assert data["recipe"] == "tiny" and data["runs_finished"] == 5 and len(data["tables"]) == 3
    table = data["tables"][0]
    assert table["cols_axis"] == "objective" and table["metric"] == "test_acc"
    cell = next(c for c in table["cells"] if c["col"] == "MSE")
    assert cell["paper"] == 91.0 and cell["n"] == 2 and set(cell["by_seed"]) == {"0", "1"}
    assert cell["mean"] == pytest.approx(sum(cell["by_seed"].values()) / 2) and "std" in cell
    run = next(r for r in expand(recipe, "quick", out) if r.labels.get("objective") == "MSE" and r.seed == 1)
    assert cell["by_seed"]["1"] == pytest.approx(100 * read_json(run.run_dir / "result.json")["final"]["test_acc"])
    assert {"min", "max"} <= set(data["tables"][1]["cells"][0])  # the curve's spread: min/max
    # claims: paired by seed; a teacher of one seed pairs with the student of that seed only
    claims = data["tables"][2]["claims"]
    mse, kl = cell["by_seed"], next(c for c in table["cells"] if c["col"] == "KL τ=∞")["by_seed"]
    first = claims[0]
    assert first["seeds"] == [0, 1] and first["paper"] == 0.5
    assert first["mean_diff"] == pytest.approx(sum(mse[s] - kl[s] for s in "01") / 2)
    assert first["holds"] == sum(mse[s] >= kl[s] for s in "01") and first["verdict"] in (
        "reproduced", "opposite", "not resolved")
    assert claims[1]["seeds"] == [0] and claims[1]["verdict"] == "too few seeds"
    assert "| MSE ≥ KL τ=∞ |" in md and "seeds where it holds" in md
    # the minimum detectable difference beside each verdict: (2 + z_0.8)·SE, none without an SE
    assert first["mdd"] == pytest.approx(2.8416212335729143 * first["se"], rel=1e-12)
    assert claims[1]["mdd"] is None and "| MDD (80%) |" in md and f"| {first['mdd']:.2f} |" in md


def test_failed_teacher_skips_its_students(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe)
    out = tmp_path / "sweep"
    teacher_dir = expand(recipe, "quick", out)[0].run_dir
    teacher_dir.mkdir(parents=True)
    (teacher_dir / "checkpoint.pt").write_bytes(b"corrupt")
    lines = []
    manifest = run_sweep(recipe, "quick", out, progress=False, log=lines.append)
    statuses = [r["status"] for r in manifest["runs"]]
    assert statuses == ["failed"] + ["skipped"] * 4
    assert any("corrupt" in l for l in lines)


def test_reproduce_cli_runs_sweep_analyze_report(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", str(tiny_recipe), "--out", str(out), "--no-progress"]) == 0
    analysed = list(out.glob("tiny-student-*/analysis/reliability.png"))
    assert len(analysed) == 4
    said = capsys.readouterr().out  # the analysis and report stages say what they do
    assert "analysing 4 run(s)" in said and "analysed 4/4: student[" in said and "writing the report" in said
    assert "Reliability" in (out / "report.md").read_text()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["sweep", "no-such-recipe"]) == 2


def test_ray_executor_on_a_tiny_grid(tiny_recipe, tmp_path):
    pytest.importorskip("ray")
    manifest = run_sweep(load_recipe(tiny_recipe), "quick", tmp_path / "ray", executor="ray", workers=2,
                         progress=False, log=_quiet)
    assert [r["status"] for r in manifest["runs"]] == ["done"] * 5
    results = [json.loads(p.read_text()) for p in (tmp_path / "ray").glob("*/result.json")]
    assert len(results) == 5 and all(r["final"]["test_acc"] > 0 for r in results)
    # N GPUs per run = one torchrun of N processes on one node: refused where no node has them
    data = yaml.safe_load(Path(tiny_recipe).read_text())
    data["scales"]["quick"]["gpus_per_run"] = 2
    Path(tiny_recipe).write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"gpus_per_run=2: .* largest node of this Ray cluster has 0 GPU"):
        run_sweep(load_recipe(tiny_recipe), "quick", tmp_path / "ray2", executor="ray", progress=False, log=_quiet)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver not installed")
def test_report_renders_in_headless_chromium(tiny_recipe, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    out = tmp_path / "repro"
    assert main(["reproduce", str(tiny_recipe), "--out", str(out), "--no-progress"]) == 0
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((out / "report.html").as_uri())
        assert driver.title == "Tiny test recipe"
        images = driver.find_elements("tag name", "img")
        assert len(images) >= 2
        for image in images:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10000
    finally:
        driver.quit()


def test_settings_apply_to_every_run_and_reach_the_report(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe)
    plain = expand(recipe, "quick", tmp_path)
    # device is not part of a run's identity; bf16 is; teacher.* settings go to students only
    assert [r.run_dir for r in expand(recipe, "quick", tmp_path, ["device=cpu"])] == [r.run_dir for r in plain]
    bf16 = expand(recipe, "quick", tmp_path, ["bf16=true", "teacher.cache.mode=full"])
    assert all(r.config.bf16 for r in bf16) and not {r.run_dir for r in bf16} & {r.run_dir for r in plain}
    assert bf16[0].config.teacher is None and all(r.config.teacher.cache.mode == "full" for r in bf16[1:])
    with pytest.raises(Exception, match="unknown config key 'optimizer'"):
        expand(recipe, "quick", tmp_path, ["optimizer.lr=1"])
    # a shorter schedule keeps its shape: Kim's drops at 50% and 75% move with optim.epochs
    kim = load_recipe("kim-logits")
    assert {tuple(r.config.optim.milestones) for r in expand(kim, "quick", tmp_path)} == {(50, 75)}
    assert {tuple(r.config.optim.milestones) for r in expand(kim, "quick", tmp_path, ["optim.epochs=10"])} == {(5, 8)}
    assert {tuple(r.config.optim.milestones)
            for r in expand(kim, "quick", tmp_path, ["optim.epochs=10", "optim.milestones=[3]"])} == {(3,)}
    from kdlab.recipes import _rescale_milestones  # a drop never lands on (or past) the last epoch; defaults move too

    assert _rescale_milestones({"optim": {"epochs": 200, "milestones": [100, 199]}},
                               {"optim": {"epochs": 10, "milestones": [100, 199]}}, ["optim.epochs=10"]) == \
        {"optim": {"epochs": 10, "milestones": [5, 9]}}
    assert _rescale_milestones({}, {"optim": {"epochs": 20}}, ["optim.epochs=20"])["optim"]["milestones"] == [10, 15]

    out = tmp_path / "sweep"
    assert main(["sweep", str(tiny_recipe), "--out", str(out), "--no-progress", "--workers", "2", "--threads", "1",
                 "--set", "optim.epochs=1", "--set", "eval_every=1"]) == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["threads"] == 1 and manifest["settings"] == ["optim.epochs=1", "eval_every=1"]
    for run in manifest["runs"]:
        assert json.loads((Path(run["run_dir"]) / "result.json").read_text())["epochs"] == 1
    write_report(out, log=_quiet)  # the report finds the runs the settings made
    md = (out / "report.md").read_text()
    assert "Runs: 5/5 finished" in md and "settings for every run: optim.epochs=1 eval_every=1" in md
    assert main(["sweep", str(tiny_recipe), "--out", str(out), "--threads", "0"]) == 2


def test_stages_hand_their_student_on_and_resume_stage_by_stage(tmp_path):
    """``init_from``: each run of a stage starts from the matching run of an earlier stage
    (model.init_run, as FitNets' hint → KD); a re-run trains only what did not finish, and a
    stage whose start failed is skipped."""
    chain = {
        "id": "chain", "title": "Two-stage chain", "source": "tests",
        "scales": {"quick": {"seeds": [0, 1],
                             "base": {"data": {"name": "digits", "val_size": 200, "augment": "none"},
                                      "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}},
                             "stages": [
                                 {"name": "teacher", "seeds": [0], "config": {"model": {"name": "mlp-64-64"}}},
                                 {"name": "hint", "teachers": ["teacher"],
                                  "config": {"model": {"name": "mlp-16-16"},
                                             "distill": {"method": "fitnets", "options": {"variant": "hint"}}}},
                                 {"name": "kd", "teachers": ["teacher"], "init_from": "hint",
                                  "config": {"model": {"name": "mlp-16-16"}, "loss": {"alpha": 1.0}}}]}}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain, allow_unicode=True))
    recipe, out = load_recipe(path), tmp_path / "sweep"
    runs = expand(recipe, "quick", out)
    hints = {r.seed: r for r in runs if r.stage == "hint"}
    for run in (r for r in runs if r.stage == "kd"):
        assert run.starts_from is hints[run.seed] and run.config.model.init_run == str(hints[run.seed].run_dir)
    assert all(r["status"] == "done" for r in run_sweep(recipe, "quick", out, progress=False, log=_quiet)["runs"])
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    kd = next(r for r in runs if r.stage == "kd" and r.seed == 1)
    (kd.run_dir / "result.json").unlink()
    run_sweep(recipe, "quick", out, progress=False, log=_quiet)  # the kd stage alone trains again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json") if p.parent != kd.run_dir} == \
        {p: t for p, t in mtimes.items() if p.parent != kd.run_dir}
    assert (kd.run_dir / "result.json").is_file()
    # a start that fails: its later stage is skipped, and says why
    shutil.rmtree(out)
    hints[0].run_dir.mkdir(parents=True)
    (hints[0].run_dir / "checkpoint.pt").write_bytes(b"corrupt")
    lines = []
    manifest = run_sweep(recipe, "quick", out, progress=False, log=lines.append)
    status = {(r["stage"], r["seed"]): r["status"] for r in manifest["runs"]}
    assert status[("hint", 0)] == "failed" and status[("kd", 0)] == "skipped" and status[("kd", 1)] == "done"
    assert any("the run it starts from" in line for line in lines)
    chain["scales"]["quick"]["stages"][2]["init_from"] = "nope"
    path.write_text(yaml.safe_dump(chain, allow_unicode=True))
    with pytest.raises(ConfigError, match="starts from unknown or later stage 'nope'"):
        expand(load_recipe(path), "quick", out)
