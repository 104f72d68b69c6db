"""End to end on built-in / tiny data: run dirs, resume, teachers, CLI errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_with
from kdlab.cli import main
from kdlab.config import build_config
from kdlab.errors import ConfigError, RunError
from kdlab.runs import read_metrics
from kdlab.train import train

TIME_KEYS = {"epoch_time_s", "images_per_s"}


def _digits(out_dir, **extra):
    base = {"out_dir": str(out_dir), "data": {"name": "digits", "val_size": 200, "augment": "none"},
            "model": {"name": "mlp-64"}, "optim": {"epochs": 4, "batch_size": 64, "lr": 0.05, "milestones": [2]}}
    return config_with(base, **extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(_digits(out, name="teacher", model={"name": "mlp-128-128"}), progress=False, log=lambda *a: None)


def test_run_dir_contents(teacher):
    from pathlib import Path

    run_dir = Path(teacher["run_dir"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "meta.json", "metrics.jsonl", "model.pt", "result.json", "eval_val.npz", "eval_test.npz"} <= names
    assert "checkpoint.pt" not in names and not any(n.endswith(".tmp") for n in names)
    assert run_dir.name.startswith("teacher-") and run_dir.name.endswith(teacher["hash"])
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    test = np.load(run_dir / "eval_test.npz")
    assert test["logits"].shape == (297, 10) and test["features"].shape == (297, 128)
    assert len(read_metrics(run_dir)) == 4
    assert teacher["final"]["test_acc"] > 0.8  # an MLP learns digits in 4 epochs


def test_same_config_again_is_skipped(teacher, tmp_path):
    from kdlab.runs import load_run_config

    cfg = load_run_config(teacher["run_dir"])
    messages = []
    assert train(cfg, progress=False, log=messages.append) == teacher
    assert "finished already" in messages[0]


def _strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in metrics]


@pytest.mark.parametrize("student", [False, True])
def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, teacher, student):
    extra = {"loss": {"alpha": 0.7, "tau": 4.0}, "teacher": {"runs": [teacher["run_dir"]]}} if student else {}
    extra["data"] = {"name": "digits", "val_size": 200, "augment": "shift2"}  # views come from the generator
    if not student:  # the mutual-information probe must not change training, and resumes too
        extra["mutual_information"] = {"every_steps": 7, "classes": [0, 1], "per_class": 20, "views": 3}
    full = train(_digits(tmp_path / "a", **extra), progress=False, log=lambda *a: None)
    cfg = _digits(tmp_path / "b", **extra)
    assert train(cfg, progress=False, stop_after_epoch=2, log=lambda *a: None) is None
    assert (cfg.run_dir() / "checkpoint.pt").exists() and not (cfg.run_dir() / "result.json").exists()
    resumed = train(cfg, progress=False, log=lambda *a: None)
    assert _strip(read_metrics(full["run_dir"], "all")) == _strip(read_metrics(resumed["run_dir"], "all"))
    a = torch.load(f"{full['run_dir']}/model.pt", weights_only=True)
    b = torch.load(f"{resumed['run_dir']}/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_records_teacher_metrics_and_ensemble(tmp_path, teacher):
    cfg = _digits(tmp_path, loss={"alpha": 1.0, "tau": math.inf},
                  teacher={"runs": [teacher["run_dir"], teacher["run_dir"]]})
    result = train(cfg, progress=False, log=lambda *a: None)
    final = result["final"]
    assert 0 <= final["test_agreement"] <= 1 and final["test_logit_distance"] > 0
    val = np.load(f"{result['run_dir']}/eval_val.npz")
    teacher_val = np.load(f"{teacher['run_dir']}/eval_val.npz")
    np.testing.assert_allclose(val["teacher_logits"], teacher_val["logits"], rtol=1e-5, atol=1e-5)


def test_label_noise_is_saved_with_the_run(tmp_path):
    result = train(_digits(tmp_path, data={"label_noise": 0.4}, optim={"epochs": 1}), progress=False,
                   log=lambda *a: None)
    saved = np.load(f"{result['run_dir']}/label_noise.npz")
    assert len(saved["flipped_indices"]) == round(0.4 * 1300)
    assert (saved["clean_labels"] != saved["noisy_labels"]).sum() == len(saved["flipped_indices"])


def test_teacher_with_other_class_count_is_refused_before_writing(tmp_path, cifar10_dir, cifar100_dir):
    small = {"optim": {"epochs": 1, "batch_size": 32}, "model": {"name": "wrn-10-1"}, "out_dir": str(tmp_path / "r")}
    # the teacher also exercises bf16 autocast, channels_last and gradient clipping on a real WRN
    t = train(build_config({**small, "bf16": True, "channels_last": True,
                            "optim": {**small["optim"], "grad_clip": 1.0},
                            "data": {"name": "cifar10", "root": str(cifar10_dir), "val_size": 10}}),
              progress=False, log=lambda *a: None)
    assert np.isfinite(t["final"]["test_nll"])
    student = build_config({**small, "out_dir": str(tmp_path / "s"), "loss": {"alpha": 1.0},
                            "teacher": {"runs": [t["run_dir"]]},
                            "data": {"name": "cifar100", "root": str(cifar100_dir), "val_size": 10}})
    with pytest.raises(ConfigError, match="10 classes but the dataset has 100"):
        train(student, progress=False)
    assert not (tmp_path / "s").exists()


def test_unfinished_teacher_and_corrupt_checkpoint(tmp_path, teacher):
    cfg = _digits(tmp_path / "x")
    train(cfg, progress=False, stop_after_epoch=1, log=lambda *a: None)
    student = _digits(tmp_path / "y", loss={"alpha": 1.0}, teacher={"runs": [str(cfg.run_dir())]})
    with pytest.raises(RunError, match="not finished"):
        train(student, progress=False)
    (cfg.run_dir() / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(RunError, match="corrupt"):
        train(cfg, progress=False, log=lambda *a: None)


@pytest.mark.parametrize("args,message", [
    (["train", "loss.tau=0"], "tau must be > 0"),
    (["train", "optim.lr=fast"], "optim.lr"),
    (["train", "loss.alpha=1.2"], "loss.alpha"),
    (["train", "optimizer.lr=0.1"], "unknown config key 'optimizer'"),
    (["train", "data.name=cifar100"], "data.root is not set"),
    (["train", "data.name=mnist", "data.root=/does/not/exist"], "does not exist"),
    (["train", "loss.alpha=1", "teacher.runs=[/no/such/run]"], "does not exist"),
    (["train", "device=gpu"], "device"),
    pytest.param(["train", "device=cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(args + [f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_subprocess_train_and_exit_codes(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: digits, val_size: 200}\nmodel: {name: mlp-32}\noptim: {epochs: 1}\n")
    run = subprocess.run([sys.executable, "-m", "kdlab", "train", str(cfg), f"out_dir={tmp_path / 'o'}",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "test acc" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "kdlab", "train", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not found" in bad.stderr


def test_eval_every_skips_evaluation_but_not_the_last_epoch(tmp_path):
    result = train(_digits(tmp_path, optim={"epochs": 3}, eval_every=2), progress=False, log=lambda *a: None)
    metrics = read_metrics(result["run_dir"])
    assert ["test_acc" in m for m in metrics] == [False, True, True]
    assert "test_acc" in result["final"]


def test_no_validation_split_trains_and_analyses_without_one(tmp_path, teacher, capsys):
    """data.val_size=0: no validation metrics and no eval_val.npz (it used to train and then
    fail in torch.cat); a student of it and the analysis run as usual."""
    from kdlab.analysis.analyze import analyze_run

    quiet = {"progress": False, "log": lambda *a: None}
    result = train(_digits(tmp_path, data={"name": "digits", "val_size": 0}, optim={"epochs": 2}), **quiet)
    run_dir = result["run_dir"]
    assert not any(k.startswith("val_") for m in read_metrics(run_dir) for k in m)
    assert "test_acc" in result["final"] and not any(k.startswith("val_") for k in result["final"])
    assert not (Path(run_dir) / "eval_val.npz").exists() and (Path(run_dir) / "eval_train.npz").is_file()
    student = train(_digits(tmp_path, name="student", data={"name": "digits", "val_size": 0}, loss={"alpha": 1.0},
                            teacher={"runs": [teacher["run_dir"]]}, optim={"epochs": 1}), **quiet)
    assert "test_agreement" in student["final"]
    report = analyze_run(run_dir, n_bootstrap=5, figures=False, log=lambda *a: None)
    assert "calibration_test" in report and "temperature_scaling" not in report


def test_mutual_information_probe_leaves_training_unchanged(tmp_path):
    data = {"name": "digits", "val_size": 200, "augment": "shift2"}
    plain = train(_digits(tmp_path / "a", data=data, optim={"epochs": 2}), progress=False, log=lambda *a: None)
    probed = train(_digits(tmp_path / "b", data=data, optim={"epochs": 2},
                           mutual_information={"every_steps": 5, "classes": [2, 3], "per_class": 10, "views": 2}),
                   progress=False, log=lambda *a: None)
    assert _strip(read_metrics(plain["run_dir"])) == _strip(read_metrics(probed["run_dir"]))
    assert len(read_metrics(probed["run_dir"], "mutual_information")) == 2 * 21 // 5


def test_device_is_not_part_of_the_run_identity(tmp_path):
    """device=auto resolves to the CPU here; the run dir is the one device=cpu names, so a
    run started on one device is found (finished or resumable) from another."""
    cpu, auto = _digits(tmp_path, optim={"epochs": 1}), _digits(tmp_path, optim={"epochs": 1}, device="auto")
    assert cpu.run_dir() == auto.run_dir()
    first = train(cpu, progress=False, log=lambda *a: None)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert first["device"].startswith("cpu")
    messages = []
    assert train(auto, progress=False, log=messages.append) == first and "finished already" in messages[0]
    meta = json.loads((cpu.run_dir() / "meta.json").read_text())
    assert meta["device"].startswith("cpu")
    from kdlab.train import resolve_device

    assert resolve_device("auto").type == expected and resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("kind, loss, parts", [
    ("ce", {}, {"train_ce"}),
    ("ls", {"smoothing": 0.1}, {"train_ls"}),
    ("kd", {"alpha": 0.7, "tau": 4.0, "kd": "mse", "mse_reduction": "mean"}, {"train_ce", "train_kd"}),
    ("kd-only", {"alpha": 1.0, "tau": 4.0}, {"train_kd"}),
])
def test_loss_parts_are_logged_and_sum_to_the_loss(tmp_path, teacher, kind, loss, parts):
    extra = {"teacher": {"runs": [teacher["run_dir"]]}} if "kd" in kind else {}
    run_dir = Path(train(_digits(tmp_path, name=kind, loss=loss, optim={"epochs": 2}, **extra),
                         progress=False, log=lambda *a: None)["run_dir"])
    metrics = read_metrics(run_dir)
    for m in metrics:
        named = {k for k in m if k in {"train_ce", "train_ls", "train_kd"}}
        assert named == parts
        assert sum(m[k] for k in named) == pytest.approx(m["train_loss"], rel=1e-6)
    if "kd" in kind:  # the teacher term is a real, positive part
        assert all(m["train_kd"] > 0 for m in metrics)
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in parts:
        tag = "train/" + key.removeprefix("train_")
        assert [s.value for s in events.Scalars(tag)] == pytest.approx([m[key] for m in metrics], rel=1e-6)


def test_no_progress_prints_a_line_per_epoch_with_the_latest_evaluation(tmp_path, capsys):
    """A batch job (`--no-progress`) gets one line per epoch; epochs without evaluation show the
    latest one and when it was taken (the bar showed test_acc=nan there), validation first."""
    from kdlab.cli import main

    assert main(["train", "--no-progress", "data.name=digits", "data.val_size=200", "model.name=mlp-16",
                 "optim.epochs=4", "eval_every=2", f"out_dir={tmp_path}"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if " epoch " in l]
    assert len(lines) == 4 and all(f"epoch {e}/4: loss " in l for e, l in zip((1, 2, 3, 4), lines))
    assert "val_acc" not in lines[0] and "val_acc" in lines[1] and "(epoch" not in lines[1]
    assert lines[2].split("val_acc ")[1].startswith(lines[1].split("val_acc ")[1].split(",")[0] + " (epoch 2)")
    assert "test_acc" not in "".join(lines) and "train_acc" in lines[0]


def test_runs_command_tells_the_runs_apart(tmp_path, capsys):
    """`kdlab runs` names each run's objective in words (student-<hash> dirs alike otherwise),
    its teacher, its state and accuracy; an unfinished run is listed as such."""
    import json

    from kdlab.cli import main

    base = ["--no-progress", "data.name=digits", "data.val_size=200", "optim.epochs=1", f"out_dir={tmp_path}"]
    assert main(["train", *base, "name=teacher", "model.name=mlp-32"]) == 0
    (teacher,) = tmp_path.glob("teacher-*")
    for extra in (["loss.alpha=1", "loss.tau=4"], ["loss.alpha=1", "loss.kd=mse", "loss.mse_reduction=mean"],
                  ["loss.smoothing=0.1"]):
        assert main(["train", *base, "name=student", "model.name=mlp-16", f"teacher.runs={teacher}", *extra]) == 0
    (tmp_path / "student-unfinished").mkdir()
    (tmp_path / "student-unfinished" / "config.yaml").write_text((teacher / "config.yaml").read_text())
    capsys.readouterr()
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    objectives = sorted(r["objective"] for r in rows.values())
    assert objectives == ["CE", "CE", "KL τ=4 α=1", "LS ε=0.1", "MSE α=1"]
    assert rows["student-unfinished"]["state"] == "started" and rows[teacher.name]["state"] == "finished"
    assert all(r["teachers"] == [teacher.name] for r in rows.values() if r["objective"] in ("KL τ=4 α=1", "MSE α=1"))
    assert main(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "KL τ=4 α=1" in table and "finished (1 ep)" in table
