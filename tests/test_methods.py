"""Distillation methods beyond the logit objective (``distill.method``), end to end on
digits: feature methods with taps and adapters (AT, FitNets, OFD) and the logit methods
DKD and logit standardisation — their loss parts, adapters saved beside (never inside)
the student, exact resume with adapters, one process against two, and the config's
refusals."""

from pathlib import Path

import pytest
import torch

from conftest import config_with
from kdlab.config import build_config
from kdlab.errors import ConfigError
from kdlab.runs import read_metrics
from kdlab.train import train

QUIET = {"progress": False, "log": lambda *a: None}
TIME_KEYS = {"epoch_time_s", "images_per_s"}


def _digits(out_dir, **extra):
    base = {"out_dir": str(out_dir), "threads": 1, "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "wrn-10-1"}, "optim": {"epochs": 2, "batch_size": 128, "lr": 0.05, "milestones": [1]}}
    return config_with(base, **extra)


@pytest.fixture(scope="module")
def conv_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    return train(_digits(out, name="teacher", model={"name": "wrn-10-2"}), **QUIET)["run_dir"]


@pytest.fixture(scope="module")
def mlp_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    return train(_digits(out, name="teacher", model={"name": "mlp-128-128"}, data={"augment": "none"}),
                 **QUIET)["run_dir"]


def _student(out, teacher, method, options=None, **extra):
    return _digits(out, name=method, teacher={"runs": [teacher]},
                   distill={"method": method, "options": options or {}}, **extra)


@pytest.mark.parametrize("method, options, adapters", [
    ("at", {}, False), ("fitnets", {}, True), ("ofd", {}, True), ("ofd", {"teacher_bn": "eval"}, True)])
def test_feature_methods_train_log_their_part_and_keep_adapters_apart(tmp_path, conv_teacher, method, options,
                                                                      adapters):
    result = train(_student(tmp_path, conv_teacher, method, options), **QUIET)
    run_dir = Path(result["run_dir"])
    metrics = read_metrics(run_dir)
    for m in metrics:
        assert m[f"train_{method}"] > 0 and m["train_ce"] > 0
        assert m["train_ce"] + m[f"train_{method}"] == pytest.approx(m["train_loss"], rel=1e-5)
    student = torch.load(run_dir / "model.pt", weights_only=True)
    assert not any(key.startswith(("adapters", "student.")) for key in student)  # the student's own keys only
    assert (run_dir / "adapters.pt").exists() == adapters


def test_feature_method_resumes_exactly_with_its_adapters(tmp_path, conv_teacher):
    whole = Path(train(_student(tmp_path / "whole", conv_teacher, "ofd", optim={"epochs": 3}), **QUIET)["run_dir"])
    cut_cfg = _student(tmp_path / "cut", conv_teacher, "ofd", optim={"epochs": 3})
    assert train(cut_cfg, stop_after_epoch=1, **QUIET) is None
    assert "distiller" in torch.load(cut_cfg.run_dir() / "checkpoint.pt", weights_only=True)
    cut = Path(train(cut_cfg, **QUIET)["run_dir"])
    strip = lambda run: [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in read_metrics(run)]  # noqa: E731
    assert strip(cut) == strip(whole)
    for name in ("model.pt", "adapters.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (whole, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("method", ["fitnets", "ofd"])
def test_adapters_receive_gradients_and_taps_leave_the_student_alone(tmp_path, conv_teacher, method):
    from kdlab.data import load_dataset
    from kdlab.training.methods import build_distiller
    from kdlab.training.state import build_student
    from kdlab.training.teachers import Teachers

    cfg = _student(tmp_path, conv_teacher, method)
    data = load_dataset(cfg.data)
    cpu = torch.device("cpu")
    student = build_student(cfg, data, cpu)
    teachers = Teachers(cfg.teacher, data)
    distiller = build_distiller(cfg, data, student, teachers, cpu, False)
    teacher_before = {k: v.clone() for k, v in teachers.models[0].state_dict().items()}
    x, y = data.prepare(data.train_x[:32]), data.train_y[:32]
    plain = student(x)  # the student alone, hooks or not: the same logits
    loss, logits, parts = distiller(data, distiller.module, x, y, None, None)
    assert torch.equal(plain, logits)
    # the teacher is frozen: weights and BN running statistics as they were (OFD runs its BNs in train mode)
    teacher_after = teachers.models[0].state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    parts[method].backward()
    grads = [p.grad for p in distiller.adapters.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert set(parts) == {"ce", method} and loss.item() == pytest.approx(sum(v.item() for v in parts.values()))
    # outside the distiller's forward (evaluation) the taps are off: nothing is copied or kept
    with torch.no_grad():
        student(x)
    for taps in (distiller.module.taps, distiller.teacher_taps):
        with pytest.raises(ValueError, match="did not run|has not run"):
            taps.features


@pytest.mark.parametrize("method, loss, part", [
    ("dkd", {"alpha": 0.0, "tau": 4.0}, "dkd"), ("lskd", {"alpha": 0.9, "tau": 2.0}, "kd")])
def test_logit_methods(tmp_path, conv_teacher, method, loss, part):
    cfg = _student(tmp_path, conv_teacher, method, loss=loss)
    metrics = read_metrics(Path(train(cfg, **QUIET)["run_dir"]))
    for m in metrics:
        assert m[f"train_{part}"] > 0
        assert sum(m[k] for k in ("train_ce", f"train_{part}")) == pytest.approx(m["train_loss"], rel=1e-5)


def test_method_config_is_checked_before_anything_runs(tmp_path):
    teacher = {"runs": [str(tmp_path / "t")]}
    cases = [
        ({"distill": {"method": "ofdd"}, "teacher": teacher}, "did you mean ofd"),
        ({"distill": {"method": "at", "options": {"bta": 1}}, "teacher": teacher}, "did you mean beta"),
        ({"distill": {"method": "at"}}, "needs a teacher"),
        ({"distill": {"method": "at"}, "teacher": {**teacher, "cache": {"mode": "lazy"}}}, "runs its teacher online"),
        ({"distill": {"method": "dkd"}, "loss": {"alpha": 0.5}, "teacher": teacher}, "set loss.alpha=0"),
        ({"distill": {"method": "at", "student_layers": ["a"]}, "teacher": teacher}, "in pairs"),
        ({"distill": {"method": "at", "student_layers": [], "teacher_layers": []}, "teacher": teacher},
         "at least one layer"),
        ({"distill": {"method": "dkd"}, "loss": {"tau": float("inf")}, "teacher": teacher}, "finite loss.tau"),
        ({"distill": {"method": "lskd"}, "loss": {"alpha": 0.9, "tau": 2.0},
          "teacher": {**teacher, "store": {"crops": 4, "top_k": 5}}}, "top-k store"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(data)
    plain = build_config({})
    assert plain.run_hash() == build_config({"distill": {"method": "logit"}}).run_hash()
    at = build_config({"distill": {"method": "at"}, "teacher": teacher})
    assert at.run_hash() == build_config({"distill": {"method": "at", "options": {"beta": 1000}},
                                          "teacher": teacher}).run_hash()
    assert at.run_hash() != build_config({"distill": {"method": "at", "options": {"beta": 10}},
                                          "teacher": teacher}).run_hash()
    for variant, beta in (("one_stage", 100.0), ("hint", 1.0)):  # a default resolved before hashing
        loss = {"alpha": 0.0}
        default = build_config({"distill": {"method": "fitnets", "options": {"variant": variant}}, "teacher": teacher,
                                "loss": loss})
        given = build_config({"distill": {"method": "fitnets", "options": {"variant": variant, "beta": beta}},
                              "teacher": teacher, "loss": loss})
        assert default.run_hash() == given.run_hash()


def test_feature_method_with_adapters_two_processes_equal_one(tmp_path, mlp_teacher):
    """FitNets' regressor (an adapter) under DDP: its gradients are all-reduced with the
    student's, so 2 gloo processes with the same global batch are 1 process (an MLP
    without batch norm: the same function)."""
    from test_distributed import _run

    cfg = _digits(tmp_path / "runs", name="fitnets", model={"name": "mlp-64-64"}, data={"augment": "none"},
                  teacher={"runs": [mlp_teacher]}, optim={"epochs": 2, "batch_size": 64, "schedule": "cosine"},
                  distill={"method": "fitnets", "student_layers": ["hidden.2"], "teacher_layers": ["hidden.2"]})
    one = tmp_path / "one"
    _run(cfg.model_copy(update={"out_dir": str(one)}), tmp_path, 1)
    _run(cfg.model_copy(update={"out_dir": str(tmp_path / "two")}), tmp_path, 2)
    a, b = (Path(d) / cfg.run_dir().name for d in (one, tmp_path / "two"))
    ma, mb = (read_metrics(d) for d in (a, b))
    for x, y in zip(ma, mb):
        for key in ("train_loss", "train_ce", "train_fitnets", "test_acc", "test_nll"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    # weights to rounding (β = 100 on the hint term amplifies the different summation order of
    # two half batches: up to ~3e-5 here); an adapter whose gradient were not all-reduced would
    # step on half the batch's gradient and be off by far more
    for name in ("model.pt", "adapters.pt"):
        wa, wb = (torch.load(d / name, weights_only=True) for d in (a, b))
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)


def test_fitnets_two_stages_hand_the_student_on(tmp_path, conv_teacher):
    """The paper's FitNets: a hint stage (hint loss alone, up to the hint layer), then KD
    from its student (model.init_run)."""
    import json

    from kdlab.data import load_dataset
    from kdlab.training.state import build_student

    def hint_run(lr):
        cfg = _student(tmp_path / f"hint-{lr}", conv_teacher, "fitnets", {"variant": "hint"},
                       optim={"lr": lr, "grad_clip": 1.0})  # (the paper's hint loss sums over a sample: ~500 here)
        return Path(train(cfg, **QUIET)["run_dir"])

    hint, other = hint_run(0.005), hint_run(0.01)
    for m in read_metrics(hint):
        assert "train_ce" not in m and m["train_loss"] == pytest.approx(m["train_fitnets"])
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (hint, other))
    # the hint is blocks.1's output (wrn-10-1's middle stage): what comes after it is not trained
    for key in ("blocks.2.conv1.weight", "fc.weight", "fc.bias"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["blocks.0.conv1.weight"], b["blocks.0.conv1.weight"])

    kd = _digits(tmp_path / "kd", name="kd", teacher={"runs": [conv_teacher]}, loss={"alpha": 0.9, "tau": 4.0},
                 model={"name": "wrn-10-1", "init_run": str(hint)})
    start = build_student(kd, load_dataset(kd.data), torch.device("cpu")).state_dict()
    assert all(torch.equal(start[k], a[k]) for k in a)
    run_dir = Path(train(kd, **QUIET)["run_dir"])
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["weight_files"][0]["model.init_run"] == str((hint / "model.pt").resolve())
    moved = _digits(tmp_path / "elsewhere", name="kd", teacher={"runs": [conv_teacher]},
                    loss={"alpha": 0.9, "tau": 4.0}, model={"name": "wrn-10-1", "init_run": f"/x/{hint.name}"})
    assert moved.run_hash() == kd.run_hash()  # by the run dir's name, not where it lies
    with pytest.raises(ConfigError, match="set loss.alpha=0"):
        _student(tmp_path, conv_teacher, "fitnets", {"variant": "hint"}, loss={"alpha": 0.5})
