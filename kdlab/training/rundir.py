"""A run dir's life around the loop: claiming it (checks, mkdir, the lock; waiting for
another process when asked), removing what a failed start created, reading and restoring
a checkpoint (a corrupt one set aside), keeping the recorded thread count on resume, and
``meta.json`` with every start's environment."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import Config
from ..device import describe_device
from ..errors import RunError, warn
from ..runs import RunLock, atomic_write_json, check_writable_dir, make_dirs, read_json, run_meta, torch_load


def remove_created(run_dir: Path, created: Path | None) -> None:
    """Remove ``run_dir`` and the parents this call created, if empty (a sweep's out_dir
    may hold other runs by now: never more than that)."""
    if created is None:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != created.parent and parent.is_dir():
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what mkdir(parents) creates)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def claim_run_dir(cfg: Config, run_dir: Path, wait_for_lock: bool, log):
    """(result of a finished run or None, the held RunLock, the first directory this call
    created). Rank 0 only: checks that the places it will write are writable, makes the
    run dir, takes the run's lock (waiting for another process if asked)."""
    if (run_dir / "result.json").is_file():
        return read_json(run_dir / "result.json"), None, None
    check_writable_dir(cfg.out_dir, "out_dir", probe=True)
    if cfg.teacher is not None:
        for key, where in (("teacher.cache.dir", cfg.teacher.cache.dir), ("teacher.store.dir", cfg.teacher.store.dir)):
            if where:
                check_writable_dir(where, key, probe=True)
    created = first_missing(run_dir)
    make_dirs(run_dir, "out_dir")
    lock = RunLock(run_dir)
    try:
        lock.acquire(wait=wait_for_lock, log=log)
    except BaseException:
        if RunLock.busy(run_dir) is None:
            remove_created(run_dir, created)
        raise
    if created is not None and any(p.name != ".lock" for p in run_dir.iterdir()):
        created = None  # another process filled it while we waited: not ours to remove
    if (run_dir / "result.json").is_file():  # finished by the process we waited for
        lock.release()
        return read_json(run_dir / "result.json"), None, None
    return None, lock, created


def load_checkpoint(path: Path) -> dict:
    """The checkpoint, or (corrupt) moved aside to ``checkpoint.pt.corrupt`` and a RunError.
    A read error (EIO, permissions) is not corruption: the file stays where it is."""
    try:
        path.read_bytes()[:1]
    except OSError as err:
        raise RunError(f"{path}: cannot be read ({err.strerror}); it is left in place: fix the cause and run "
                       "the same command again to resume") from None
    try:
        state = torch_load(path)
        if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "generator"} <= set(state):
            raise RunError(f"{path}: not a kdlab checkpoint")
        return state
    except RunError as err:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise RunError(f"{err}; moved it to {aside.name}: run the same command again to restart this run from "
                       "epoch 0 (or put a good checkpoint back as checkpoint.pt to resume)") from None


def threads_for_resume(cfg: Config, recorded: int | None, log) -> None:
    """Keep the thread count the run was trained with (results depend on it), unless the
    config sets one; say so in one line when it differs from this process's."""
    current = torch.get_num_threads()
    if recorded is None or recorded == current:
        return
    if cfg.threads is not None:
        warn(f"resuming with threads={cfg.threads} as set, but epochs so far ran with {recorded}: the result "
             "will differ (at rounding level) from an uninterrupted run")
        return
    torch.set_num_threads(recorded)
    log(f"resuming with {recorded} torch threads as recorded in the checkpoint (this process had {current}; "
        "set threads=N to override)")


def write_meta(run_dir: Path, device: torch.device, start_epoch: int, weight_files=(), **extra) -> None:
    """meta.json: this start's environment, and every start's (a resumed run's history)."""
    path = run_dir / "meta.json"
    previous = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
    start = {**run_meta(), "device": describe_device(device), "device_type": device.type, "pid": os.getpid(),
             "start_epoch": start_epoch, **extra}
    if weight_files:  # plain weights files read by this start: path and SHA-256
        start["weight_files"] = list(weight_files)
    starts = [s for s in previous.get("starts", []) if isinstance(s, dict)] + [start]
    atomic_write_json(path, {**start, "starts": starts})


def add_weight_file(run_dir: Path, entry: dict) -> None:
    """Record one more weights file read by this start (known only once the distiller is built:
    an earlier stage's adapters) in meta.json, beside the others."""
    path = run_dir / "meta.json"
    meta = json.loads(path.read_text())
    files = [f for f in meta.get("weight_files", []) if f != entry] + [entry]
    meta["weight_files"] = files
    if meta.get("starts"):
        meta["starts"][-1]["weight_files"] = files
    atomic_write_json(path, meta)

