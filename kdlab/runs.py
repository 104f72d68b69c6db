"""Run dirs: atomic writes, metadata, and loading finished runs (e.g. as teachers).

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
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .errors import ConfigError, RunError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npz(path: Path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def torch_load(path: Path):
    """``torch.load(weights_only=True)`` with a one-line error for a corrupt file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__})") from None


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


def read_metrics(run_dir: Path, kind: str = "epoch") -> list[dict]:
    """Records of ``metrics.jsonl``: ``kind="epoch"`` (one per epoch), ``"mutual_information"``
    (one per probe evaluation) or ``"all"``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if kind == "epoch":
        return [r for r in records if "train_loss" in r]
    if kind == "mutual_information":
        return [r for r in records if "mutual_information" in r]
    return records


def load_run_config(run_dir: Path):
    from .config import Config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a kdlab run dir (no config.yaml)")
    try:
        return Config.model_validate(yaml.safe_load(path.read_text()))
    except Exception as err:
        raise RunError(f"{path}: invalid run config ({str(err).splitlines()[0]})") from None


def load_finished_model(run_dir: Path, num_classes: int | None = None, input_shape=None):
    """The final model of a finished run, in eval mode with frozen parameters.

    ``num_classes`` / ``input_shape``, when given, must match the run's (a teacher for
    another dataset is refused with a one-line error)."""
    from .models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"teacher run dir {run_dir} does not exist")
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
    state = torch_load(run_dir / "model.pt")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise RunError(f"{run_dir / 'model.pt'}: weights do not fit {cfg.model.name} ({str(err).splitlines()[0]})") from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
