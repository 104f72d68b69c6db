"""The one training loop: teacher or student, CE / LS / KL / MSE, resumable.

``train(cfg)`` resolves everything that can fail on bad input (data, teachers, whether
the model fits the data, the memory the run will need, a writable out_dir) *before* it
creates the run dir, then trains with SGD, checkpointing atomically every epoch. The
run dir belongs to one process (an flock on ``.lock``): a second process on the same
config gets a one-line error naming the holder, or waits (sweeps). Starting the same
config again resumes from the last checkpoint, or returns the stored result when the
run has finished. Data order and augmentation come from one seeded ``torch.Generator``
whose state is checkpointed, and the torch thread count is recorded and kept on resume,
so a resumed run ends with exactly the metrics of an uninterrupted one.

Repairs on start: stale temporary files of killed writes are removed, a partial last
line of ``metrics.jsonl`` is dropped (with a warning), and a corrupt ``checkpoint.pt``
is moved aside to ``checkpoint.pt.corrupt`` with an error that says how to go on. A run
that fails before its first checkpoint leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import Config
from .data import load_dataset
from .device import describe_device, resolve_bf16, resolve_device
from .distributed import SINGLE, context_from_env
from .errors import ConfigError, warn
from .models import build_model, check_model, count_parameters
from .runs import (
    atomic_save_npz,
    atomic_write_text,
    file_sha256,
    load_weights,
    remove_stale_temporaries,
    torch_load,
)
from .training.checks import check_init_run, check_memory, check_processes, check_teacher_source
from .loggers import check_loggers
from .training.distill import open_teacher_source
from .training.loop import Loop
from .training.methods import build_distiller, check_distiller, start_adapters
from .training.probes import MutualInformationProbe
from .training.rundir import (add_weight_file, claim_run_dir, load_checkpoint, remove_created, threads_for_resume,
                              write_meta)
from .training.state import build_state, build_student
from .training.teachers import Teachers


def train(cfg: Config, *, progress: bool = True, stop_after_epoch: int | None = None,
          log=print, wait_for_lock: bool = False, stop_after_step: int | None = None, epoch_log=None) -> dict | None:
    """Train the run ``cfg`` describes; return its result dict.

    ``stop_after_epoch`` ends the call after that many epochs in total, as a kill would
    (checkpoint written, no result): the next call resumes. It returns None then.
    ``stop_after_step`` does the same at the first checkpoint within an epoch at or after
    that global step (``checkpoint_every_steps`` sets where they are).
    ``wait_for_lock``: when another process trains this run, wait for it (and then
    return its result) instead of failing. ``epoch_log``: a callable given one line per epoch
    (loss, training accuracy, the latest evaluation and the epoch it was taken at, speed):
    what `kdlab train --no-progress` prints instead of the bar.
    """
    ctx = context_from_env(cfg.device)
    if not ctx.main:  # rank 0 speaks for the run
        log, progress = (lambda *a, **k: None), False
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, ctx)
    data = load_dataset(cfg.data)
    teachers = Teachers(cfg.teacher, data, cfg.channels_last, device) if cfg.teacher else None
    try:
        if data.tokens:  # a translation model (the config checked the pairing)
            with torch.device("meta"):
                num_params = count_parameters(build_model(cfg.model.name, data.num_classes, input_shape=()))
        else:
            num_params = check_model(cfg.model.name, data.num_classes, data.input_shape)
    except ValueError as err:
        raise ConfigError(f"config key 'model.name': {err} (data {cfg.data.name} gives inputs of shape "
                          f"{tuple(data.input_shape)})") from None
    if cfg.model.pretrained_path:  # every key and shape checked now, before the run dir exists
        with torch.device("meta"):
            shapes = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
        load_weights(shapes, Path(cfg.model.pretrained_path), "model.pretrained_path", assign=True)
    if cfg.model.init_run:
        check_init_run(cfg, data)
        with torch.device("meta"):
            shapes = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
        load_weights(shapes, Path(cfg.model.init_run) / "model.pt", "model.init_run", assign=True)
    check_teacher_source(cfg, data)
    if teachers is not None:
        check_distiller(cfg, data, teachers)
    check_processes(cfg, data, ctx, device)
    if ctx.main:
        check_loggers(cfg)
    check_memory(cfg, data, num_params, device)
    probe = MutualInformationProbe(cfg, data, resolve_bf16(cfg, device)) \
        if cfg.mutual_information.every_steps and ctx.main else None

    run_dir = cfg.run_dir()
    threads_before = torch.get_num_threads()
    closers = []  # what the loop opened (the TensorBoard writer): closed however it ends
    lock = created = None
    try:
        claim, finished = ctx.rank0_decides(lambda: claim_run_dir(cfg, run_dir, wait_for_lock, log),
                                            share=lambda claimed: claimed[0])
        if claim is not None:
            _, lock, created = claim
        if finished is not None:
            log(f"{run_dir}: finished already, nothing to do")
            decoded = finished.get("decode")
            if data.tokens and decoded is not None and decoded != cfg.decode.model_dump(mode="json"):
                warn(f"{run_dir} was decoded with other settings ({decoded}); decoding is not part of the run: "
                     f"`kdlab translate {run_dir} --beam N ...` decodes it again without training")
            return finished
        return _train_locked(cfg, run_dir, device, data, teachers, probe, progress, stop_after_epoch, log, closers,
                             stop_after_step, ctx, epoch_log if ctx.main else None)
    except BaseException:
        # writers closed first (TensorBoard's flushes into the run dir: closing it after the
        # dir is gone would raise instead of the error that stopped the run), then nothing to
        # resume from: leave nothing behind (what this call created)
        for closer in closers:
            with contextlib.suppress(Exception):
                closer.close()
        closers.clear()
        if ctx.main and lock is not None and not (run_dir / "checkpoint.pt").exists() \
                and not (run_dir / "result.json").exists():
            remove_created(run_dir, created)
        raise
    finally:
        for closer in closers:
            closer.close()
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads_before)
        if data.streamed:
            data.close()  # the loader's worker processes


def _process_meta(ctx, device: torch.device) -> dict:
    """world_size, backend and every rank's device (a collective in multi-process runs)."""
    if not ctx.active:
        return {"world_size": 1}
    devices = [None] * ctx.world
    torch.distributed.all_gather_object(devices, describe_device(device))
    return {"world_size": ctx.world, "backend": ctx.backend, "devices": devices}


def _prepare(cfg, run_dir, device, data, teachers, ctx, log):
    """Before the loop: stale temporaries removed, threads set, the checkpoint read (rank 0
    checks it, and sets aside a corrupt one, before the others read it), config.yaml,
    meta.json and label_noise.npz written. Returns (checkpoint or None, processes)."""
    if device.type == "cuda":  # (torch.manual_seed above seeds the CUDA generators too)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if ctx.main:
        removed = remove_stale_temporaries(run_dir)
        if removed:
            warn(f"{run_dir}: removed {len(removed)} temporary file(s) of an interrupted write")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    checkpoint_path = run_dir / "checkpoint.pt"
    state, has_state = ctx.rank0_decides(lambda: load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None,
                                         share=lambda loaded: loaded is not None)
    if not ctx.main and has_state:
        state = torch_load(checkpoint_path)
    if state is not None:
        threads_for_resume(cfg, state.get("torch_threads"), log)
    start_epoch = state["epoch"] if state is not None else 0
    processes = {**_process_meta(ctx, device), "bf16": resolve_bf16(cfg, device)}  # (a collective: every rank)
    if ctx.main:
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        weight_files = list(teachers.weight_files) if teachers is not None else []
        if cfg.model.pretrained_path:
            path = Path(cfg.model.pretrained_path)
            weight_files.insert(0, {"model.pretrained_path": str(path.resolve()), "sha256": file_sha256(path)})
        if cfg.model.init_run:
            path = Path(cfg.model.init_run) / "model.pt"
            weight_files.insert(0, {"model.init_run": str(path.resolve()), "sha256": file_sha256(path)})
        write_meta(run_dir, device, start_epoch, weight_files, **processes)
    log(f"{run_dir}: training on {describe_device(device)}"
        + (f" × {ctx.world} processes ({ctx.backend})" if ctx.active else ""))
    if len(data.noisy_indices) and ctx.main:
        atomic_save_npz(run_dir / "label_noise.npz", flipped_indices=data.noisy_indices,
                        clean_labels=data.clean_train_y.numpy(), noisy_labels=data.train_y.numpy())
    return state, processes


def _train_locked(cfg, run_dir, device, data, teachers, probe, progress, stop_after_epoch, log, closers,
                  stop_after_step=None, ctx=SINGLE, epoch_log=None):
    """Set up the run's state and distiller, then the loop, for every rank of a
    multi-process run (``ctx``); rank 0 alone writes."""
    checkpoint, processes = _prepare(cfg, run_dir, device, data, teachers, ctx, log)
    bf16 = processes["bf16"]
    student = build_student(cfg, data, device, ctx)
    distiller = build_distiller(cfg, data, student, teachers, device, bf16)  # (its adapters join the optimizer)
    if cfg.model.init_run:
        read = start_adapters(distiller, Path(cfg.model.init_run), log)
        if read is not None and ctx.main:  # (meta.json names every weights file a start reads)
            add_weight_file(run_dir, {"model.init_run adapters": str(read.resolve()), "sha256": file_sha256(read)})
    state = build_state(cfg, student, distiller, device)
    if checkpoint is not None:
        state.restore(checkpoint, run_dir / "checkpoint.pt", ctx)
        if checkpoint.get("step_in_epoch"):
            log(f"{run_dir}: resuming in epoch {checkpoint['epoch'] + 1} after step {checkpoint['step_in_epoch']}")
        else:
            log(f"{run_dir}: resuming after epoch {checkpoint['epoch']}")
    distiller.source = open_teacher_source(cfg, data, teachers, ctx, bf16, log, progress)
    # DDP wraps what the distiller trains (the student; teachers stay frozen and unwrapped);
    # `state.model` is the student itself for evaluation, EMA and saving
    train_module = distiller.module
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(distiller.module, device_ids=[device.index] if device.type == "cuda"
                                               else None, find_unused_parameters=distiller.unused_parameters)
        if checkpoint is None and not ctx.main:  # dropout: each process its own stream (rank 0 keeps the seed's)
            torch.manual_seed((cfg.seed + 1) * 1_000_003 + ctx.rank)
    loop = Loop(cfg, run_dir, data, state, distiller, train_module, teachers, ctx, checkpoint, probe, bf16, processes,
                closers, log)
    loop.epoch_log = epoch_log
    return loop.fit(progress, stop_after_epoch, stop_after_step)
