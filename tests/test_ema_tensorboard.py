"""Weight EMA (optim.ema_decay) and TensorBoard scalars."""

from pathlib import Path

import pytest
import torch

from conftest import config_with
from kdlab.runs import read_metrics
from kdlab.train import train

TIME_KEYS = {"epoch_time_s", "images_per_s"}
QUIET = {"progress": False, "log": lambda *a: None}


def _digits(out_dir, **extra):
    base = {"out_dir": str(out_dir), "threads": 1, "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "wrn-10-1"}, "optim": {"epochs": 4, "batch_size": 128, "lr": 0.05, "milestones": [3]}}
    return config_with(base, **extra)


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in read_metrics(run_dir)]


def test_ema_is_evaluated_saved_and_resumes_exactly(tmp_path):
    plain = train(_digits(tmp_path / "plain"), **QUIET)
    cfg = _digits(tmp_path / "ema", optim={"ema_decay": 0.9})
    assert cfg.run_hash() != _digits(tmp_path).run_hash()
    whole = train(cfg, **QUIET)
    run_dir = Path(whole["run_dir"])
    metrics = _metrics(run_dir)
    # the average does not touch training: the raw weights' metrics are those of the run without it
    assert [{k: v for k, v in m.items() if not k.startswith("ema_")} for m in metrics] == _metrics(plain["run_dir"])
    assert all({"ema_val_acc", "ema_test_acc", "ema_test_nll"} <= set(m) for m in metrics)
    assert metrics[-1]["ema_test_acc"] != metrics[-1]["test_acc"] and "ema_test_acc" in whole["final"]
    raw, averaged = (torch.load(run_dir / name, weights_only=True) for name in ("model.pt", "model_ema.pt"))
    assert raw.keys() == averaged.keys() and not torch.equal(raw["fc.weight"], averaged["fc.weight"])
    assert all(torch.isfinite(v.float()).all() for v in averaged.values())

    # killed after epoch 2 (checkpoint written, as a kill would leave it) and resumed: exact
    cut = _digits(tmp_path / "cut", optim={"ema_decay": 0.9})
    assert train(cut, stop_after_epoch=2, **QUIET) is None
    resumed = Path(train(cut, **QUIET)["run_dir"])
    assert _metrics(resumed) == metrics
    for name in ("model.pt", "model_ema.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (run_dir, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_scalars_match_the_metrics_and_survive_a_resume(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from torch.utils.tensorboard import SummaryWriter

    cfg = _digits(tmp_path, optim={"ema_decay": 0.9})
    assert train(cfg, stop_after_epoch=2, **QUIET) is None
    # what a process killed in epoch 3, after the checkpoint of epoch 2, would have logged
    stray = SummaryWriter(str(cfg.run_dir() / "tensorboard"))
    stray.add_scalar("train/loss", 123.0, 3 * 11)
    stray.close()
    run_dir = Path(train(cfg, **QUIET)["run_dir"])
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one per writer
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "val/acc", "test/acc", "ema_val/acc", "speed/images_per_s"} <= tags
    metrics = read_metrics(run_dir)
    steps_per_epoch = 11  # 1,300 training images / 128
    for tag, key in (("train/loss", "train_loss"), ("val/acc", "val_acc"), ("ema_test/acc", "ema_test_acc")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [m["epoch"] * steps_per_epoch for m in metrics]  # once per epoch
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6)

    off = _digits(tmp_path / "off", tensorboard=False)
    assert off.run_hash() == _digits(tmp_path / "off").run_hash()  # not part of the run's identity
    assert not (Path(train(off, **QUIET)["run_dir"]) / "tensorboard").exists()
