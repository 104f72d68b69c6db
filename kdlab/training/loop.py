"""The training loop, as short functions: :meth:`Loop.fit` runs the epochs,
:meth:`Loop.epoch` one epoch's batches, :meth:`Loop.micro_batch` one batch's forward and
backward through the distiller, :meth:`Loop.optimizer_step` one optimizer step (after
``optim.accumulate`` batches), :meth:`Loop.end_of_epoch` the epoch's metrics, evaluation
and checkpoint, and :meth:`Loop.finish` the run's final outputs. After every optimizer
step the loop calls a plain list of hooks (:attr:`Loop.after_step`): the TensorBoard step
loss, the mutual-information probe, the checkpoint within an epoch.

The loop never asks what kind of data, teacher or task it has: the data's batch protocol
(``epoch_batches``, ``inputs``, ``global_rows``, ``steps_per_epoch``), the distiller and
the task answer for them. Every rank of a multi-process run runs it; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..device import describe_device
from ..errors import RunError
from ..models import count_parameters
from ..loggers import Trackers
from ..runs import atomic_torch_save, atomic_write_json
from .metrics import MetricsLog
from .state import rank_rng
from .tasks import task_for


class EpochSums:
    """An epoch's running sums — loss, its named parts, correct rows — on the device (no
    sync per step), and rows seen and images skipped."""

    def __init__(self, device, part_names):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.parts = {name: torch.zeros((), dtype=torch.float64, device=device) for name in part_names}
        self.seen = self.skipped = 0
        self.parts_known = True

    @classmethod
    def resumed(cls, partial: dict, device, part_names, main: bool) -> "EpochSums":
        """The sums a mid-epoch checkpoint holds (over all ranks: rank 0 carries them). A
        checkpoint of an older kdlab has no loss parts: that epoch reports none."""
        sums = cls(device, part_names)
        if main:
            sums.loss, sums.correct = partial["loss_sum"].to(device), partial["correct"].to(device)
            sums.seen, sums.skipped = partial["seen"], partial["skipped"]
            for name, value in partial.get("parts", {}).items():
                sums.parts[name] = value.to(device)
        sums.parts_known = "parts" in partial
        return sums

    def add(self, loss, logits, y, parts: dict, rows: int) -> None:
        self.loss += loss.detach().double() * rows
        for name, part in parts.items():
            self.parts[name] += part.detach().double() * rows
        self.correct += (logits.detach().argmax(1) == y).sum()

    def over_ranks(self, ctx, device) -> "EpochSums":
        """The sums over every rank (a collective; this object itself in one process)."""
        if not ctx.active:
            return self
        total = EpochSums(device, ())
        total.loss, total.correct = ctx.all_reduce_(self.loss.clone()), ctx.all_reduce_(self.correct.clone())
        counts = ctx.all_reduce_(torch.tensor([self.seen, self.skipped], dtype=torch.int64, device=device))
        total.seen, total.skipped = int(counts[0]), int(counts[1])
        total.parts = {name: ctx.all_reduce_(value.clone()) for name, value in self.parts.items()}
        total.parts_known = self.parts_known
        return total

    def partial(self, elapsed: float, lrs: list) -> dict:
        """The checkpoint's record of these (already summed over ranks) sums."""
        return {"loss_sum": self.loss.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "skipped": self.skipped, "elapsed": elapsed, "lrs": lrs,
                "parts": {k: v.cpu() for k, v in self.parts.items()}}


@dataclass
class EpochProgress:
    """One epoch as it goes: what a mid-epoch checkpoint and the hooks need."""
    epoch: int
    generator_state: torch.Tensor  # the data generator as the epoch began
    sums: EpochSums
    lrs: list  # the schedule's lr of this epoch (warm-up scales it per step)
    elapsed: float = 0.0  # seconds of this epoch before this process resumed it
    started: float = field(default_factory=time.perf_counter)
    step_in_epoch: int = 0  # the batch of the last optimizer step

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started


class Stop(Exception):
    """A hook ends the call within an epoch (``stop_after_step``): checkpoint written, no result."""


class Loop:
    def __init__(self, cfg, run_dir, data, state, distiller, train_module, teachers, ctx, checkpoint: dict | None,
                 probe, bf16: bool, processes: dict, closers: list, log):
        """``train_module``: the distiller's module or its DDP wrapper; ``checkpoint``: the
        state resumed from (None: a fresh start); ``processes``: world size, backend,
        devices and precision for result.json; ``closers``: what the loop opens (the
        TensorBoard writer, the W&B/MLflow trackers) is appended, for the caller to close however the run ends."""
        self.cfg, self.run_dir, self.data, self.state, self.ctx = cfg, run_dir, data, state, ctx
        self.distiller, self.train_module, self.processes, self.log = distiller, train_module, processes, log
        self.epoch_log = None  # a callable for one line per epoch (`kdlab train --no-progress`)
        self.last_eval: dict = {}  # metric -> (value, epoch) of the latest evaluation, for the bar
        opt = cfg.optim
        self.steps_per_epoch = data.steps_per_epoch(opt.batch_size)
        self.accumulate = opt.accumulate
        self.opt_steps = math.ceil(self.steps_per_epoch / self.accumulate)  # optimizer steps an epoch
        self.checkpoint_state = checkpoint
        self.start_epoch = checkpoint["epoch"] if checkpoint is not None else 0
        self.resume_step = checkpoint.get("step_in_epoch", 0) if checkpoint is not None else 0
        self.resumed_at = self.start_epoch * self.opt_steps + self.resume_step // self.accumulate  # steps done
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", ctx.main)
        previous = self.metrics.resume(self.start_epoch, self.resumed_at)
        self.task = task_for(cfg, data, teachers, ctx, bf16)  # classification or translation
        self.warmup_steps = opt.warmup_steps or opt.warmup_epochs * self.opt_steps
        self.writer = _tensorboard_writer(cfg, run_dir, self.resumed_at + 1) if ctx.main else None
        if self.writer is not None:
            closers.append(self.writer)
        self.trackers = Trackers(cfg, run_dir, ctx.main, resumed=checkpoint is not None)  # W&B, MLflow: if asked
        closers.append(self.trackers)
        self.every_steps, self.every_s = _checkpoint_cadence(cfg, data)
        self.last_saved = time.monotonic()
        self.params = list(distiller.module.parameters())  # (clipped together: the student and its adapters)
        self.can_skip = data.streamed and cfg.data.on_bad_image == "skip"  # batches may lose unreadable images
        done = [m for m in previous if "train_loss" in m and m["epoch"] <= self.start_epoch]
        self.train_time = sum(m["epoch_time_s"] for m in done)
        self.record = done[-1] if done else {}
        self.after_step = [self._log_step_loss] if self.writer is not None else []
        if probe is not None:
            self.after_step.append(lambda progress, step, loss: self._probe(probe, progress, step))
        self.after_step.append(self._checkpoint_within_epoch)
        self.stop_after_step = None

    # -- the epochs ------------------------------------------------------------------------
    def fit(self, progress: bool, stop_after_epoch: int | None, stop_after_step: int | None) -> dict | None:
        """Train the remaining epochs, then finish; None when stopped early (resumable)."""
        self.stop_after_step = stop_after_step
        epochs = self.cfg.optim.epochs
        bar = tqdm(range(self.start_epoch, epochs), desc=self.run_dir.name, disable=not progress, leave=False,
                   initial=self.start_epoch, total=epochs, unit="ep", dynamic_ncols=True)
        with contextlib.closing(bar):
            for epoch in bar:
                try:
                    progress_ = self.epoch(epoch)
                except Stop:
                    self.trackers.stopped()
                    return None
                self.end_of_epoch(progress_)
                shown = self._epoch_summary(epoch + 1)
                bar.set_postfix(shown, refresh=False)
                if self.epoch_log is not None:  # (a batch job without the bar: a line per epoch)
                    self.epoch_log(f"{self.run_dir.name} epoch {epoch + 1}/{epochs}: "
                                   + ", ".join(f"{k} {v}" for k, v in shown.items()))
                if stop_after_epoch is not None and stop_after_epoch <= epoch + 1 < epochs:
                    self.distiller.finish(self.ctx.main)
                    self.trackers.stopped()
                    return None
        self.distiller.finish(self.ctx.main)
        return self.finish(progress)

    def _epoch_summary(self, epoch: int) -> dict:
        """What the bar (and a line per epoch) shows: the epoch's loss and training accuracy, the
        latest evaluation — validation accuracy when the run has a validation split, else test
        accuracy — with the epoch it was taken at (most epochs are not evaluated), and speed."""
        record = self.record
        for key in ("val_acc", "test_acc"):
            if key in record:
                self.last_eval[key] = (record[key], epoch)
        shown = {"loss": f"{record['train_loss']:.3f}"}
        if "train_acc" in record:
            shown["train_acc"] = f"{record['train_acc']:.3f}"
        key = "val_acc" if "val_acc" in self.last_eval else "test_acc"
        if key in self.last_eval:
            value, at = self.last_eval[key]
            shown[key] = f"{value:.3f}" + (f" (epoch {at})" if at != epoch else "")
        shown[self.task.bar_key] = f"{record[self.task.speed_key]:.0f}"
        return shown

    def epoch(self, epoch: int) -> EpochProgress:
        """One epoch's batches (a resumed epoch draws the batches done again and skips them)."""
        self.state.model.train()
        first = self.resume_step if epoch == self.start_epoch else 0
        progress = self._begin_epoch(epoch, first)
        # the data order and each sample's view come from the checkpointed generator (drawn
        # on the CPU); in-memory data is augmented on the device, streamed data by the loader
        where = {"start_batch": first, "ctx": self.ctx}  # (each rank: its slice of every global batch)
        store, batch_size, device = self.distiller.source.crop_store, self.cfg.optim.batch_size, self.state.device
        batches = self.data.epoch_batches(self.state.generator, batch_size, device, store, **where) if store \
            else self.data.epoch_batches(self.state.generator, batch_size, device, **where)
        for step_in_epoch, (raw, y, index, views, bad) in enumerate(batches, start=first):
            progress.sums.skipped += bad
            if raw is None:  # every image of the batch unreadable (data.on_bad_image=skip)
                if self.ctx.active:  # the other ranks wait in this step's gradient all-reduce
                    raise RunError(f"rank {self.ctx.rank}: every image of its part of batch {step_in_epoch + 1} is "
                                   "unreadable (data.on_bad_image=skip cannot skip a whole part in a multi-process "
                                   "run): remove the files or use larger batches")
                continue
            loss = self.micro_batch(progress, step_in_epoch, raw, y, index, views)
            group_start = step_in_epoch - step_in_epoch % self.accumulate
            if step_in_epoch + 1 == min(group_start + self.accumulate, self.steps_per_epoch):  # a group's last
                step = self.optimizer_step(progress, step_in_epoch)
                progress.step_in_epoch = step_in_epoch
                for hook in self.after_step:
                    hook(progress, step, loss)
        return progress

    def _begin_epoch(self, epoch: int, first: int) -> EpochProgress:
        self.distiller.start_epoch(epoch)
        part_names = self.distiller.part_names
        if first:  # within an epoch: the generator as the epoch began, the sums as they were
            partial = self.checkpoint_state["partial"]
            generator_state = self.checkpoint_state["epoch_generator"]
            self.state.generator.set_state(generator_state)
            sums = EpochSums.resumed(partial, self.state.device, part_names, self.ctx.main)
            return EpochProgress(epoch, generator_state, sums, partial["lrs"], partial["elapsed"])
        return EpochProgress(epoch, self.state.generator.get_state(), EpochSums(self.state.device, part_names),
                             [group["lr"] for group in self.state.optimizer.param_groups])

    # -- one step ----------------------------------------------------------------------------
    def micro_batch(self, progress: EpochProgress, step_in_epoch: int, raw, y, index, views):
        """Forward and backward of one batch; optim.accumulate batches make one optimizer
        step (the epoch's last group may be shorter), whose gradient is the mean over all
        their rows (DDP averages over ranks; a group's first parts stay local)."""
        ctx, device, accumulate = self.ctx, self.state.device, self.accumulate
        rows = len(index)
        progress.sums.seen += rows
        y = y.to(device, non_blocking=True)
        group_start = step_in_epoch - step_in_epoch % accumulate
        group_end = min(group_start + accumulate, self.steps_per_epoch)
        if step_in_epoch == group_start:
            self.state.optimizer.zero_grad(set_to_none=True)
        local = self.train_module.no_sync() if ctx.active and step_in_epoch + 1 != group_end \
            else contextlib.nullcontext()
        with local:
            x = self.data.inputs(raw, self.cfg.channels_last)
            loss, logits, parts = self.distiller(self.data, self.train_module, x, y, index, views)
            if ctx.active or accumulate > 1:  # weigh each part's mean by its rows
                if self.can_skip:  # over ranks: a collective
                    total = ctx.all_reduce_(torch.tensor(float(rows), device=device))
                else:
                    total = sum(self.data.global_rows(s, self.cfg.optim.batch_size) for s in range(group_start, group_end))
                (loss * (rows * ctx.world / total)).backward()
            else:
                loss.backward()
        progress.sums.add(loss, logits, y, parts, rows)
        return loss

    def optimizer_step(self, progress: EpochProgress, step_in_epoch: int) -> int:
        """Gradient clipping, the step's lr (warm-up; inverse square root), the step, the
        EMA update; returns the global optimizer step."""
        opt, optimizer = self.cfg.optim, self.state.optimizer
        if opt.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, opt.grad_clip)
        step = progress.epoch * self.opt_steps + step_in_epoch // self.accumulate + 1
        warmup = self.warmup_steps
        if opt.schedule == "inverse_sqrt":  # Vaswani et al.: linear warm-up, then ∝ 1/sqrt(step)
            for group, base in zip(optimizer.param_groups, progress.lrs):
                group["lr"] = base * min(step / warmup, math.sqrt(warmup / step))
        elif step <= warmup:  # linear warm-up (Goyal et al. 2017): lr · step / warm-up steps
            for group, base in zip(optimizer.param_groups, progress.lrs):
                group["lr"] = base * step / warmup
        optimizer.step()
        if self.state.ema is not None:
            self.state.ema.update_parameters(self.state.model)
        return step

    # -- after a step: the hooks -------------------------------------------------------------
    def _log_step_loss(self, progress: EpochProgress, step: int, loss) -> None:
        if step % 50 == 0:  # (one device sync every 50 steps)
            self.writer.add_scalar("train/loss_step", loss.item(), step)

    def _probe(self, probe, progress: EpochProgress, step: int) -> None:
        if step % self.cfg.mutual_information.every_steps == 0:
            self.metrics.write({"epoch": progress.epoch + 1, "step": step, "mutual_information": probe(self.state.model)})

    def _checkpoint_within_epoch(self, progress: EpochProgress, step: int, loss) -> None:
        """A checkpoint inside the epoch when due (steps or minutes; rank 0's clock decides
        for all, one broadcast per 20 steps); ``stop_after_step`` ends the call there."""
        ctx = self.ctx
        if progress.step_in_epoch + 1 >= self.steps_per_epoch:
            return  # (the epoch's end checkpoints anyway)
        due = False
        if self.every_steps and step % self.every_steps == 0:
            due = True
        elif self.every_s and not ctx.active:
            due = time.monotonic() - self.last_saved >= self.every_s
        elif self.every_s and step % 20 == 0:
            due = ctx.broadcast(time.monotonic() - self.last_saved >= self.every_s)
        if not due:
            return
        partial = progress.sums.over_ranks(ctx, self.state.device).partial(progress.seconds(), progress.lrs)
        ranks = rank_rng(ctx, self.state.device)
        if ctx.main:
            atomic_torch_save(self.state.checkpoint(progress.epoch, progress.step_in_epoch + 1,
                                                    progress.generator_state, partial, ranks),
                              self.run_dir / "checkpoint.pt")
        self.last_saved = time.monotonic()
        if self.stop_after_step is not None and step >= self.stop_after_step:
            raise Stop

    # -- the epoch's end ---------------------------------------------------------------------
    def end_of_epoch(self, progress: EpochProgress) -> None:
        """The schedule's step, the epoch's metrics (evaluation when due), its line in
        metrics.jsonl and TensorBoard, and the checkpoint."""
        epoch, optimizer, device = progress.epoch, self.state.optimizer, self.state.device
        last_lr = optimizer.param_groups[0]["lr"]  # of the epoch's last step
        for group, base in zip(optimizer.param_groups, progress.lrs):
            group["lr"] = base  # (after warm-up steps) the schedule goes on from its own value
        lr = last_lr if self.cfg.optim.schedule == "inverse_sqrt" else optimizer.param_groups[0]["lr"]
        self.state.scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's kernels are queued, not finished
        sums = progress.sums.over_ranks(self.ctx, device)
        epoch_time = progress.seconds()
        self.train_time += epoch_time
        self.record = record = self._epoch_record(epoch, lr, sums, epoch_time)
        if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.optim.epochs:
            record.update(self.task.evaluate(self.state.model, self.state.ema))
        self.metrics.write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(scalar_tag(key), value, (epoch + 1) * self.opt_steps)
            self.writer.flush()
        self.trackers.log_epoch(record, (epoch + 1) * self.opt_steps)
        ranks = rank_rng(self.ctx, device)
        if self.ctx.main:
            atomic_torch_save(self.state.checkpoint(epoch + 1, rank_rng=ranks), self.run_dir / "checkpoint.pt")
        self.last_saved = time.monotonic()

    def _epoch_record(self, epoch: int, lr: float, sums: EpochSums, epoch_time: float) -> dict:
        train_loss = (sums.loss / max(sums.seen, 1)).item()
        if not math.isfinite(train_loss):
            kept = (f"epoch {epoch} is checkpointed: the run resumes from it" if epoch > 0 else
                    "no epoch finished, so nothing was kept")
            raise RunError(f"{self.run_dir}: training loss became {train_loss} in epoch {epoch + 1} "
                           f"(lower optim.lr or set optim.grad_clip; {kept})")
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss,
                  "train_acc": sums.correct.item() / max(sums.seen, 1), "epoch_time_s": epoch_time,
                  self.task.speed_key: sums.seen / epoch_time}
        if sums.parts_known:  # the loss's named parts (weighted: they sum to train_loss)
            record.update({f"train_{name}": (value / max(sums.seen, 1)).item() for name, value in sums.parts.items()})
        if sums.skipped:
            record["skipped_images"] = sums.skipped
        return record

    # -- the run's end -------------------------------------------------------------------------
    def finish(self, progress: bool) -> dict:
        """The task's final outputs, the weights and result.json (rank 0); the checkpoint goes."""
        cfg, data, state, run_dir = self.cfg, self.data, self.state, self.run_dir
        extra = self.task.finish(run_dir, state.model, progress, self.log)
        result = {
            "run_dir": str(run_dir), "name": cfg.run_name(), "hash": cfg.run_hash(), "device": describe_device(state.device),
            "device_type": state.device.type, "torch_threads": torch.get_num_threads(), "model": cfg.model.name,
            "dataset": cfg.data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "num_params": count_parameters(state.model), "epochs": cfg.optim.epochs, "train_time_s": self.train_time,
            **self.task.speed(cfg.optim.epochs, self.train_time),
            "final": {k: v for k, v in self.record.items() if k.startswith(("val_", "test_", "train_", "ema_"))},
        }
        result["final"].update(self.task.final_extra(extra))
        result.update(extra)
        result.update(self.processes)
        if self.ctx.main:
            atomic_torch_save(state.model.state_dict(), run_dir / "model.pt")
            if state.ema is not None:
                atomic_torch_save(state.ema.module.state_dict(), run_dir / "model_ema.pt")
            if self.distiller.adapters is not None:  # beside the student's weights, never inside them
                atomic_torch_save(self.distiller.adapters.state_dict(), run_dir / "adapters.pt")
            atomic_write_json(run_dir / "result.json", result)
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)
            self.trackers.finish(result)
        return result


def scalar_tag(key: str) -> str:
    """metrics.jsonl keys -> TensorBoard tags: val_acc -> val/acc, ema_test_acc -> ema_test/acc."""
    for prefix in ("ema_val_", "ema_test_", "train_", "val_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return {"lr": "train/lr", "images_per_s": "speed/images_per_s", "tokens_per_s": "speed/tokens_per_s",
            "epoch_time_s": "speed/epoch_time_s"}.get(key, f"other/{key}")


def _tensorboard_writer(cfg, run_dir, purge_step: int):
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


def _checkpoint_cadence(cfg, data) -> tuple[int | None, float | None]:
    """(every N steps, every S seconds) of checkpoints within an epoch (epoch ends always).
    Default: none for in-memory data (an epoch is short), every 5 minutes for streamed data
    and translation."""
    if cfg.checkpoint_every_steps is None and cfg.checkpoint_every_minutes is None:
        return None, (300.0 if data.streamed or data.tokens else None)
    minutes = cfg.checkpoint_every_minutes
    return cfg.checkpoint_every_steps, (minutes * 60 if minutes else None)
