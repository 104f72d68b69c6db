"""The teacher-logit cache is exact: a student trained with it matches the online teacher."""

import numpy as np
import pytest

from kdlab.config import build_config
from kdlab.runs import read_metrics
from kdlab.teacher_cache import table_bytes
from kdlab.train import train

QUIET = dict(progress=False, log=lambda *a: None)
NUMERIC = ("train_loss", "train_acc", "val_acc", "val_nll", "test_acc", "test_nll", "test_logit_distance")


def _cfg(out, **extra):
    data = {"out_dir": str(out), "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "mlp-32"}, "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "milestones": [2]}}
    data.update(extra)
    return build_config(data)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t")
    return train(_cfg(out, name="teacher", model={"name": "mlp-128"}), **QUIET)


def _student(out, teacher, mode, dtype="float32"):
    return _cfg(out, name="student", loss={"alpha": 0.9, "tau": 4.0},
                teacher={"runs": [teacher["run_dir"]], "cache": {"mode": mode, "dtype": dtype}})


def _numbers(run_dir):
    return [[m[k] for k in NUMERIC] for m in read_metrics(run_dir)]


@pytest.mark.parametrize("mode", ["full", "lazy"])
def test_cached_student_matches_online_student(tmp_path, teacher, mode):
    online = train(_student(tmp_path / "online", teacher, "off"), **QUIET)
    lines = []
    cached = train(_student(tmp_path / "cached", teacher, mode), progress=False, log=lines.append)
    np.testing.assert_allclose(_numbers(cached["run_dir"]), _numbers(online["run_dir"]), rtol=1e-5, atol=1e-6)
    assert any("1,300 samples × 25 views × 10 classes × float32" in l for l in lines)  # memory stated up front
    tables = list((tmp_path / "cached" / ".teacher-cache").glob("teacher-logits-*.npz"))
    assert len(tables) == 1
    with np.load(tables[0]) as stored:
        filled = stored["filled"]
    assert filled.all() if mode == "full" else 0 < filled.mean() < 1


def test_table_is_shared_and_reused(tmp_path, teacher):
    cfg = _student(tmp_path, teacher, "full")
    train(cfg, **QUIET)
    table = next((tmp_path / ".teacher-cache").glob("*.npz"))
    before = table.stat().st_mtime_ns
    other = _cfg(tmp_path, name="student2", model={"name": "mlp-16"}, loss={"alpha": 1.0, "tau": float("inf")},
                 teacher={"runs": [teacher["run_dir"]], "cache": {"mode": "full"}})
    train(other, **QUIET)
    assert table.stat().st_mtime_ns == before  # complete already: read, not rebuilt or rewritten


def test_over_the_memory_limit_falls_back_to_the_online_teacher(tmp_path, teacher):
    cfg = _cfg(tmp_path, loss={"alpha": 1.0}, teacher={"runs": [teacher["run_dir"]], "cache": {"mode": "full", "max_gb": 1e-6}})
    lines = []
    train(cfg, progress=False, log=lines.append)
    assert any("online" in l for l in lines)
    assert not (tmp_path / ".teacher-cache").exists()


def test_fp16_table_changes_the_hash_and_stays_close(tmp_path, teacher):
    a, b = _student(tmp_path, teacher, "full"), _student(tmp_path, teacher, "full", "float16")
    assert a.run_hash() != b.run_hash() and a.run_hash() == _student(tmp_path, teacher, "off").run_hash()
    assert table_bytes(50000, 162, 100, "float16") == 1_620_000_000  # CIFAR-100 with crop+flip: 1.6 GB
