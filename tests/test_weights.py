"""Plain weights files (teacher.weights, model.pretrained_path) and the lr warm-up, on
kdlab's own models (the timm family has tests/test_timm.py)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_with
from kdlab.errors import ConfigError, RunError
from kdlab.runs import read_metrics
from kdlab.train import train

TIME_KEYS = {"epoch_time_s", "images_per_s"}
QUIET = {"progress": False, "log": lambda *a: None}


def _digits(out_dir, **extra):
    base = {"out_dir": str(out_dir), "threads": 1, "data": {"name": "digits", "val_size": 200, "augment": "none"},
            "model": {"name": "mlp-64"}, "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "milestones": [2]}}
    return config_with(base, **extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return Path(train(_digits(out, name="teacher", model={"name": "mlp-128"}), **QUIET)["run_dir"])


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in read_metrics(run_dir)]


def test_a_plain_weights_file_teaches_like_its_run_dir(teacher, tmp_path):
    weights = tmp_path / "teacher-weights.pt"  # the run's model.pt, outside any run dir
    weights.write_bytes((teacher / "model.pt").read_bytes())
    loss = {"alpha": 0.7, "tau": 4.0}
    by_run = train(_digits(tmp_path / "a", loss=loss, teacher={"runs": [str(teacher)]}), **QUIET)
    by_file = train(_digits(tmp_path / "b", loss=loss,
                            teacher={"weights": [{"model": "mlp-128", "path": str(weights)}]}), **QUIET)
    assert by_run["hash"] != by_file["hash"]  # another teacher source, another run
    assert _metrics(by_run["run_dir"]) == _metrics(by_file["run_dir"])
    for split in ("val", "test"):
        a, b = (np.load(Path(r["run_dir"]) / f"eval_{split}.npz") for r in (by_run, by_file))
        assert np.array_equal(a["teacher_logits"], b["teacher_logits"]) and np.array_equal(a["logits"], b["logits"])
    meta = json.loads((Path(by_file["run_dir"]) / "meta.json").read_text())
    assert meta["weight_files"] == [{"model": "mlp-128", "path": str(weights.resolve()),
                                     "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}]
    assert len(meta["starts"]) == 1 and meta["starts"][0]["weight_files"] == meta["weight_files"]


def test_pretrained_path_initialises_the_student(teacher, tmp_path):
    cfg = _digits(tmp_path, model={"name": "mlp-128", "pretrained_path": str(teacher / "model.pt")},
                  optim={"epochs": 1, "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"})
    run_dir = Path(train(cfg, **QUIET)["run_dir"])
    start, end = (torch.load(p, weights_only=True) for p in (teacher / "model.pt", run_dir / "model.pt"))
    for key in start:
        torch.testing.assert_close(end[key], start[key])
    # the file is hashed by name: the same weights elsewhere under the same name are the same run
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    moved.write_bytes((teacher / "model.pt").read_bytes())
    assert cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained_path": str(moved)})}).run_hash() \
        == cfg.run_hash()
    assert _digits(tmp_path).run_hash() != cfg.run_hash()


def test_weights_files_that_cannot_be_used_fail_before_anything_is_written(teacher, tmp_path):
    out = tmp_path / "runs"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a torch file")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    cases = [
        ({"model": {"name": "mlp-64", "pretrained_path": str(tmp_path / "missing.pt")}},
         ConfigError, r"model.pretrained_path: weights file .*missing.pt does not exist"),
        ({"model": {"name": "mlp-64", "pretrained_path": str(teacher / "model.pt")}},
         RunError, r"model.pretrained_path: .*model.pt does not fit the model \(.*size mismatch"),
        ({"model": {"name": "mlp-64", "pretrained_path": str(corrupt)}}, RunError, r"corrupt or unreadable"),
        ({"model": {"name": "mlp-64", "pretrained_path": str(listed)}}, RunError, r"not a state dict of tensors"),
        ({"loss": {"alpha": 1.0}, "teacher": {"weights": [{"model": "mlp-32", "path": str(teacher / "model.pt")}]}},
         RunError, r"teacher.weights.0: .*does not fit"),
        ({"loss": {"alpha": 1.0}, "teacher": {"weights": [{"model": "mlp-128", "path": str(tmp_path / "no.pt")}]}},
         ConfigError, r"teacher.weights.0: weights file .*no.pt does not exist"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            train(_digits(out, **extra), **QUIET)
        assert not out.exists()
    with pytest.raises(ConfigError, match="teacher.runs .* or teacher.weights"):
        _digits(out, loss={"alpha": 1.0}, teacher={"runs": []})
    with pytest.raises(ConfigError, match=r"teacher.weights.0.model.*unknown model"):
        _digits(out, loss={"alpha": 1.0}, teacher={"weights": [{"model": "nope-1", "path": "x.pt"}]})


def test_warmup_raises_the_lr_linearly_step_by_step(tmp_path, monkeypatch):
    seen = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    cfg = _digits(tmp_path, optim={"epochs": 3, "warmup_epochs": 2, "schedule": "multistep", "milestones": [2],
                                   "gamma": 0.5, "lr": 0.08, "batch_size": 400})
    run_dir = train(cfg, **QUIET)["run_dir"]
    per_epoch = len(seen) // 3  # 1,300 training images / 400 = 4 steps an epoch
    assert per_epoch == 4
    assert seen[: 2 * per_epoch] == pytest.approx([0.08 * s / 8 for s in range(1, 9)])
    assert seen[2 * per_epoch:] == pytest.approx([0.04] * per_epoch)  # the schedule after the warm-up
    assert [m["lr"] for m in read_metrics(run_dir)] == pytest.approx([0.08, 0.08, 0.04])
    assert cfg.run_hash() != _digits(tmp_path, optim={"epochs": 3, "schedule": "multistep", "milestones": [2],
                                                      "gamma": 0.5, "lr": 0.08, "batch_size": 400}).run_hash()
    with pytest.raises(ConfigError, match="warmup_epochs=4 is longer than the 3 epochs"):
        _digits(tmp_path, optim={"epochs": 3, "warmup_epochs": 4})
