import math

import pytest

from kdlab.config import build_config, load_config
from kdlab.errors import ConfigError


@pytest.mark.parametrize("overrides,message", [
    (["loss.tua=1"], "unknown config key 'loss.tua'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["optim.epochs=ten"], "optim.epochs"),
    (["loss.tau=0"], "tau must be > 0"),
    (["loss.tau=-2"], "tau must be > 0"),
    (["loss.tau=.nan"], "tau must be > 0"),
    (["loss.alpha=1.5"], "loss.alpha"),
    (["loss.alpha=0.5"], "needs a teacher"),
    (["model.name=vgg"], "unknown model"),
    (["data.name=imagenet"], "data.name"),
    (["loss.kd=l1"], "loss.kd"),
    (["epochs"], "key.sub=value"),
])
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config({}, overrides)
    assert "\n" not in str(info.value)


def test_overrides_parse_yaml_values_and_infinity():
    cfg = build_config({}, ["loss.tau=inf", "optim.milestones=[3, 5]", "teacher.runs=[a, b]", "loss.alpha=1"])
    assert math.isinf(cfg.loss.tau) and cfg.optim.milestones == [3, 5] and cfg.teacher.runs == ["a", "b"]


def test_hash_ignores_out_dir_and_follows_everything_else():
    a = build_config({"out_dir": "x"})
    assert a.run_hash() == build_config({"out_dir": "y"}).run_hash()
    assert a.run_hash() != build_config({}, ["loss.smoothing=0.1"]).run_hash()


def test_yaml_file_round_trip(tmp_path):
    cfg = build_config({}, ["loss.tau=inf", "loss.alpha=1", "teacher.runs=[t]"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.run_hash() == cfg.run_hash()


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_hash_names_teachers_by_run_dir_name_not_location():
    a = build_config({}, ["loss.alpha=1", "teacher.runs=[/a/runs/teacher-1234abcd]"])
    b = build_config({}, ["loss.alpha=1", "teacher.runs=[/elsewhere/teacher-1234abcd]"])
    c = build_config({}, ["loss.alpha=1", "teacher.runs=[/a/runs/teacher-99999999]"])
    assert a.run_hash() == b.run_hash() != c.run_hash()


def test_one_teacher_run_needs_no_brackets():
    """teacher.runs=runs/teacher-1234 is the list of that one run (it was "Input should be a valid list")."""
    from kdlab.config import load_config

    cfg = load_config(None, ["loss.alpha=1", "teacher.runs=runs/teacher-1234"])
    assert cfg.teacher.runs == ["runs/teacher-1234"]
    assert cfg.run_hash() == load_config(None, ["loss.alpha=1", "teacher.runs=[runs/teacher-1234]"]).run_hash()


def test_auto_name_says_what_the_run_is():
    """``name: auto`` (the example student's): the run dir's prefix is the objective; the hash
    holds the literal "auto", so the dir is still a pure function of the config."""
    from kdlab.config import load_config

    def name(*overrides):
        return load_config(None, ["name=auto", *overrides]).run_dir().name.rsplit("-", 1)[0]

    teacher = ["teacher.runs=[runs/t-1]"]
    assert name() == "ce" and name("loss.smoothing=0.1") == "ls0.1"
    assert name(*teacher, "loss.alpha=1") == "student-kl-tau4"
    assert name(*teacher, "loss.alpha=1", "loss.tau=inf") == "student-kl-tauinf"
    assert name(*teacher, "loss.alpha=0.5", "loss.kd=mse") == "student-mse-a0.5"
    assert name(*teacher, "distill.method=fitnets", "distill.options.variant=hint") == "student-fitnets-hint"
    assert name(*teacher, "distill.method=ofd") == "student-ofd"
    cfg = load_config(None, ["name=auto", *teacher, "loss.alpha=1"])
    assert cfg.run_dir().name.endswith(cfg.run_hash()) and cfg.run_name() == "student-kl-tau4"


def test_extra_test_is_in_the_run_hash_only_when_set():
    """data.extra_test (more MNIST-1D test signals) is newer than existing run dirs: unset or 0,
    a config hashes as before the key existed (the hashes pinned here were computed at the
    revision before it); set, the run (whose test split differs) hashes apart."""
    small = {"data": {"name": "mnist1d", "num_samples": 500}}
    assert build_config({}).run_hash() == build_config({}, ["data.extra_test=0"]).run_hash() == "9ca01ceb"
    assert build_config(small).run_hash() == "28f99019"
    assert build_config({"data": {**small["data"], "extra_test": 0}}).run_hash() == "28f99019"
    hashes = {build_config({}, [f"data.extra_test={n}"]).run_hash() for n in (0, 500, 19000)}
    assert len(hashes) == 3
