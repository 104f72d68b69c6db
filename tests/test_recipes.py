import math

import pytest

from kdlab.config import build_config
from kdlab.errors import ConfigError
from kdlab.recipes import Recipe, expand, list_recipes, load_recipe

BUILTIN_QUICK_DATA = {"digits", "mnist1d", "fashion-mnist"}


@pytest.mark.parametrize("path", list_recipes(), ids=lambda p: p.stem)
def test_every_recipe_expands_at_both_scales(path, tmp_path):
    recipe = load_recipe(path)
    assert set(recipe.scales) == {"quick", "paper"}
    assert path.read_text().startswith("#"), "a recipe starts with a header saying what it reproduces"
    for scale in ("quick", "paper"):
        runs = expand(recipe, scale, tmp_path)
        assert runs and len({r.run_dir for r in runs}) == len(runs), "every run has its own dir"
        stages = [r.stage for r in runs]
        for run in runs:
            for teacher in run.teacher_of:
                assert stages.index(teacher.stage) < stages.index(run.stage)
        if scale == "quick":
            assert {r.config.data.name for r in runs} <= BUILTIN_QUICK_DATA
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
