"""The Python API (``import kdlab``): configs from any source, fit → Run, a Run's parts, the
losses in one argument order as functions and modules, no process-wide side effects."""

import subprocess
import sys

import pytest
import torch

import kdlab
from kdlab.losses import distillation_loss, kl_loss, mse_loss

QUIET = dict(progress=False, log=lambda *a: None)


def test_import_is_light_and_names_are_public():
    code = "import sys, kdlab; print('torch' in sys.modules); print(sorted(kdlab.__all__) == sorted(set(dir(kdlab)) & set(kdlab.__all__)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdlab.nope  # noqa: B018


def test_make_config_from_every_source(tmp_path):
    from_dict = kdlab.make_config({"model": {"name": "mlp-16"}, "data": {"name": "digits"}}, ["optim.epochs=2"])
    assert from_dict.optim.epochs == 2 and isinstance(from_dict, kdlab.Config)
    again = kdlab.make_config(from_dict, ["optim.epochs=3"])
    assert again.optim.epochs == 3 and from_dict.optim.epochs == 2  # a copy
    path = tmp_path / "c.yaml"
    path.write_text(from_dict.to_yaml())
    assert kdlab.make_config(path).run_hash() == from_dict.run_hash()
    assert kdlab.make_config("teacher-mnist1d").model.name == "cnn1d-64"
    assert kdlab.make_config("teacher-mnist1d", "optim.epochs=7").optim.epochs == 7  # one override, no list
    with pytest.raises(kdlab.ConfigError, match="did you mean optim.epochs"):
        kdlab.make_config(None, ["optim.epoch=1"])


def test_fit_returns_a_run_with_everything_in_it(tmp_path):
    base = ["data.name=digits", "data.val_size=200", "optim.epochs=2", f"out_dir={tmp_path}"]
    teacher = kdlab.fit({"name": "teacher", "model": {"name": "mlp-32"}}, base, **QUIET)
    student = kdlab.fit({"name": "student", "model": {"name": "mlp-16"}},
                        base + ["loss.alpha=1", f"teacher.runs={teacher.path}"], **QUIET)
    assert student.finished and student.teachers == [teacher.path] and student.objective == "KL τ=4 α=1"
    assert [m["epoch"] for m in student.metrics] == [1, 2] and 0 < student.final["test_acc"] <= 1
    arrays = student.eval("test")
    model = student.model()
    x = torch.zeros(1, 1, 8, 8)
    assert model(x).shape == (1, 10) and not model.training and arrays["logits"].shape[1] == 10
    assert repr(student).startswith(f"Run('{student.path}', mlp-16, KL τ=4 α=1, test_acc=")
    assert kdlab.fit({"name": "teacher", "model": {"name": "mlp-32"}}, base, **QUIET).path == teacher.path  # no retrain
    with pytest.raises(kdlab.ConfigError, match="no eval_nope.npz"):
        student.eval("nope")
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((teacher.path / "config.yaml").read_text())
    run = kdlab.load_run(unfinished)
    assert not run.finished and "unfinished" in repr(run)
    with pytest.raises(kdlab.ConfigError, match="has not finished"):
        run.model()
    with pytest.raises(kdlab.ConfigError, match="not a run dir"):
        kdlab.load_run(tmp_path)


def test_losses_take_student_teacher_labels_as_functions_and_modules():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    expected = distillation_loss(zs, y, zt, alpha=0.7, kd="kl", tau=3.0)
    assert torch.equal(kdlab.kd_loss(zs, zt, y, alpha=0.7, tau=3.0), expected)
    assert torch.equal(kdlab.KDLoss(alpha=0.7, tau=3.0)(zs, zt, y), expected)
    assert torch.equal(kdlab.KLDivergence(3.0)(zs, zt), kl_loss(zs, zt, 3.0))
    assert torch.equal(kdlab.LogitMSE()(zs, zt), mse_loss(zs, zt, "mean"))
    torch.testing.assert_close(kdlab.LogitMSE()(zs, zt), torch.nn.functional.mse_loss(zs, zt))
    assert torch.equal(kdlab.kd_loss(zs, None, y, alpha=0.0), torch.nn.functional.cross_entropy(zs, y))
    with pytest.raises(ValueError):
        kdlab.KDLoss(tau=0.0)
    assert any(f["examples"] and "wrn" in f["pattern"] for f in kdlab.list_models())
    assert kdlab.build_model("mlp-16", 10, input_shape=(1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
