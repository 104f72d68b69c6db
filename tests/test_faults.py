"""Runs under kills and concurrency: SIGKILL at many points resumes bit-identically, one
process per run dir, a killed sweep leaves no worker behind and its re-run loses nothing.

Every kill here is a real SIGKILL of a real ``kdlab`` process: at a random point of
training (as soon as a given epoch's metrics line appears), or inside an atomic write
(``KDLAB_TEST_KILL_IN_WRITE=PATTERN:N``: after the temporary file is complete, before
the rename). The process that follows a kill resumes the run; at the end the run dir
must hold exactly what an uninterrupted run holds.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import config_with, process_alive, process_descendants
from kdlab.runs import read_metrics
from kdlab.train import train

TIME_KEYS = {"epoch_time_s", "images_per_s"}
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
ENV.pop("KDLAB_TEST_KILL_IN_WRITE", None)


def _config(out_dir, **extra):
    data = {"out_dir": str(out_dir), "threads": 1,
            "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "mlp-128-128"},
            "optim": {"epochs": 8, "batch_size": 32, "lr": 0.05, "schedule": "cosine"}}
    return config_with(data, **extra)


def _write(cfg, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def _start(config_path: Path, cwd: Path, kill_in_write: str | None = None) -> subprocess.Popen:
    env = dict(ENV, KDLAB_TEST_KILL_IN_WRITE=kill_in_write) if kill_in_write else ENV
    return subprocess.Popen([sys.executable, "-m", "kdlab", "train", str(config_path), "--no-progress"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after_epoch(process: subprocess.Popen, run_dir: Path, epoch: int, timeout: float = 120) -> bool:
    """SIGKILL ``process`` as soon as metrics.jsonl shows ``epoch`` (i.e. somewhere in the
    next epoch's training). False when the process ended before that."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            lines = []
        if sum('"train_loss"' in line for line in lines) >= epoch:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the run did not reach the epoch in time")


def _assert_same_run(reference: Path, resumed: Path) -> None:
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]  # noqa: E731
    assert strip(read_metrics(reference, "all")) == strip(read_metrics(resumed, "all"))
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for split in ("train", "val", "test"):
        with np.load(reference / f"eval_{split}.npz") as x, np.load(resumed / f"eval_{split}.npz") as y:
            assert sorted(x.files) == sorted(y.files)
            assert all(np.array_equal(x[k], y[k]) for k in x.files)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (reference, resumed))
    assert ra["final"] == rb["final"]
    names = {p.name for p in resumed.iterdir()}
    assert "checkpoint.pt" not in names and not any(n.endswith(".tmp") for n in names)
    assert (resumed / "result.json").stat().st_mode & 0o044 == 0o044  # readable by group and others


def _kill_chain(cfg, tmp_path: Path, plan: list) -> int:
    """Run ``cfg`` in fresh processes, each killed as ``plan`` says (("epoch", k): in epoch
    k + 1; ("write", pattern): inside that atomic write), then once more to the end.
    Returns how many processes were really killed mid-run."""
    config_path = _write(cfg, tmp_path / f"{cfg.name}.yaml")
    run_dir = cfg.run_dir()
    kills = 0
    for kind, arg in plan:
        if kind == "epoch":
            process = _start(config_path, tmp_path)
            killed = _kill_after_epoch(process, run_dir, arg)
        else:
            process = _start(config_path, tmp_path, kill_in_write=arg)
            process.wait(timeout=300)
            killed = process.returncode == -signal.SIGKILL
            assert killed or process.returncode == 0, process.stderr.read()
        kills += killed
        if kind == "epoch" and arg == 3:  # a power loss in the middle of an append
            with open(run_dir / "metrics.jsonl", "a") as handle:
                handle.write('{"epoch": 4, "lr": 0.04, "train_lo')
    final = _start(config_path, tmp_path)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert "Traceback" not in err
    return kills


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = _config(out, name="teacher", model={"name": "mlp-64"}, optim={"epochs": 3})
    return Path(train(cfg, progress=False, log=lambda *a: None)["run_dir"])


def test_sigkill_at_many_points_resumes_bit_identically(tmp_path):
    """7 kills of one plain run: in the middle of epochs, and inside the atomic writes of
    the checkpoint, the metrics, the final weights, an eval file and the result."""
    rng = random.Random(0)
    reference = train(_config(tmp_path / "ref"), progress=False, log=lambda *a: None)
    cfg = _config(tmp_path / "chain")
    plan = [("write", "meta.json"), ("epoch", rng.randint(1, 2)), ("write", f"checkpoint.pt:{rng.randint(1, 2)}"),
            ("epoch", 3), ("write", "metrics.jsonl"), ("epoch", rng.randint(5, 7)),
            ("write", "model.pt"), ("write", "eval_test.npz"), ("write", "result.json")]
    kills = _kill_chain(cfg, tmp_path, plan)
    assert kills >= 7
    _assert_same_run(Path(reference["run_dir"]), cfg.run_dir())


def test_sigkill_of_a_lazy_cache_run_resumes_bit_identically(tmp_path, teacher):
    """A student on a lazy teacher cache, killed before the cache is ever saved (its
    entries are recomputed) and inside the cache's own save; its table was started by
    another run (other entries, other batches): the values must not depend on that."""
    student = dict(name="student", model={"name": "mlp-32"}, loss={"alpha": 0.9, "tau": 4.0},
                   teacher={"runs": [str(teacher)], "cache": {"mode": "lazy"}})
    reference = train(_config(tmp_path / "ref", **student), progress=False, log=lambda *a: None)
    other_seed = _config(tmp_path / "chain", seed=1, optim={"epochs": 2}, **student)
    train(other_seed, progress=False, log=lambda *a: None)  # fills part of the chain's table
    assert list((tmp_path / "chain" / ".teacher-cache").glob("teacher-logits-*.npz"))
    cfg = _config(tmp_path / "chain", **student)
    kills = _kill_chain(cfg, tmp_path, [("epoch", 2), ("epoch", 4), ("write", "teacher-logits-*.npz"),
                                        ("write", "result.json")])
    assert kills >= 4
    _assert_same_run(Path(reference["run_dir"]), cfg.run_dir())


def test_two_concurrent_starts_train_once(tmp_path):
    cfg = _config(tmp_path / "out", optim={"epochs": 30})
    config_path = _write(cfg, tmp_path / "c.yaml")
    first, second = _start(config_path, tmp_path), _start(config_path, tmp_path)
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    codes = sorted(code for _, _, code in results)
    errors = [err for _, err, code in results if code == 2]
    assert codes == [0, 2], results
    assert len(errors[0].strip().splitlines()) == 1
    assert errors[0].startswith("kdlab: error:") and "is being trained by pid" in errors[0]
    epochs = [m["epoch"] for m in read_metrics(cfg.run_dir())]
    assert epochs == list(range(1, 31))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_killed_sweep_leaves_no_worker_and_its_rerun_loses_nothing(tmp_path):
    recipe = {"id": "tiny-faults", "title": "kill a sweep", "source": "tests",
              "scales": {"quick": {"seeds": [0, 1, 2, 3],
                                   "base": {"threads": 1, "data": {"name": "digits", "val_size": 200},
                                            "model": {"name": "mlp-128-128"},
                                            "optim": {"epochs": 40, "batch_size": 32, "lr": 0.05}},
                                   "stages": [{"name": "net"}]}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "kdlab", "sweep", str(path), "--workers", "2", "--out", str(out), "--no-progress"]
    sweep = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while sum(1 for m in out.glob("*/metrics.jsonl") if m.stat().st_size) < 2:  # both workers training
        assert time.monotonic() < deadline and sweep.poll() is None, "the sweep did not start two runs"
        time.sleep(0.05)
    workers = process_descendants(sweep.pid)  # pid -> (start time, command line)
    assert len(workers) >= 2
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 10
    while any(process_alive(p, start) for p, (start, _) in workers.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p, (start, _) in workers.items() if process_alive(p, start)], "workers outlived their sweep"

    rerun = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done"] * 4
    for run in manifest["runs"]:
        assert [m["epoch"] for m in read_metrics(run["run_dir"])] == list(range(1, 41))


def test_a_sweep_trains_identical_configs_once(tmp_path):
    from kdlab.recipes import Recipe
    from kdlab.sweep import run_sweep

    recipe = Recipe.model_validate({
        "id": "collapse", "title": "t", "source": "tests",
        "scales": {"quick": {"seeds": [0, 1, 2],
                             "base": {"data": {"name": "digits", "val_size": 200}, "model": {"name": "mlp-16"},
                                      "optim": {"epochs": 1}},
                             "stages": [{"name": "net"}]}}})
    lines = []
    manifest = run_sweep(recipe, "quick", tmp_path / "s", workers=2, settings=["seed=0"], progress=False,
                         log=lines.append)
    assert any("3 grid entries are 1 distinct configs (2 identical" in line for line in lines)
    assert manifest["distinct_runs"] == 1 and len(manifest["runs"]) == 3
    assert len(list((tmp_path / "s").glob("collapse-net-*"))) == 1


def test_stale_temporaries_and_a_corrupt_teacher_cache_are_repaired(tmp_path, teacher, capsys):
    student = dict(name="student", model={"name": "mlp-32"}, loss={"alpha": 0.9, "tau": 4.0}, optim={"epochs": 2},
                   teacher={"runs": [str(teacher)], "cache": {"mode": "full"}})
    cfg = _config(tmp_path / "out", **student)
    assert train(cfg, progress=False, stop_after_epoch=1, log=lambda *a: None) is None
    stale = cfg.run_dir() / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    (table,) = (tmp_path / "out" / ".teacher-cache").glob("teacher-logits-*.npz")
    table.write_bytes(table.read_bytes()[:1000])  # truncated
    resumed = train(cfg, progress=False, log=lambda *a: None)
    err = capsys.readouterr().err
    assert "removed 1 temporary file" in err and "unreadable" in err and "rebuilding it" in err
    assert not stale.exists() and resumed["final"]["test_acc"] > 0.1  # trained (10 classes)
    with np.load(table) as stored:  # rebuilt, complete
        assert stored["filled"].all()


@pytest.mark.slow
def test_random_fault_injection_run(tmp_path, teacher):
    """The longer run: 12 faults drawn at random (seeded) among every kind above, on a
    student with a lazy teacher cache and the mutual-information probe on."""
    rng = random.Random(12345)
    student = dict(name="student", model={"name": "mlp-32"}, loss={"alpha": 0.5, "tau": 2.0},
                   optim={"epochs": 10}, teacher={"runs": [str(teacher)], "cache": {"mode": "lazy"}},
                   mutual_information={"every_steps": 9, "classes": [0, 1], "per_class": 20, "views": 3})
    reference = train(_config(tmp_path / "ref", **student), progress=False, log=lambda *a: None)
    # every process writes meta/metrics at its start and a checkpoint after its first epoch;
    # the cache is saved once, after the last epoch; the eval files, weights and result by
    # every process that reaches the end: so starts first, epochs in order, then the end
    starts = [("write", rng.choice(["meta.json", "metrics.jsonl", "checkpoint.pt:1", "checkpoint.pt:2"]))
              for _ in range(3)]
    epochs = [("epoch", k) for k in sorted(rng.sample(range(1, 10), 5))]
    ends = [("write", name) for name in rng.sample(["eval_train.npz", "eval_val.npz", "eval_test.npz", "model.pt"], 3)]
    plan = starts + epochs + [("write", "teacher-logits-*.npz")] + ends
    cfg = _config(tmp_path / "chain", **student)
    kills = _kill_chain(cfg, tmp_path, plan)
    assert kills == 12
    _assert_same_run(Path(reference["run_dir"]), cfg.run_dir())
