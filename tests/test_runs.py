"""Run dirs: the lock, atomic writes' permissions, metrics repair, corrupt checkpoints,
the thread count kept on resume."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from kdlab.config import build_config
from kdlab.errors import RunError
from kdlab.runs import RunLock, atomic_write_text, parse_metrics, read_metrics
from kdlab.train import train

TIME_KEYS = {"epoch_time_s", "images_per_s"}


def _digits(out_dir, **extra):
    data = {"out_dir": str(out_dir), "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "mlp-64"}, "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05}}
    data.update(extra)
    return build_config(data)


def test_atomic_writes_are_readable_by_group_and_others(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_file_kdlab_writes_has_the_usual_permissions(tmp_path, monkeypatch):
    """Run dirs, the MNIST-1D cache, the teacher cache and its lock, a tokenizer: 0666 minus
    the umask (0644), never mkstemp's 0600."""
    pytest.importorskip("sentencepiece")
    from test_translation_run import write_corpus

    from kdlab.data.sources import load_mnist1d_arrays
    from kdlab.data.text import folder_corpus, tokenizer_file

    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))
    load_mnist1d_arrays.cache_clear()  # generated (and cached on disk) again, under this cache dir
    quiet = {"progress": False, "log": lambda *a: None}
    base = {"out_dir": str(tmp_path / "runs"), "data": {"name": "mnist1d", "num_samples": 500},
            "model": {"name": "mlp-16"}, "optim": {"epochs": 1}}
    teacher = train(build_config({**base, "name": "teacher"}), **quiet)
    train(build_config({**base, "name": "student", "loss": {"alpha": 1.0},
                        "teacher": {"runs": [teacher["run_dir"]], "cache": {"mode": "full"}}}), **quiet)
    tokenizer_file(folder_corpus(write_corpus(tmp_path / "text")), 40, tmp_path / "cache" / "tokenizers", log=quiet["log"])
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "text" not in p.relative_to(tmp_path).parts]
    kinds = {p.suffix for p in files}
    assert {".npz", ".lock", ".json", ".yaml", ".pt", ".jsonl", ".model"} <= kinds, kinds
    assert any("mnist1d" in p.parts for p in files) and any("teacher-logits" in p.name for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~_umask()}
    assert not wrong


def test_run_lock_is_exclusive_across_processes_and_names_its_holder(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        assert f"pid {os.getpid()}" in RunLock.busy(tmp_path)  # flock: another handle, even ours, is refused
        code = ("import sys; from kdlab.runs import RunLock\n"
                "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as err:\n    print(err); sys.exit(3)\n")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode == 3 and f"pid {os.getpid()}" in other.stdout and "is being trained by" in other.stdout
        busy = subprocess.run([sys.executable, "-c", "import sys; from kdlab.runs import RunLock; "
                               "print(RunLock.busy(sys.argv[1]))", str(tmp_path)], capture_output=True, text=True)
        assert f"pid {os.getpid()}" in busy.stdout
    finally:
        lock.release()
    after = subprocess.run([sys.executable, "-c", "import sys; from kdlab.runs import RunLock; "
                            "print(RunLock.busy(sys.argv[1]))", str(tmp_path)], capture_output=True, text=True)
    assert after.stdout.strip() == "None"


def test_a_partial_last_metrics_line_is_dropped_and_a_damaged_one_is_an_error(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "train_lo')
    records, partial = parse_metrics(path)
    assert records == [{"epoch": 1, "train_loss": 1.0}] and partial
    assert read_metrics(tmp_path) == [{"epoch": 1, "train_loss": 1.0}]
    assert "ignoring a partial last line" in capsys.readouterr().err
    path.write_text('{"epoch": 1, "train_loss": 1.0}\ngarbage\n{"epoch": 2, "train_loss": 0.5}\n')
    with pytest.raises(RunError, match="line 2 is not a JSON record"):
        parse_metrics(path)


def test_a_corrupt_checkpoint_is_moved_aside_and_the_next_start_restarts(tmp_path):
    cfg = _digits(tmp_path)
    full = train(_digits(tmp_path / "ref"), progress=False, log=lambda *a: None)
    assert train(cfg, progress=False, stop_after_epoch=2, log=lambda *a: None) is None
    checkpoint = cfg.run_dir() / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(RunError, match="moved it to checkpoint.pt.corrupt: run the same command again"):
        train(cfg, progress=False, log=lambda *a: None)
    assert (cfg.run_dir() / "checkpoint.pt.corrupt").is_file() and not checkpoint.exists()
    restarted = train(cfg, progress=False, log=lambda *a: None)  # from epoch 0: the same run as uninterrupted
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]  # noqa: E731
    assert strip(read_metrics(restarted["run_dir"])) == strip(read_metrics(full["run_dir"]))


def test_thread_count_is_recorded_and_kept_on_resume(tmp_path):
    assert torch.get_num_threads() == 1  # tests/conftest.py
    full = train(_digits(tmp_path / "ref"), progress=False, log=lambda *a: None)
    cfg = _digits(tmp_path)
    train(cfg, progress=False, stop_after_epoch=1, log=lambda *a: None)
    messages = []
    torch.set_num_threads(2)
    try:
        resumed = train(cfg, progress=False, log=messages.append)
        assert torch.get_num_threads() == 2  # the process's own count is given back
    finally:
        torch.set_num_threads(1)
    assert any("resuming with 1 torch threads as recorded" in m for m in messages)
    assert resumed["torch_threads"] == 1 and resumed["final"] == full["final"]
    meta = json.loads((cfg.run_dir() / "meta.json").read_text())
    assert [s["start_epoch"] for s in meta["starts"]] == [0, 1]
    assert meta["torch_threads"] == 1 and meta["device_type"] == "cpu"
