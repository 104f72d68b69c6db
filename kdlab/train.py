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
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import Config
from .data import load_dataset
from .device import describe_device, resolve_bf16, resolve_device
from .distributed import SINGLE, context_from_env
from .errors import ConfigError, RunError, warn
from .models import build_model, check_model, count_parameters
from .runs import (
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    load_weights,
    remove_stale_temporaries,
    torch_load,
)
from .training.distill import LogitDistiller, open_teacher_source
from .training.checks import check_memory, check_processes, check_teacher_source
from .training.metrics import MetricsLog
from .training.optim import make_ema, param_groups, scheduler_for
from .training.probes import MutualInformationProbe
from .training.rundir import claim_run_dir, load_checkpoint, remove_created, restore, threads_for_resume, write_meta
from .training.tasks import task_for
from .training.teachers import Teachers


def train(cfg: Config, *, progress: bool = True, stop_after_epoch: int | None = None,
          log=print, wait_for_lock: bool = False, stop_after_step: int | None = None) -> dict | None:
    """Train the run ``cfg`` describes; return its result dict.

    ``stop_after_epoch`` ends the call after that many epochs in total, as a kill would
    (checkpoint written, no result): the next call resumes. It returns None then.
    ``stop_after_step`` does the same at the first checkpoint within an epoch at or after
    that global step (``checkpoint_every_steps`` sets where they are).
    ``wait_for_lock``: when another process trains this run, wait for it (and then
    return its result) instead of failing.
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
    check_teacher_source(cfg, data)
    check_processes(cfg, data, ctx, device)
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
                             stop_after_step, ctx)
    except BaseException:
        # nothing to resume from: leave nothing behind (what this call created)
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


def _tensorboard_writer(cfg: Config, run_dir: Path, purge_step: int):
    """A SummaryWriter on RUN_DIR/tensorboard, or None (off, or the package missing).
    ``purge_step``: a resumed run's TensorBoard drops what the killed process logged after
    the checkpoint it resumes from."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step if purge_step > 0 else None)


def _scalar_tag(key: str) -> str:
    """metrics.jsonl keys -> TensorBoard tags: val_acc -> val/acc, ema_test_acc -> ema_test/acc."""
    for prefix in ("ema_val_", "ema_test_", "train_", "val_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return {"lr": "train/lr", "images_per_s": "speed/images_per_s", "tokens_per_s": "speed/tokens_per_s",
            "epoch_time_s": "speed/epoch_time_s"}.get(key, f"other/{key}")


def _process_meta(ctx, device: torch.device) -> dict:
    """world_size, backend and every rank's device (a collective in multi-process runs)."""
    if not ctx.active:
        return {"world_size": 1}
    devices = [None] * ctx.world
    torch.distributed.all_gather_object(devices, describe_device(device))
    return {"world_size": ctx.world, "backend": ctx.backend, "devices": devices}


def _sum_over_ranks(ctx, device, loss_sum, correct, seen: int, skipped: int):
    """The epoch's running sums over every rank (unchanged in one process)."""
    if not ctx.active:
        return loss_sum, correct, seen, skipped
    loss_sum, correct = ctx.all_reduce_(loss_sum.clone()), ctx.all_reduce_(correct.clone())
    counts = ctx.all_reduce_(torch.tensor([seen, skipped], dtype=torch.int64, device=device))
    return loss_sum, correct, int(counts[0]), int(counts[1])


def _zero_parts(names, device) -> dict:
    """An epoch's running sums of the loss parts (float64 on the device: no sync per step)."""
    return {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}


def _sum_parts_over_ranks(ctx, part_sums: dict) -> dict:
    """The loss parts' running sums over every rank (unchanged in one process)."""
    if not ctx.active:
        return part_sums
    return {name: ctx.all_reduce_(value.clone()) for name, value in part_sums.items()}


def _checkpoint_cadence(cfg: Config, data) -> tuple[int | None, float | None]:
    """(every N steps, every S seconds) of checkpoints within an epoch (epoch ends always).
    Default: none for in-memory data (an epoch is short), every 5 minutes for streamed data
    and translation."""
    if cfg.checkpoint_every_steps is None and cfg.checkpoint_every_minutes is None:
        return None, (300.0 if data.streamed or data.tokens else None)
    minutes = cfg.checkpoint_every_minutes
    return cfg.checkpoint_every_steps, (minutes * 60 if minutes else None)


def _rank_rng(ctx, device) -> list | None:
    """Every process's torch RNG states (CPU, CUDA) in rank order (a collective), so a
    resumed multi-process run draws the dropout masks an uninterrupted one would; None in
    one process (the checkpoint's own states are the process's)."""
    if not ctx.active:
        return None
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    states = [None] * ctx.world
    torch.distributed.all_gather_object(states, mine)
    return states


def _checkpoint(epochs_done: int, model, optimizer, scheduler, generator, device, ema=None, step_in_epoch: int = 0,
                epoch_generator=None, partial=None, rank_rng=None) -> dict:
    """What a resume needs. Within an epoch (``step_in_epoch`` > 0) also the generator as
    the epoch began (the batches done are drawn again and skipped) and the epoch's sums."""
    state = {"epoch": epochs_done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if ema is not None:
        state["ema"] = ema.state_dict()
    if rank_rng is not None:
        state["rank_rng"] = rank_rng
    if step_in_epoch:
        state.update(step_in_epoch=step_in_epoch, epoch_generator=epoch_generator, partial=partial)
    return state


def _train_locked(cfg, run_dir, device, data, teachers, probe, progress, stop_after_epoch, log, closers,
                  stop_after_step=None, ctx=SINGLE):
    """The loop, for every rank of a multi-process run (``ctx``); rank 0 alone writes."""
    on_cuda = device.type == "cuda"
    bf16 = resolve_bf16(cfg, device)
    if on_cuda:  # (torch.manual_seed above seeds the CUDA generators too)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if ctx.main:
        removed = remove_stale_temporaries(run_dir)
        if removed:
            warn(f"{run_dir}: removed {len(removed)} temporary file(s) of an interrupted write")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    checkpoint_path = run_dir / "checkpoint.pt"
    # rank 0 checks the checkpoint (and sets aside a corrupt one) before the others read it
    state, has_state = ctx.rank0_decides(lambda: load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None,
                                         share=lambda loaded: loaded is not None)
    if not ctx.main and has_state:
        state = torch_load(checkpoint_path)
    if state is not None:
        threads_for_resume(cfg, state.get("torch_threads"), log)
    start_epoch = state["epoch"] if state is not None else 0
    processes = {**_process_meta(ctx, device), "bf16": bf16}  # (a collective: every rank)
    if ctx.main:
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        weight_files = list(teachers.weight_files) if teachers is not None else []
        if cfg.model.pretrained_path:
            path = Path(cfg.model.pretrained_path)
            weight_files.insert(0, {"model.pretrained_path": str(path.resolve()), "sha256": file_sha256(path)})
        write_meta(run_dir, device, start_epoch, weight_files, **processes)
    log(f"{run_dir}: training on {describe_device(device)}"
        + (f" × {ctx.world} processes ({ctx.backend})" if ctx.active else ""))
    if len(data.noisy_indices) and ctx.main:
        atomic_save_npz(run_dir / "label_noise.npz", flipped_indices=data.noisy_indices,
                        clean_labels=data.clean_train_y.numpy(), noisy_labels=data.train_y.numpy())

    model = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
    if cfg.model.pretrained_path:
        load_weights(model, Path(cfg.model.pretrained_path), "model.pretrained_path")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.active and cfg.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt_cfg, loss_cfg = cfg.optim, cfg.loss
    groups = param_groups(model, opt_cfg.weight_decay, opt_cfg.decay_bn_bias)
    if opt_cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps)
    else:
        optimizer = torch.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                                    nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0)
    scheduler = scheduler_for(optimizer, opt_cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    ema = make_ema(model, opt_cfg.ema_decay) if opt_cfg.ema_decay else None
    if state is not None:
        restore(state, checkpoint_path, model, optimizer, scheduler, generator, device, ema, ctx)
        if state.get("step_in_epoch"):
            log(f"{run_dir}: resuming in epoch {start_epoch + 1} after step {state['step_in_epoch']}")
        else:
            log(f"{run_dir}: resuming after epoch {start_epoch}")
    distiller = LogitDistiller(model, open_teacher_source(cfg, data, teachers, ctx, bf16, log, progress), loss_cfg,
                               device.type, bf16)
    part_names = distiller.part_names
    # DDP wraps what the distiller trains (the student; teachers stay frozen and unwrapped);
    # `model` is the student itself for evaluation, EMA and saving
    train_model = distiller.module
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(distiller.module, device_ids=[device.index] if on_cuda else None)
        if state is None and not ctx.main:  # dropout: each process its own stream (rank 0 keeps the seed's)
            torch.manual_seed((cfg.seed + 1) * 1_000_003 + ctx.rank)
    resume_step = state.get("step_in_epoch", 0) if state is not None else 0
    metrics = MetricsLog(run_dir / "metrics.jsonl", ctx.main)
    steps_per_epoch = data.steps_per_epoch(opt_cfg.batch_size)
    accumulate = opt_cfg.accumulate
    opt_steps = math.ceil(steps_per_epoch / accumulate)  # optimizer steps an epoch
    resumed_at = start_epoch * opt_steps + resume_step // accumulate  # global (optimizer) steps done
    previous = metrics.resume(start_epoch, resumed_at)
    task = task_for(cfg, data, teachers, ctx, bf16)  # classification or translation: evaluation and finishing
    warmup_steps = opt_cfg.warmup_steps or opt_cfg.warmup_epochs * opt_steps
    inverse_sqrt = opt_cfg.schedule == "inverse_sqrt"
    writer = _tensorboard_writer(cfg, run_dir, resumed_at + 1) if ctx.main else None
    every_steps, every_s = _checkpoint_cadence(cfg, data)
    last_saved = time.monotonic()
    if writer is not None:
        closers.append(writer)
    params = list(model.parameters())
    batch_size = opt_cfg.batch_size
    can_skip = data.streamed and cfg.data.on_bad_image == "skip"  # batches may lose unreadable images
    done_epochs = [m for m in previous if "train_loss" in m and m["epoch"] <= start_epoch]
    train_time = sum(m["epoch_time_s"] for m in done_epochs)

    bar = tqdm(range(start_epoch, opt_cfg.epochs), desc=run_dir.name, disable=not progress, leave=False,
               initial=start_epoch, total=opt_cfg.epochs, unit="ep", dynamic_ncols=True)
    record = done_epochs[-1] if done_epochs else {}
    for epoch in bar:
        model.train()
        started = time.perf_counter()
        first = resume_step if epoch == start_epoch else 0
        if first:  # within an epoch: the generator as the epoch began, the sums as they were
            partial = state["partial"]
            epoch_generator = state["epoch_generator"]
            generator.set_state(epoch_generator)
            elapsed, epoch_lrs = partial["elapsed"], partial["lrs"]
            part_sums = _zero_parts(part_names, device)
            if ctx.main:  # (the checkpoint holds the sums over all ranks: rank 0 carries them)
                loss_sum, correct = partial["loss_sum"].to(device), partial["correct"].to(device)
                seen, skipped = partial["seen"], partial["skipped"]
                for name, value in partial.get("parts", {}).items():
                    part_sums[name] = value.to(device)
            else:
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                seen, skipped = 0, 0
            parts_known = "parts" in partial  # (a checkpoint of an older kdlab has no parts: not reported)
        else:
            epoch_generator = generator.get_state()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen, skipped, elapsed = 0, 0, 0.0
            part_sums, parts_known = _zero_parts(part_names, device), True
            epoch_lrs = [group["lr"] for group in optimizer.param_groups]  # the schedule's lr of this epoch
        # the data order and each sample's view come from the checkpointed generator (drawn
        # on the CPU); in-memory data is augmented on the device, streamed data by the loader.
        # A resumed epoch draws the batches done again (cheap: numbers only) and skips them.
        where = {"start_batch": first, "ctx": ctx}  # (each rank: its slice of every global batch)
        store = distiller.source.crop_store
        batches = data.epoch_batches(generator, batch_size, device, store, **where) if store \
            else data.epoch_batches(generator, batch_size, device, **where)
        for step_in_epoch, (raw, y, index, views, bad) in enumerate(batches, start=first):
            skipped += bad
            if raw is None:  # every image of the batch unreadable (data.on_bad_image=skip)
                if ctx.active:  # the other ranks wait in this step's gradient all-reduce
                    raise RunError(f"rank {ctx.rank}: every image of its part of batch {step_in_epoch + 1} is "
                                   "unreadable (data.on_bad_image=skip cannot skip a whole part in a multi-process "
                                   "run): remove the files or use larger batches")
                continue
            seen += len(index)
            y = y.to(device, non_blocking=True)
            # optim.accumulate batches make one optimizer step (the epoch's last group may be shorter)
            group_start = step_in_epoch - step_in_epoch % accumulate
            last_micro = step_in_epoch + 1 == min(group_start + accumulate, steps_per_epoch)
            if step_in_epoch == group_start:
                optimizer.zero_grad(set_to_none=True)
            # DDP: the gradients of a group's first parts stay local (all-reduced once, with the last)
            local = train_model.no_sync() if ctx.active and not last_micro else contextlib.nullcontext()
            with local:
                x = data.inputs(raw, cfg.channels_last)
                loss, logits, parts = distiller(data, train_model, x, y, index, views)
                if ctx.active or accumulate > 1:  # weigh each part's mean by its rows: the step's gradient is
                    if can_skip:  # the mean over all its rows (DDP averages over ranks); over ranks: a collective
                        rows = ctx.all_reduce_(torch.tensor(float(len(index)), device=device))
                    else:
                        group_end = min(group_start + accumulate, steps_per_epoch)
                        rows = sum(data.global_rows(s, batch_size) for s in range(group_start, group_end))
                    (loss * (len(index) * ctx.world / rows)).backward()
                else:
                    loss.backward()
            loss_sum += loss.detach().double() * len(index)
            for name, part in parts.items():
                part_sums[name] += part.detach().double() * len(index)
            correct += (logits.detach().argmax(1) == y).sum()
            if not last_micro:
                continue
            if opt_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
            step = epoch * opt_steps + step_in_epoch // accumulate + 1  # optimizer steps
            if inverse_sqrt:  # Vaswani et al.: linear warm-up, then ∝ 1/sqrt(step); peak lr at warm-up
                for group, base in zip(optimizer.param_groups, epoch_lrs):
                    group["lr"] = base * min(step / warmup_steps, math.sqrt(warmup_steps / step))
            elif step <= warmup_steps:  # linear warm-up (Goyal et al. 2017): lr · step / warm-up steps
                for group, base in zip(optimizer.param_groups, epoch_lrs):
                    group["lr"] = base * step / warmup_steps
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            if writer is not None and step % 50 == 0:  # (one device sync every 50 steps)
                writer.add_scalar("train/loss_step", loss.item(), step)
            if probe is not None and step % cfg.mutual_information.every_steps == 0:
                metrics.write({"epoch": epoch + 1, "step": step, "mutual_information": probe(model)})
            due = False
            if step_in_epoch + 1 < steps_per_epoch:  # (at the end of an accumulation group only)
                if every_steps and step % every_steps == 0:
                    due = True
                elif every_s and not ctx.active:
                    due = time.monotonic() - last_saved >= every_s
                elif every_s and step % 20 == 0:  # rank 0's clock decides for all (one broadcast per 20 steps)
                    due = ctx.broadcast(time.monotonic() - last_saved >= every_s)
            if due:
                sums = _sum_over_ranks(ctx, device, loss_sum, correct, seen, skipped)
                partial = {"loss_sum": sums[0].cpu(), "correct": sums[1].cpu(), "seen": sums[2], "skipped": sums[3],
                           "elapsed": elapsed + time.perf_counter() - started, "lrs": epoch_lrs,
                           "parts": {k: v.cpu() for k, v in _sum_parts_over_ranks(ctx, part_sums).items()}}
                rank_rng = _rank_rng(ctx, device)
                if ctx.main:
                    atomic_torch_save(_checkpoint(epoch, model, optimizer, scheduler, generator, device, ema,
                                                  step_in_epoch + 1, epoch_generator, partial, rank_rng),
                                      checkpoint_path)
                last_saved = time.monotonic()
                if stop_after_step is not None and step >= stop_after_step:
                    bar.close()
                    return None
        last_lr = optimizer.param_groups[0]["lr"]  # of the epoch's last step
        for group, base in zip(optimizer.param_groups, epoch_lrs):
            group["lr"] = base  # (after warm-up steps) the schedule goes on from its own value
        lr = last_lr if inverse_sqrt else optimizer.param_groups[0]["lr"]
        scheduler.step()
        if on_cuda:
            torch.cuda.synchronize(device)  # the epoch's kernels are queued, not finished
        loss_sum, correct, seen, skipped = _sum_over_ranks(ctx, device, loss_sum, correct, seen, skipped)
        part_sums = _sum_parts_over_ranks(ctx, part_sums)
        epoch_time = elapsed + time.perf_counter() - started
        train_time += epoch_time
        train_loss = (loss_sum / max(seen, 1)).item()
        if not math.isfinite(train_loss):
            kept = (f"epoch {epoch} is checkpointed: the run resumes from it" if epoch > 0 else
                    "no epoch finished, so nothing was kept")
            raise RunError(f"{run_dir}: training loss became {train_loss} in epoch {epoch + 1} "
                           f"(lower optim.lr or set optim.grad_clip; {kept})")
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": correct.item() / max(seen, 1),
                  "epoch_time_s": epoch_time, task.speed_key: seen / epoch_time}
        if parts_known:  # the loss's named parts (weighted: they sum to train_loss)
            record.update({f"train_{name}": (value / max(seen, 1)).item() for name, value in part_sums.items()})
        if skipped:
            record["skipped_images"] = skipped
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == opt_cfg.epochs:
            record.update(task.evaluate(model, ema))
        metrics.write(record)
        if writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(_scalar_tag(key), value, (epoch + 1) * opt_steps)
            writer.flush()
        rank_rng = _rank_rng(ctx, device)
        if ctx.main:
            atomic_torch_save(_checkpoint(epoch + 1, model, optimizer, scheduler, generator, device, ema,
                                          rank_rng=rank_rng), checkpoint_path)
        last_saved = time.monotonic()
        bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{record.get('test_acc', float('nan')):.3f}",
                        **{task.bar_key: f"{record[task.speed_key]:.0f}"})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < opt_cfg.epochs:
            bar.close()
            distiller.finish(ctx.main)
            return None
    bar.close()
    distiller.finish(ctx.main)

    extra_result = task.finish(run_dir, model, progress, log)
    result = {
        "run_dir": str(run_dir), "name": cfg.name, "hash": cfg.run_hash(), "device": describe_device(device),
        "device_type": device.type, "torch_threads": torch.get_num_threads(),
        "model": cfg.model.name,
        "dataset": cfg.data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "num_params": count_parameters(model), "epochs": opt_cfg.epochs, "train_time_s": train_time,
        **task.speed(opt_cfg.epochs, train_time),
        "final": {k: v for k, v in record.items() if k.startswith(("val_", "test_", "train_", "ema_"))},
    }
    result["final"].update(task.final_extra(extra_result))
    result.update(extra_result)
    result.update(processes)
    if ctx.main:
        atomic_torch_save(model.state_dict(), run_dir / "model.pt")
        if ema is not None:
            atomic_torch_save(ema.module.state_dict(), run_dir / "model_ema.pt")
        atomic_write_json(run_dir / "result.json", result)
        checkpoint_path.unlink(missing_ok=True)
    return result
