"""Run state, registered once: what a run trains and steps (student, optimizer, schedule,
data generator, weight EMA) is built here and is what a checkpoint holds and a resume
restores, with the torch RNG of every process — so a run stopped anywhere (after an
epoch or within one) and resumed ends exactly as an uninterrupted run.

A checkpoint (``checkpoint.pt``, written atomically by rank 0) holds ``epoch`` (epochs
done), ``model``, ``optimizer``, ``scheduler``, ``generator`` (the data order's state),
``torch_rng`` / ``cuda_rng``, ``torch_threads``, ``ema`` with weight averaging, in a
multi-process run ``rank_rng`` (every process's RNG states, in rank order: each draws its
own dropout masks), and within an epoch ``step_in_epoch``, ``epoch_generator`` (the
generator as the epoch began: the batches done are drawn again and skipped) and
``partial`` (the epoch's sums so far over every rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..distributed import SINGLE
from ..errors import RunError
from ..models import build_model
from ..runs import load_weights
from .optim import make_ema, param_groups, scheduler_for


@dataclass
class RunState:
    model: nn.Module  # the student itself (not its DDP wrapper): evaluation, EMA and saving use it
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    ema: object | None
    device: torch.device
    distiller: object = None  # its state beside the student's (adapters, ...), when it has any

    def checkpoint(self, epochs_done: int, step_in_epoch: int = 0, epoch_generator=None, partial=None,
                   rank_rng=None) -> dict:
        """What a resume needs (see the module docstring)."""
        state = {"epoch": epochs_done, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "torch_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        extra = self.distiller.state_dict() if self.distiller is not None else {}
        if extra:
            state["distiller"] = extra
        if rank_rng is not None:
            state["rank_rng"] = rank_rng
        if step_in_epoch:
            state.update(step_in_epoch=step_in_epoch, epoch_generator=epoch_generator, partial=partial)
        return state

    def restore(self, state: dict, path: Path, ctx=SINGLE) -> None:
        """Load a checkpoint; one that does not fit this run is moved aside with a RunError."""
        device = self.device
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.distiller is not None and self.distiller.state_dict():
                self.distiller.load_state_dict(state["distiller"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            ranks = state.get("rank_rng")
            if ranks is not None and len(ranks) == ctx.world:  # each process its own stream (dropout)
                torch.set_rng_state(ranks[ctx.rank][0])
                if device.type == "cuda" and ranks[ctx.rank][1] is not None:
                    torch.cuda.set_rng_state(ranks[ctx.rank][1], device)
                return
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            raise RunError(f"{path}: does not fit this run ({str(err).splitlines()[0][:120]}); moved it to "
                           f"{aside.name}: run the same command again to restart this run from epoch 0") from None
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)


def build_student(cfg, data, device: torch.device, ctx=SINGLE) -> nn.Module:
    """The student: pretrained weights, device, memory layout, SyncBatchNorm under DDP."""
    model = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
    if cfg.model.pretrained_path:
        load_weights(model, Path(cfg.model.pretrained_path), "model.pretrained_path")
    if cfg.model.init_run:  # an earlier stage's student
        load_weights(model, Path(cfg.model.init_run) / "model.pt", "model.init_run")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.active and cfg.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_state(cfg, model: nn.Module, distiller, device: torch.device) -> RunState:
    """The optimizer over the student and the distiller's adapters (their own parameter
    groups), the schedule, the seeded data generator and the student's EMA."""
    opt = cfg.optim
    groups = param_groups(model, opt.weight_decay, opt.decay_bn_bias)
    if distiller.adapters is not None:
        groups += param_groups(distiller.adapters, opt.weight_decay, opt.decay_bn_bias)
    if opt.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)
    else:
        optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0)
    return RunState(model, optimizer, scheduler_for(optimizer, opt), torch.Generator().manual_seed(cfg.seed),
                    make_ema(model, opt.ema_decay) if opt.ema_decay else None, device, distiller)


def rank_rng(ctx, device) -> list | None:
    """Every process's torch RNG states (CPU, CUDA) in rank order (a collective), so a
    resumed multi-process run draws the dropout masks an uninterrupted one would; None in
    one process (the checkpoint's own states are the process's)."""
    if not ctx.active:
        return None
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    states = [None] * ctx.world
    torch.distributed.all_gather_object(states, mine)
    return states
