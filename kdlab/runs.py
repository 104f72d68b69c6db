"""Run dirs: metadata, the lock, and reading finished runs (e.g. as teachers).

A run dir ``<out_dir>/<name>-<hash>`` holds::

    config.yaml        the resolved config (its hash is in the dir name)
    meta.json          kdlab/torch versions, git commit, host, start time
    metrics.jsonl      one JSON line per epoch
    checkpoint.pt      latest epoch: model, optimizer, scheduler, RNG states (until done)
    model.pt           final weights (a plain state_dict, load with weights_only=True)
    eval_val.npz       logits, labels, penultimate features (+ teacher_logits)
    eval_test.npz      the same for the test split
    label_noise.npz    flipped indices and clean labels, when label noise is on
    result.json        final numbers; written last, so its presence means "finished"
    .lock              held (flock) by the one process training the run; holds its pid/host/start

A folder ``kdlab export`` wrote (kdlab/export.py) holds config.yaml, result.json and
model.safetensors instead of model.pt: it loads as a finished run (a teacher, ``kdlab.load_run``).

Every file is written atomically (``kdlab/files.py``); weights files are read by
``kdlab/weights.py``. Both modules' names are importable from here too.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from .version import __version__
from .errors import ConfigError, RunError, warn
from .files import (
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    lock_file,
    make_dirs,
    remove_stale_temporaries,
)
from .weights import file_sha256, load_weights, load_weights_model, read_state_dict, torch_load

__all__ = [
    "RunLock", "git_commit", "run_meta", "system_memory_bytes", "read_json", "parse_metrics", "read_metrics",
    "load_eval", "load_run_config", "load_finished_model",
    # from kdlab.files and kdlab.weights, importable from here as before they moved
    "atomic_save_npz", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "check_writable_dir", "lock_file", "make_dirs", "remove_stale_temporaries",
    "file_sha256", "load_weights", "load_weights_model", "read_state_dict", "torch_load",
]


def system_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class RunLock:
    """The one process that trains a run dir holds an exclusive ``flock`` on ``.lock``
    (through ``filelock``). The kernel releases it when the process ends in any way,
    SIGKILL included, so a lock is never stale. The holder writes its pid, host and start
    time into the file, for the message another process gets."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        # no soft-lock fallback: a marker file outlives a SIGKILLed holder (a stale lock)
        self._lock = FileLock(lock_file(self.path), thread_local=False, fallback_to_soft=False)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self, wait: bool = False, log=print) -> None:
        """Take the lock, or raise a one-line RunError naming the holder (``wait=False``),
        or say who holds it and wait until it is released (``wait=True``)."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise RunError(f"{self.run_dir} is being trained by {self.holder()}; one process per run: wait "
                               "for it to finish (or stop it) and start again") from None
            log(f"{self.run_dir}: waiting for {self.holder()}, which is training it")
            self._lock.acquire()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(self.path, "r+") as handle:  # no O_TRUNC by a loser: only the holder rewrites it
            handle.write(json.dumps(info) + "\n")
            handle.truncate()

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @staticmethod
    def busy(run_dir: Path) -> str | None:
        """The holder of ``run_dir``'s lock while it is held (by any other handle: flock
        locks belong to open files, so this process's own lock counts too), else None."""
        lock = RunLock(run_dir)
        if not lock.path.exists():
            return None
        try:
            lock._lock.acquire(timeout=0)
        except Timeout:
            return lock.holder()
        lock._lock.release()
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta() -> dict:
    return {
        "kdlab_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: unreadable JSON ({type(err).__name__})") from None


def parse_metrics(path: Path) -> tuple[list[dict], bool]:
    """The records of a ``metrics.jsonl`` and whether a partial last line (an append cut
    short by a kill or power loss) was dropped. A bad line elsewhere is a RunError."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: unreadable ({type(err).__name__})") from None
    lines = [line for line in text.split("\n")]
    records, partial = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                partial = True  # the last line: an interrupted append
                continue
            raise RunError(f"{path}: line {number} is not a JSON record; the file is damaged") from None
        records.append(record)
    return records, partial


def read_metrics(run_dir: Path, kind: str = "epoch") -> list[dict]:
    """Records of ``metrics.jsonl``: ``kind="epoch"`` (one per epoch), ``"mutual_information"``
    (one per probe evaluation) or ``"all"``. A partial last line is ignored with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records, partial = parse_metrics(path)
    if partial:
        warn(f"{path}: ignoring a partial last line (an interrupted write)")
    if kind == "epoch":
        return [r for r in records if "train_loss" in r]
    if kind == "mutual_information":
        return [r for r in records if "mutual_information" in r]
    return records


def load_eval(run_dir: Path, split: str) -> dict | None:
    """The arrays of ``RUN_DIR/eval_SPLIT.npz``, or None when the run has no such file."""
    path = run_dir / f"eval_{split}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:
        raise RunError(f"{path}: unreadable eval outputs ({type(err).__name__})") from None


def load_run_config(run_dir: Path):
    from .config import Config, yaml_load

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a kdlab run dir (no config.yaml)")
    try:
        return Config.model_validate(yaml_load(path.read_text()))
    except Exception as err:
        raise RunError(f"{path}: invalid run config ({str(err).splitlines()[0]})") from None



def load_finished_model(run_dir: Path, num_classes: int | None = None, input_shape=None):
    """The final model of a finished run, in eval mode with frozen parameters. A folder
    ``kdlab export`` wrote is one too: its model.safetensors stands for model.pt.

    ``num_classes`` / ``input_shape``, when given, must match the run's (a teacher for
    another dataset is refused with a one-line error)."""
    from .models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"teacher run dir {run_dir} does not exist: train the teacher first (its config with "
                          f"the same out_dir; teacher.runs=[config:NAME] names the run dir NAME trains)")
    cfg = load_run_config(run_dir)
    if not (run_dir / "result.json").is_file():
        raise RunError(f"run {run_dir} is not finished (no result.json): train it first")
    result = read_json(run_dir / "result.json")
    if num_classes is not None and result["num_classes"] != num_classes:
        raise ConfigError(
            f"teacher {run_dir} predicts {result['num_classes']} classes but the dataset has {num_classes}"
        )
    if input_shape is not None and tuple(result["input_shape"]) != tuple(input_shape):
        raise ConfigError(
            f"teacher {run_dir} takes inputs of shape {tuple(result['input_shape'])}, the dataset gives {tuple(input_shape)}"
        )
    model = build_model(cfg.model.name, result["num_classes"], input_shape=result["input_shape"])
    exported = run_dir / "model.safetensors"
    if not (run_dir / "model.pt").is_file() and exported.is_file():  # a folder `kdlab export` wrote (timm: no net.)
        load_weights(model, exported, f"run {run_dir}")
    else:
        state = torch_load(run_dir / "model.pt")
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise RunError(f"{run_dir / 'model.pt'}: weights do not fit {cfg.model.name} "
                           f"({str(err).splitlines()[0]})") from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
