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
    ("at", {}, False), ("fitnets", {}, True), ("ofd", {}, True), ("ofd", {"teacher_bn": "eval"}, True),
    ("crd", {"nce_k": 64}, True)])
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


@pytest.mark.parametrize("method, options", [("ofd", {}), ("crd", {"nce_k": 64})])
def test_feature_method_resumes_exactly_with_its_adapters(tmp_path, conv_teacher, method, options):
    """Killed after an epoch and resumed: the same metrics and weights, bit for bit — OFD's
    adapters, and CRD's memory banks, normalisers and negative sampler with them."""
    whole = Path(train(_student(tmp_path / "whole", conv_teacher, method, options, optim={"epochs": 3}),
                       **QUIET)["run_dir"])
    cut_cfg = _student(tmp_path / "cut", conv_teacher, method, options, optim={"epochs": 3})
    assert train(cut_cfg, stop_after_epoch=1, **QUIET) is None
    saved = torch.load(cut_cfg.run_dir() / "checkpoint.pt", weights_only=True)["distiller"]
    assert "adapters" in saved and (method != "crd" or set(saved["method"]) == {"bank", "z", "generator"})
    cut = Path(train(cut_cfg, **QUIET)["run_dir"])
    strip = lambda run: [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in read_metrics(run)]  # noqa: E731
    assert strip(cut) == strip(whole)
    for name in ("model.pt", "adapters.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (whole, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("method", ["fitnets", "ofd", "crd"])
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
    loss, logits, parts = distiller(data, distiller.module, x, y, torch.arange(32), None)
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
    ("dkd", {"alpha": 0.0, "tau": 4.0}, "dkd"), ("lskd", {"alpha": 0.9, "tau": 2.0}, "kd"),
    ("jacobian", {"alpha": 0.0}, "jacobian")])
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


def test_jacobian_trains_through_the_input_gradient(tmp_path, conv_teacher):
    """Double backprop: the Jacobian term alone gives the student's weights a gradient, and
    it equals 2 − 2·cos(g_S, g_T) per sample with g = ∇_x z_y computed independently."""
    import torch.nn.functional as F

    from kdlab.data import load_dataset
    from kdlab.training.methods import build_distiller
    from kdlab.training.state import build_student
    from kdlab.training.teachers import Teachers

    cfg = _student(tmp_path, conv_teacher, "jacobian", {"beta": 1.0})
    data = load_dataset(cfg.data)
    cpu = torch.device("cpu")
    student = build_student(cfg, data, cpu).eval()  # eval: per-sample gradients, comparable one by one
    teachers = Teachers(cfg.teacher, data)
    distiller = build_distiller(cfg, data, student, teachers, cpu, False)
    x, y = data.prepare(data.train_x[:16]), data.train_y[:16]
    _, _, parts = distiller(data, student, x, y, torch.arange(16), None)

    def input_grad(net, i):
        xi = x[i:i + 1].clone().requires_grad_(True)
        return torch.autograd.grad(net(xi)[0, y[i]], xi)[0].flatten()

    expected = torch.stack([2 - 2 * F.cosine_similarity(input_grad(student, i), input_grad(teachers.models[0], i),
                                                        dim=0) for i in range(16)]).mean()
    assert parts["jacobian"].item() == pytest.approx(expected.item(), rel=1e-4)
    parts["jacobian"].backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0


def _initial_student(cfg) -> dict:
    """The student's weights as the run initialises them (seed, then data and teacher, then the student)."""
    from kdlab.data import load_dataset
    from kdlab.training.state import build_student
    from kdlab.training.teachers import Teachers

    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data)
    Teachers(cfg.teacher, data)
    return build_student(cfg, data, torch.device("cpu")).state_dict()


def test_ab_initialisation_stage_then_kd(tmp_path, conv_teacher):
    """AB: the activation-boundary loss alone trains the student up to its last pre-ReLU tap
    (the classifier gets no gradient), then KD starts from it; connectors are not handed on."""
    cfg = _student(tmp_path, conv_teacher, "ab")
    init = _initial_student(cfg)
    ab = Path(train(cfg, **QUIET)["run_dir"])
    for m in read_metrics(ab):
        assert set(k for k in m if k.startswith("train_") and k != "train_acc") == {"train_loss", "train_ab"}
    trained = torch.load(ab / "model.pt", weights_only=True)
    assert torch.equal(trained["fc.weight"], init["fc.weight"])  # after the last tap: untouched
    assert not torch.equal(trained["conv1.weight"], init["conv1.weight"])
    kd = _digits(tmp_path / "kd", name="kd", teacher={"runs": [conv_teacher]}, loss={"alpha": 1.0},
                 model={"name": "wrn-10-1", "init_run": str(ab)})
    assert "train_kd" in read_metrics(Path(train(kd, **QUIET)["run_dir"]))[0]
    with pytest.raises(ConfigError, match="initialisation stage.*set loss.alpha=0"):
        _student(tmp_path, conv_teacher, "ab", loss={"alpha": 0.5})


def test_ft_paraphraser_stage_then_translator_stage(tmp_path, conv_teacher):
    """FT: the paraphraser stage trains the paraphraser alone (the student stays as it was
    initialised); the translator stage needs it (model.init_run), keeps it frozen and trains
    the student with CE + the factor loss."""
    para_cfg = _student(tmp_path, conv_teacher, "ft", {"stage": "paraphraser"})
    init = _initial_student(para_cfg)
    para = Path(train(para_cfg, **QUIET)["run_dir"])
    untouched = torch.load(para / "model.pt", weights_only=True)
    assert all(torch.equal(untouched[k], init[k]) for k in init)  # weights and BN statistics alike
    metrics = read_metrics(para)
    assert metrics[-1]["train_ft"] < metrics[0]["train_ft"] and "train_ce" not in metrics[0]
    paraphraser = torch.load(para / "adapters.pt", weights_only=True)
    assert any(k.startswith("teacher.0.encoder") for k in paraphraser)

    student = _student(tmp_path, conv_teacher, "ft", model={"name": "wrn-10-1", "init_run": str(para)})
    run = Path(train(student, **QUIET)["run_dir"])
    after = torch.load(run / "adapters.pt", weights_only=True)
    import json
    files = json.loads((run / "meta.json").read_text())["weight_files"]
    assert {"model.init_run adapters": str((para / "adapters.pt").resolve()),
            "sha256": __import__("hashlib").sha256((para / "adapters.pt").read_bytes()).hexdigest()} in files
    teacher_side = [k for k in paraphraser if k.startswith("teacher.")]
    assert all(torch.equal(after[k], paraphraser[k]) for k in teacher_side)  # frozen: BN statistics too
    assert not all(torch.equal(after[k], paraphraser[k]) for k in after if k.startswith("student."))
    assert all(m["train_ft"] > 0 and m["train_ce"] > 0 for m in read_metrics(run))
    with pytest.raises(ConfigError, match="set model.init_run to the run of its paraphraser stage"):
        _student(tmp_path, conv_teacher, "ft")
    plain = train(_digits(tmp_path / "ce", name="ce", optim={"epochs": 1}), **QUIET)["run_dir"]
    wrong = _student(tmp_path, conv_teacher, "ft", model={"name": "wrn-10-1", "init_run": plain})
    with pytest.raises(ConfigError, match="no adapters.pt"):
        train(wrong, **QUIET)
    assert not wrong.run_dir().exists()


@pytest.mark.parametrize("method, options, loss", [
    ("at", {}, {}), ("fitnets", {}, {}), ("ofd", {}, {}), ("ab", {}, {}), ("ft", {"stage": "paraphraser"}, {}),
    ("ft", {}, {}), ("crd", {"nce_k": 32}, {}), ("jacobian", {}, {}), ("dkd", {}, {"tau": 4.0}),
    ("lskd", {}, {"alpha": 0.9, "tau": 2.0})])
def test_every_method_steps_under_bf16_autocast(tmp_path, conv_teacher, method, options, loss):
    """One training step of each method with the forwards under bf16 autocast (as on a GPU):
    the terms are computed in float32, the loss is finite and reaches the student."""
    from kdlab.data import load_dataset
    from kdlab.training.distill import OnlineTeacher
    from kdlab.training.methods import build_distiller
    from kdlab.training.state import build_student
    from kdlab.training.teachers import Teachers

    start = {"init_run": "paraphraser-run"} if method == "ft" and not options else {}
    cfg = _student(tmp_path, conv_teacher, method, options, loss=loss, model={"name": "wrn-10-1", **start})
    data = load_dataset(cfg.data)
    cpu = torch.device("cpu")
    student = build_student(_digits(tmp_path), data, cpu)  # (the same wrn-10-1; no init_run to read)
    teachers = Teachers(cfg.teacher, data)
    distiller = build_distiller(cfg, data, student, teachers, cpu, True)
    distiller.source = OnlineTeacher(teachers, True)
    x, y = data.prepare(data.train_x[:16]), data.train_y[:16]
    total, _, parts = distiller(data, distiller.module, x, y, torch.arange(16), None)
    assert total.dtype == torch.float32 and torch.isfinite(total) and all(p.dtype == torch.float32
                                                                          for p in parts.values())
    total.backward()
    grads = [p.grad for p in distiller.module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def cnn1d_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    cfg = config_with({"out_dir": str(out), "threads": 1, "name": "teacher", "model": {"name": "cnn1d-8"},
                       "data": {"name": "mnist1d", "num_samples": 600}, "optim": {"epochs": 1, "batch_size": 64}})
    return train(cfg, **QUIET)["run_dir"]


@pytest.mark.parametrize("method, options", [
    ("at", {}), ("fitnets", {}), ("fitnets", {"variant": "hint"}), ("ofd", {}), ("ab", {}),
    ("ft", {"stage": "paraphraser"}), ("crd", {"nce_k": 16})])
def test_feature_methods_on_one_dimensional_feature_maps(tmp_path, cnn1d_teacher, method, options):
    """cnn1d's features are (C, L): the adapters are 1-D convolutions and every method trains."""
    cfg = config_with({"out_dir": str(tmp_path), "threads": 1, "name": method, "model": {"name": "cnn1d-4"},
                       "data": {"name": "mnist1d", "num_samples": 600},
                       "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05, "grad_clip": 1.0},  # (kim-table3's first stages)
                       "teacher": {"runs": [cnn1d_teacher]}, "distill": {"method": method, "options": options}})
    run = Path(train(cfg, **QUIET)["run_dir"])
    assert all(m[f"train_{method}"] > 0 for m in read_metrics(run))
    if (run / "adapters.pt").exists() and method != "crd":  # (CRD's embeddings are linear)
        shapes = [v.dim() for k, v in torch.load(run / "adapters.pt", weights_only=True).items()
                  if k.endswith("weight") and v.dim() > 2]
        assert shapes and set(shapes) == {3}  # Conv1d kernels: (out, in, k)


def test_a_run_that_fails_in_training_reports_its_own_error_and_leaves_nothing(tmp_path, monkeypatch):
    """TensorBoard's writer is closed before the failed run's dir is removed: closing it
    afterwards raised FileNotFoundError in place of the run's error (seen in a sweep)."""
    from kdlab.training import loop

    def fit(self, *args, **kwargs):
        writer, close = self.writer, self.writer.close
        run_dir = self.run_dir

        def flush_then_close():  # as TensorBoard's file writer: it reopens its event file to append
            if not run_dir.is_dir():
                raise FileNotFoundError(f"{run_dir}/tensorboard/events...")
            close()

        writer.close = flush_then_close
        raise RuntimeError("boom in training")

    monkeypatch.setattr(loop.Loop, "fit", fit)
    cfg = _digits(tmp_path, name="failing", tensorboard=True)
    with pytest.raises(RuntimeError, match="boom in training"):
        train(cfg, **QUIET)
    assert not cfg.run_dir().exists()


def test_teacher_batch_norm_in_train_mode_never_touches_its_running_statistics():
    """OFD's ``teacher_bn: train``: batch statistics normalise, the running ones stay as they
    were — even for a batch with a non-finite value (momentum 0 would have written 0·NaN)."""
    import torch.nn as nn

    from kdlab.training.methods import _bn_train_frozen

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3, 6, 6)
    with _bn_train_frozen(net):
        y = net(x)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        net(bad)
    conv = net[0](x)
    expected = torch.relu(nn.functional.batch_norm(conv, None, None, net[1].weight, net[1].bias, training=True))
    torch.testing.assert_close(y, expected)
    assert not net.training and net[1].track_running_stats
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_jacobian_two_processes_equal_one_and_crd_is_refused_under_torchrun(tmp_path, mlp_teacher):
    """Double backprop under DDP: the gradient through the input-gradient graph is all-reduced
    like any other (an MLP without batch norm: per-sample gradients, the same function in 1 or
    2 processes). CRD's memory banks are per process: torchrun is refused before any run dir."""
    from test_distributed import _run

    cfg = _digits(tmp_path / "runs", name="jacobian", model={"name": "mlp-64-64"}, data={"augment": "none"},
                  teacher={"runs": [mlp_teacher]}, optim={"epochs": 2, "batch_size": 64, "schedule": "cosine"},
                  distill={"method": "jacobian"})
    one, two = tmp_path / "one", tmp_path / "two"
    _run(cfg.model_copy(update={"out_dir": str(one)}), tmp_path, 1)
    _run(cfg.model_copy(update={"out_dir": str(two)}), tmp_path, 2)
    a, b = (d / cfg.run_dir().name for d in (one, two))
    for x, y in zip(read_metrics(a), read_metrics(b)):
        for key in ("train_loss", "train_ce", "train_jacobian", "test_acc"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)

    crd = _digits(tmp_path / "crd", name="crd", model={"name": "mlp-64-64"}, data={"augment": "none"},
                  teacher={"runs": [mlp_teacher]}, optim={"epochs": 1, "batch_size": 64},
                  distill={"method": "crd", "options": {"nce_k": 16}})
    done = _run(crd, tmp_path, 2, expect_ok=False)
    assert done.returncode != 0 and "distill.method=crd" in done.stderr and "no torchrun" in done.stderr
    assert not crd.run_dir().exists()
