"""Files kdlab writes: atomic writes, writable-directory checks, lock-file paths.

Every file is written atomically (a temporary file in the same directory, fsync,
rename), with the usual permissions (0666 minus the umask, i.e. 0644). A temporary file
left by a killed write (``.NAME.XXXX.tmp``) is removed when the run is next started.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, RunError

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
