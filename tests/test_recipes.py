import math
from pathlib import Path

import numpy as np
import pytest

from kdlab.cli import main
from kdlab.errors import ConfigError
from kdlab.config import load_config
from kdlab.recipes import (CONFIG_DIR, RECIPE_DIR, Recipe, example_config_path, expand, list_example_configs,
                           list_recipes, load_recipe, resolve_config_path)

try:
    import timm
    del timm  # imported only to learn whether it loads (pyflakes reads a del as a use)
    TIMM = True
except Exception:  # not installed, or no torchvision that loads beside this torch
    TIMM = False
BUILTIN_QUICK_DATA = {"digits", "mnist1d", "fashion-mnist"}
# recipes whose paper scale waits for a model family (say why in the recipe's header)
PAPER_SCALE_PENDING: dict[str, str] = {}
# studies: recipes that answer kdlab's own questions (docs/studies), run by path, quick scale only
STUDIES = sorted((Path(__file__).resolve().parents[1] / "docs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", list_recipes(), ids=lambda p: p.stem)
def test_every_recipe_expands_at_both_scales(path, tmp_path):
    recipe = load_recipe(path)
    expected = {"quick"} if recipe.id in PAPER_SCALE_PENDING else {"quick", "paper"}
    assert set(recipe.scales) == expected
    assert path.read_text().startswith("#"), "a recipe starts with a header saying what it reproduces"
    for scale in sorted(expected):
        if scale == "paper" and "timm:" in path.read_text() and not TIMM:
            # timm's ImageNet models: expanded in tests/test_timm.py; where timm is missing, a clear error
            with pytest.raises(ConfigError, match=r"kdlab\[timm\]"):
                expand(recipe, scale, tmp_path)
            continue
        runs = expand(recipe, scale, tmp_path)
        assert runs and len({r.run_dir for r in runs}) == len(runs), "every run has its own dir"
        stages = [r.stage for r in runs]
        for run in runs:
            for teacher in run.teacher_of:
                assert stages.index(teacher.stage) < stages.index(run.stage)
        if scale == "quick":  # built-in data, or an image folder made from it
            assert all(r.config.data.name in BUILTIN_QUICK_DATA or (r.config.data.root or "").startswith("builtin:")
                       for r in runs)
    for item in recipe.report:
        assert item.stage in {s.name for s in recipe.scales["quick"].stages}


def _recipe(stages, seeds=(0, 1)):
    return Recipe.model_validate({"id": "t", "title": "t", "source": "test", "scales": {"quick": {
        "seeds": list(seeds), "base": {"data": {"name": "digits"}, "model": {"name": "mlp-16"}}, "stages": stages}}})


def test_teachers_match_by_common_axes_and_seed(tmp_path):
    recipe = _recipe([
        {"name": "teacher", "axes": {"size": [{"label": "s", "set": {"model.name": "mlp-8"}},
                                              {"label": "l", "set": {"model.name": "mlp-32"}}]}},
        {"name": "student", "teachers": ["teacher"], "config": {"loss": {"alpha": 1.0}},
         "axes": {"size": [{"label": "s"}, {"label": "l"}], "tau": [{"label": "inf", "set": {"loss.tau": math.inf}}]}},
    ])
    runs = expand(recipe, "quick", tmp_path)
    students = [r for r in runs if r.stage == "student"]
    assert len(students) == 4
    for s in students:
        (t,) = s.teacher_of
        assert t.labels["size"] == s.labels["size"] and t.seed == s.seed
        assert s.config.teacher.runs == [str(t.run_dir)] and math.isinf(s.config.loss.tau)


def test_a_stage_keeps_its_own_teacher_settings(tmp_path):
    # the resolved teacher runs join the stage's teacher section; they do not replace it
    stages = [{"name": "teacher"}, {"name": "student", "teachers": ["teacher"], "seeds": [0],
                                     "config": {"loss": {"alpha": 1.0}, "teacher": {"cache": {"mode": "lazy"}}}}]
    (student,) = [r for r in expand(_recipe(stages, seeds=(0,)), "quick", tmp_path) if r.stage == "student"]
    assert student.config.teacher.cache.mode == "lazy" and len(student.config.teacher.runs) == 1
    recipe = load_recipe("kim-table5")
    students = [r for r in expand(recipe, "quick", tmp_path) if r.stage == "student"]
    assert students and all(r.config.teacher.store.crops == 8 for r in students)


def test_ensembles_and_ambiguity(tmp_path):
    stages = [{"name": "teacher"}, {"name": "student", "teachers": ["teacher"], "seeds": [0],
                                     "config": {"loss": {"alpha": 1.0}}, "ensemble": True}]
    runs = expand(_recipe(stages, seeds=(0, 1, 2)), "quick", tmp_path)
    (student,) = [r for r in runs if r.stage == "student"]
    assert len(student.config.teacher.runs) == 3
    stages[1]["ensemble"] = False
    stages[0]["axes"] = {"width": [{"label": "a"}, {"label": "b", "set": {"model.name": "mlp-8"}}]}
    with pytest.raises(ConfigError, match="match"):
        expand(_recipe(stages), "quick", tmp_path)


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="later stage"):
        expand(_recipe([{"name": "student", "teachers": ["teacher"]}, {"name": "teacher"}]), "quick", tmp_path)
    with pytest.raises(ConfigError, match="loss.tau"):
        expand(_recipe([{"name": "x", "axes": {"t": [{"label": "bad", "set": {"loss.tau": 0}}]}}]), "quick", tmp_path)
    with pytest.raises(ConfigError, match="no 'paper' scale"):
        expand(_recipe([{"name": "x"}]), "paper", tmp_path)


def test_packaged_recipes_and_example_configs(tmp_path, monkeypatch, capsys):
    # package data (kdlab/assets/), so a wheel has them too: tests/test_packaging.py
    assert RECIPE_DIR.parent == CONFIG_DIR.parent and RECIPE_DIR.parent.parent.name == "kdlab"
    assert {"kim-table2", "muller-mnist"} <= {p.stem for p in list_recipes()}
    assert load_recipe("kim-table2").id == "kim-table2"
    with pytest.raises(ConfigError, match="known: kd-translation, kim-ensemble, .*, muller-translation$"):
        load_recipe("no-such-recipe")
    assert {p.stem for p in list_example_configs()} == {"student-mnist1d", "teacher-mnist1d"}
    for name in ("teacher-mnist1d", "teacher-mnist1d.yaml", "configs/teacher-mnist1d.yaml"):
        assert example_config_path(name) == CONFIG_DIR / "teacher-mnist1d.yaml"
    with pytest.raises(ConfigError, match="examples: student-mnist1d, teacher-mnist1d"):
        example_config_path("elsewhere/teacher-mnist1d.yaml")

    monkeypatch.chdir(tmp_path)  # a file of that name wins over the packaged example
    Path("teacher-mnist1d.yaml").write_text("model: {name: mlp-8}\n")
    assert resolve_config_path("teacher-mnist1d.yaml") == Path("teacher-mnist1d.yaml")
    assert resolve_config_path("teacher-mnist1d") == CONFIG_DIR / "teacher-mnist1d.yaml"
    with pytest.raises(ConfigError, match="not found .*teacher-mnist1d"):
        resolve_config_path("missing.yaml")

    assert main(["configs"]) == 0
    assert "teacher-mnist1d" in capsys.readouterr().out
    assert main(["configs", "teacher-mnist1d"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "teacher-mnist1d.yaml").read_text(encoding="utf-8")
    assert main(["train", "teacher-mnist1d", "optim.epochs=1", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name: cnn1d-64" in printed and "epochs: 1" in printed


def test_minimum_detectable_difference_closed_form():
    from statistics import NormalDist

    from kdlab.report import minimum_detectable_difference

    rng = np.random.default_rng(0)
    for se, threshold, power in zip(rng.uniform(0, 3, 20), rng.uniform(1, 3, 20), rng.uniform(0.5, 0.99, 20)):
        expected = (threshold + NormalDist().inv_cdf(power)) * se
        assert minimum_detectable_difference(se, threshold, power) == pytest.approx(expected, rel=1e-12)
        # by construction, a true difference of one MDD passes the threshold with probability `power`
        assert 1 - NormalDist(expected, se).cdf(threshold * se) == pytest.approx(power, abs=1e-9)
    assert minimum_detectable_difference(1.0) == pytest.approx(2.8416212335729143)
    assert minimum_detectable_difference(None) is None


def test_paired_verdict_follows_the_rule():
    from kdlab.report import paired_verdict

    assert paired_verdict([0.1, 0.2, 0.05])[0] == "reproduced"  # the sign in every seed
    assert paired_verdict([-0.1, -2.0, -0.3])[0] == "opposite"
    verdict, se = paired_verdict([3.0, 2.9, 3.1, -0.1])  # one seed against, mean > 2 SE
    assert verdict == "reproduced" and se == pytest.approx(np.std([3.0, 2.9, 3.1, -0.1], ddof=1) / 2)
    assert paired_verdict([1.0, -1.0, 0.5])[0] == "not resolved"
    assert paired_verdict([1.0]) == ("too few seeds", None)
    # a claim written with ≥ holds on a tie: the sign test and the count of seeds agree
    assert paired_verdict([0.0, 0.2, 0.0])[0] == "not resolved"
    assert paired_verdict([0.0, 0.2, 0.0], weak=True)[0] == "reproduced"
    assert paired_verdict([0.0, -0.2, -0.1], weak=True)[0] == "not resolved"


def test_claims_table_prints_the_mdd_after_the_verdict():
    """A 3-seed claim not resolved: its SE is the sample SD of the differences / √3, and the
    table's MDD (80%) column, right after the verdict, is 2.8416·SE in the metric's points."""
    from kdlab.report import _claims_md, minimum_detectable_difference, paired_verdict

    diffs = [1.0, -1.0, 0.5]
    verdict, se = paired_verdict(diffs)
    assert verdict == "not resolved" and se == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3), abs=1e-12)
    mdd = minimum_detectable_difference(se)
    assert abs(mdd - 2.8416212335729143 * se) < 1e-9
    claim = {"claim": "KL τ=∞ > KL τ=1", "n": 3, "mean_a": 80.5, "mean_b": 80.33333, "mean_diff": float(np.mean(diffs)),
             "se": se, "mdd": mdd, "holds": 2, "verdict": verdict, "paper": 0.4}
    pending = {"claim": "MSE ≥ KL τ=20", "n": 0, "paper": None}
    header, rule, row, waiting = _claims_md([claim, pending]).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[columns.index("verdict") + 1] == "MDD (80%)" and rule.count("|") == header.count("|")
    assert row == f"| KL τ=∞ > KL τ=1 | 80.50 | 80.33 | +0.17 ± {se:.2f} | 2/3 | not resolved | {mdd:.2f} | +0.40 |"
    assert [c.strip() for c in waiting.strip("|").split("|")][columns.index("MDD (80%)")] == "–"


@pytest.mark.parametrize("path", list_recipes() + STUDIES, ids=lambda p: p.stem)
def test_every_claim_selects_one_run_per_seed_on_both_sides(path, tmp_path):
    """A claim's sides name runs that exist in the quick grid, one per seed (else the report fails)."""
    from kdlab.report import _claim_side

    recipe = load_recipe(path)
    runs = expand(recipe, "quick", tmp_path)
    for item in recipe.report:
        for claim in item.claims:
            a, b = _claim_side(item, runs, claim.a, claim.claim), _claim_side(item, runs, claim.b, claim.claim)
            assert len(a.keys() & b.keys()) >= 1, claim.claim


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_study_expands_on_builtin_data(path, tmp_path):
    recipe = load_recipe(path)
    assert path.read_text().startswith("#"), "a study starts with a header saying what it asks"
    runs = expand(recipe, "quick", tmp_path)
    assert runs and len({r.run_dir for r in runs}) == len(runs)
    assert all(r.config.data.name in BUILTIN_QUICK_DATA for r in runs)
    for item in recipe.report:
        assert item.stage in {s.name for s in recipe.scales["quick"].stages}


def test_bn_study_crosses_teacher_and_student_normalisation(tmp_path):
    """Each KD student keeps its own architecture and takes the teacher its label names."""
    runs = expand(load_recipe(next(p for p in STUDIES if p.stem == "bn-kd-gain")), "quick", tmp_path)
    teachers = {r.labels["teacher"]: r for r in runs if r.stage == "teacher"}
    assert teachers["plain"].config.model.name == "mlp-160-160-160"
    assert teachers["BN"].config.model.name == "mlp-160-160-160-bn"
    kd = [r for r in runs if r.stage == "kd"]
    assert len(kd) == 2 * 2 * 2 * 3
    for r in kd:
        assert r.config.model.name == {"plain": "mlp-64-64", "BN": "mlp-64-64-bn"}[r.labels["student"]]
        assert r.config.teacher.runs == [str(teachers[r.labels["teacher"]].run_dir)]


def test_kim_ensemble_students_are_the_small_model_whatever_their_teacher(tmp_path):
    """The single-teacher students are labelled by teacher but keep the student architecture
    (an axis value that sets model.name would turn each into a copy of its teacher)."""
    runs = expand(load_recipe("kim-ensemble"), "quick", tmp_path)
    students = [r for r in runs if r.stage in ("single_student", "ensemble_student")]
    assert len(students) == 4 * 10 and {r.config.model.name for r in students} == {"mlp-64-64-bn"}  # 4 settings × 10 seeds
    teachers = {r.labels["teacher"]: r.config.model.name for r in runs if r.stage == "teacher"}
    assert len(set(teachers.values())) == 3


@pytest.mark.parametrize("path", list_recipes(), ids=lambda p: p.stem)
def test_no_student_axis_copies_its_teachers_architecture(path):
    """A student stage that shares an axis with its teacher stage must not reuse the
    teacher's axis values when they set model.name (the student would become the teacher)."""
    recipe = load_recipe(path)
    for scale in recipe.scales.values():
        stages = {s.name: s for s in scale.stages}
        for stage in scale.stages:
            for teacher in (stages[n] for n in stage.teachers):
                for axis, values in stage.axes.items():
                    sets = [v.set.get("model.name") for v in values]
                    theirs = [v.set.get("model.name") for v in teacher.axes.get(axis, [])]
                    assert not (any(sets) and sets == theirs), (stage.name, axis)


def test_kim_table3_second_stages_start_from_their_first(tmp_path):
    """Only the methods with a first stage start from one (FitNets' hint, AB's initialisation,
    FT's paraphraser), each from the pre run of its own method, student and seed."""
    runs = expand(load_recipe("kim-table3"), "quick", tmp_path)
    students = [r for r in runs if r.stage == "student"]
    started = {r.labels["objective"] for r in students if r.starts_from is not None}
    assert started == {"FitNets", "AB", "FT"}
    for run in students:
        if run.starts_from is not None:
            start = run.starts_from
            assert start.stage == "pre" and start.labels == run.labels and start.seed == run.seed
            assert run.config.model.init_run == str(start.run_dir)
        else:
            assert run.config.model.init_run is None


def test_example_student_names_its_teacher_by_config_and_train_needs_a_config(tmp_path, monkeypatch, capsys):
    """student-mnist1d's teacher is `config:teacher-mnist1d`: the run dir that config trains
    (under the student's out_dir), so the two examples work in order as shipped."""
    out = str(tmp_path / "runs")
    student = load_config(example_config_path("student-mnist1d"), [f"out_dir={out}"])
    teacher = load_config(example_config_path("teacher-mnist1d"), [f"out_dir={out}"])
    assert student.teacher.runs == [str(teacher.run_dir())]
    yaml_path = tmp_path / "my-teacher.yaml"
    yaml_path.write_text("name: mine\nmodel: {name: mlp-8}\nout_dir: elsewhere\n")
    mine = load_config(None, ["loss.alpha=1", f"teacher.runs=[config:{yaml_path}]", f"out_dir={out}"])
    assert mine.teacher.runs == [str(Path("elsewhere") / Path(mine.teacher.runs[0]).name)]  # its own out_dir
    nested = tmp_path / "nested"  # a config: path is looked up beside the YAML that names it first
    nested.mkdir()
    (nested / "t.yaml").write_text("name: t\nmodel: {name: mlp-8}\n")
    (nested / "s.yaml").write_text("loss: {alpha: 1}\nteacher: {runs: 'config:t.yaml'}\n")
    assert Path(load_config(nested / "s.yaml").teacher.runs[0]).name.startswith("t-")
    with pytest.raises(ConfigError, match="teacher.runs: config:nope: config file nope not found .*student-mnist1d, teacher-mnist1d"):
        load_config(None, ["loss.alpha=1", "teacher.runs=[config:nope]"])
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    assert "train needs a config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("kdlab 0.1.0 (torch ")
    assert main(["train", "student-mnist1d", "--no-progress", f"out_dir={out}"]) == 2
    assert "train the teacher first" in capsys.readouterr().err
