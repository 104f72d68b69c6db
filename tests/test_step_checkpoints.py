"""Checkpoints within an epoch (checkpoint_every_steps): the data order's position is
saved with the rest, and a run stopped or SIGKILLed mid-epoch ends exactly as an
uninterrupted one — metrics, weights, EMA, MI lines, warm-up and all."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_with, write_image_folder
from kdlab.config import build_config
from kdlab.runs import read_metrics
from kdlab.train import train

TIME_KEYS = {"epoch_time_s", "images_per_s"}
QUIET = {"progress": False, "log": lambda *a: None}
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
ENV.pop("KDLAB_TEST_KILL_IN_WRITE", None)


def _digits(out_dir, **extra):
    base = {"out_dir": str(out_dir), "threads": 1, "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "mlp-64"},
            "optim": {"epochs": 3, "batch_size": 128, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 1,
                      "ema_decay": 0.8},
            "mutual_information": {"every_steps": 4, "classes": [0, 1], "per_class": 20, "views": 3}}
    return config_with(base, **extra)


def _same_run(a: Path, b: Path) -> None:
    strip = lambda run: [{k: v for k, v in m.items() if k not in TIME_KEYS}  # noqa: E731
                         for m in read_metrics(run, "all")]
    assert strip(a) == strip(b)  # epoch lines and MI lines, in order
    for name in ("model.pt", "model_ema.pt"):
        x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for split in ("val", "test"):
        x, y = (np.load(d / f"eval_{split}.npz") for d in (a, b))
        assert np.array_equal(x["logits"], y["logits"])


def test_stopped_within_epochs_resumes_exactly(tmp_path):
    whole = Path(train(_digits(tmp_path / "whole"), **QUIET)["run_dir"])
    mi_lines = read_metrics(whole, "mutual_information")
    assert len(mi_lines) == 8  # 11 steps an epoch, a probe every 4: steps 4, 8, ..., 32

    cfg = _digits(tmp_path / "cut", checkpoint_every_steps=3)
    assert cfg.run_hash() == _digits(tmp_path).run_hash()  # the cadence does not change results
    messages = []
    assert train(cfg, stop_after_step=5, **QUIET) is None  # checkpoint after step 6 (in warm-up, epoch 1)
    checkpoint = torch.load(cfg.run_dir() / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step_in_epoch"] == 6
    assert train(cfg, stop_after_step=16, progress=False, log=messages.append) is None  # step 18: epoch 2
    assert "resuming in epoch 1 after step 6" in messages[1]
    run_dir = Path(train(cfg, **QUIET)["run_dir"])
    _same_run(whole, run_dir)


def test_sigkill_inside_a_mid_epoch_checkpoint_write(tmp_path):
    """Killed inside its 4th checkpoint write (a mid-epoch one); the 3rd stays and is resumed from."""
    whole = Path(train(_digits(tmp_path / "whole"), **QUIET)["run_dir"])
    cfg = _digits(tmp_path / "killed", checkpoint_every_steps=2)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(cfg.to_yaml())
    command = [sys.executable, "-m", "kdlab", "train", str(config_path), "--no-progress"]
    first = subprocess.run(command, cwd=tmp_path, env=dict(ENV, KDLAB_TEST_KILL_IN_WRITE="checkpoint.pt:4"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert torch.load(cfg.run_dir() / "checkpoint.pt", weights_only=True)["step_in_epoch"] == 6
    second = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming in epoch 1 after step 6" in second.stdout + second.stderr
    _same_run(whole, cfg.run_dir())


def test_streamed_images_resume_within_an_epoch_with_two_workers(tmp_path):
    pytest.importorskip("PIL")
    folder = write_image_folder(tmp_path / "images", train_per_class=12, val_per_class=3)

    def config(out, **extra):
        return build_config({"out_dir": str(out), "threads": 1,
                             "data": {"name": "imagefolder", "root": str(folder), "image_size": 16, "val_size": 8,
                                      "loader_workers": 2},
                             "model": {"name": "mlp-32"}, "optim": {"epochs": 2, "batch_size": 8, "lr": 0.02},
                             **extra})

    whole = Path(train(config(tmp_path / "whole"), **QUIET)["run_dir"])
    cfg = config(tmp_path / "cut", checkpoint_every_steps=2)
    assert train(cfg, stop_after_step=3, **QUIET) is None  # 5 steps an epoch: stopped after step 4
    assert torch.load(cfg.run_dir() / "checkpoint.pt", weights_only=True)["step_in_epoch"] == 4
    run_dir = Path(train(cfg, **QUIET)["run_dir"])
    strip = lambda run: [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in read_metrics(run)]  # noqa: E731
    assert strip(whole) == strip(run_dir)
    x, y = (torch.load(d / "model.pt", weights_only=True) for d in (whole, run_dir))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_accumulated_batches_make_the_step_of_one_big_batch(tmp_path):
    """optim.accumulate=2 of 64 rows = one batch of 128 (the same samples in the same
    order: the last step has one part of 61 rows), to float rounding; and a run with
    accumulation stopped at a checkpoint (only between groups) resumes exactly."""
    def digits(out, optim, **extra):
        return _digits(out, data={"augment": "none"}, mutual_information={"every_steps": 0},
                       optim={"warmup_epochs": 0, "ema_decay": None, "epochs": 2, **optim}, **extra)

    big = train(digits(tmp_path / "big", {"batch_size": 128}), **QUIET)
    small = train(digits(tmp_path / "acc", {"batch_size": 64, "accumulate": 2}), **QUIET)
    x, y = (torch.load(Path(r["run_dir"]) / "model.pt", weights_only=True) for r in (big, small))
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-5)
    assert small["final"]["train_loss"] == pytest.approx(big["final"]["train_loss"], rel=1e-5)

    cut = digits(tmp_path / "cut", {"batch_size": 64, "accumulate": 2}, checkpoint_every_steps=5)
    assert train(cut, stop_after_step=5, **QUIET) is None
    assert torch.load(cut.run_dir() / "checkpoint.pt", weights_only=True)["step_in_epoch"] == 10  # 5 steps, 10 parts
    resumed = Path(train(cut, **QUIET)["run_dir"])
    strip = lambda run: [{k: v for k, v in m.items() if k not in TIME_KEYS}  # noqa: E731
                         for m in read_metrics(run, "all")]
    assert strip(resumed) == strip(Path(small["run_dir"]))
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (resumed, Path(small["run_dir"])))
    assert all(torch.equal(a[k], b[k]) for k in a)
