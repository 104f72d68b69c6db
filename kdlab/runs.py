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
    .lock              held (flock) by the one process training the run; holds its pid/host/start

Every file is written atomically (a temporary file in the same directory, fsync,
rename), with the usual permissions (0666 minus the umask, i.e. 0644). A temporary file
left by a killed write (``.NAME.XXXX.tmp``) is removed when the run is next started.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from . import __version__
from .errors import ConfigError, RunError, warn

_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Fault injection for the kill/resume tests: ``KDLAB_TEST_KILL_IN_WRITE=PATTERN[:N]`` makes
# this process SIGKILL itself inside its N-th (default 1st) atomic write of a file whose
# name matches the glob PATTERN, after the temporary file is complete, before the rename.
_KILL_IN_WRITE = os.environ.get("KDLAB_TEST_KILL_IN_WRITE", "")
_writes_seen = 0


def _fault_point(name: str) -> None:
    global _writes_seen
    pattern, _, count = _KILL_IN_WRITE.partition(":")
    if fnmatch.fnmatchcase(name, pattern):
        _writes_seen += 1
        if _writes_seen >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``
    (so a reader sees the old file or the new one, never a part)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; run files are readable as usual
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if _KILL_IN_WRITE:
            _fault_point(path.name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_dir(path, what: str, probe: bool = False) -> None:
    """``path`` (or, if it does not exist yet, its nearest existing parent) is a writable
    directory; a one-line ConfigError naming ``what`` (a key or an option) otherwise.
    ``probe``: also create and remove a file there — permission bits do not tell (root
    passes them on /proc and /sys, which hold no files); call it where writing is next."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {existing} is not writable")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(dir=existing, prefix=".kdlab-probe-", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            raise ConfigError(f"{what}: {existing} cannot hold files ({err.strerror or type(err).__name__}); "
                              "choose a directory on a real file system") from None


def make_dirs(path, what: str) -> None:
    """``mkdir -p path``, or a one-line ConfigError naming ``what``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{what}: cannot create {path} ({err.strerror or type(err).__name__})") from None


def system_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Delete ``.NAME.XXXX.tmp`` files of atomic writes a killed process left behind.
    Call it only while holding the directory's lock (nobody else is writing there)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def lock_file(path) -> str:
    """The path of a lock file kdlab is about to take, or a one-line RunError when
    something else (a directory, a device) sits there."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise RunError(f"{path} is {kind}, where kdlab keeps a lock file: move it away and run again")
    return str(path)


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
        with warnings.catch_warnings():  # (a legacy, non-zip pickle makes torch warn before it fails: our line says it)
            warnings.simplefilter("ignore")
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path, what: str) -> dict:
    """A plain weights file as a state dict: torch (``.pt``/``.pth``, loaded with
    ``weights_only=True``; a checkpoint's ``state_dict``/``model`` entry and DDP's
    ``module.`` prefix are taken as such) or safetensors. One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{what}: {path} is a safetensors file: pip install safetensors") from None
        try:
            state = load_file(str(path))
        except Exception as err:
            raise RunError(f"{path}: corrupt or unreadable safetensors file ({type(err).__name__})") from None
    else:
        state = torch_load(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model, path: Path, what: str, assign: bool = False) -> None:
    """Load a plain weights file into ``model`` (strictly: every key, every shape). A timm
    model takes timm's / torchvision's own keys or a kdlab ``model.pt`` (keys under
    ``net.``). ``assign=True`` (a model on the meta device) checks keys and shapes only."""
    state = read_state_dict(path, what)
    target = model
    if hasattr(model, "net") and not any(k.startswith("net.") for k in state):
        target = model.net
    try:
        target.load_state_dict(state, assign=assign)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = " ".join(lines[1:3] if len(lines) > 1 else lines)[:300]
        raise RunError(f"{what}: {path} does not fit the model ({reason})") from None


def load_weights_model(name: str, path: Path, num_classes: int, input_shape, what: str):
    """A frozen model in eval mode: ``name`` built for the data, weights from ``path``."""
    from .models import build_model

    try:
        model = build_model(name, num_classes, input_shape=input_shape)
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from None
    load_weights(model, path, what)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


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
