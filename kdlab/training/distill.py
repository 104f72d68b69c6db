"""The objective as an object: a distiller owns the student, its trainable extras (none for
logit objectives) and where the teacher's logits come from, and for one batch returns the
loss, the student's logits and the loss's named parts.

Teacher sources (each ``source(x, index, views)`` → float32 logits or None, and
``finish(main)`` when training ends):

- :class:`NoTeacher` — a teacher run (α = 0, or no teacher section): no logits;
- :class:`OnlineTeacher` — the frozen teacher(s) run on every batch;
- :class:`TableTeacher` — the exact teacher-logit table by (sample, view)
  (``teacher_cache.TeacherCache``, lazy or full; rank 0 saves the lazy table at the end)
  or the top-k crop store of streamed data (``teacher_store.TeacherStore``).

:func:`open_teacher_source` picks one from the config, as the loop always has: the store
for streamed data with ``teacher.store.crops``, else the exact cache unless it is off or
the data is streamed (a table too large for memory falls back to the online teacher, with
a line saying so), else the online teacher.

The loop trains ``distiller.module`` (the module DDP wraps: the student, plus any adapters
a feature method adds); teachers stay frozen and unwrapped.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..device import autocast
from ..losses import distillation_loss_parts
from ..teacher_cache import TeacherCache
from ..teacher_store import TeacherStore


class NoTeacher:
    """No teacher in the step (a teacher run, or α = 0)."""

    crop_store = None  # (a source that decides the crops streamed data draws: the crop store)

    def __call__(self, x, index, views):
        return None

    def finish(self, main: bool) -> None:
        pass


class OnlineTeacher:
    """The frozen teacher(s) run on every batch, in the student's precision."""

    crop_store = None

    def __init__(self, teachers, bf16: bool):
        self.teachers, self.bf16 = teachers, bf16

    def __call__(self, x, index, views):
        return self.teachers(x, self.bf16)

    def finish(self, main: bool) -> None:
        pass


class TableTeacher:
    """Stored teacher logits looked up by (sample, view): the exact cache or the crop store.
    ``save``: rank 0 writes the table at the end (a lazy cache fills as training meets views).
    A crop store is also ``crop_store``: streamed data then draws one of each image's stored
    crops instead of a fresh one."""

    def __init__(self, table, save: bool, crop_store=None):
        self.table, self.save, self.crop_store = table, save, crop_store

    def __call__(self, x, index, views):
        return self.table.lookup(index, views, x)

    def finish(self, main: bool) -> None:
        if self.save and main:
            self.table.save()


def open_teacher_source(cfg, data, teachers, ctx, bf16: bool, log, progress: bool):
    """The teacher source of this run (see the module docstring). Collective in a
    multi-process run: rank 0 builds (or finds) a store or full table, the others then
    open it."""
    if teachers is None or not cfg.teacher_in_step:
        return NoTeacher()
    if data.streamed and cfg.teacher.store.crops:
        store = TeacherStore(teachers, data, cfg.teacher.store, Path(cfg.out_dir) / ".teacher-store", log, bf16,
                             cfg.loss.tau)
        if ctx.main:
            store.build(cfg.eval_batch_size, progress)
        ctx.barrier()
        if not ctx.main:
            store.build(cfg.eval_batch_size, False)
        return TableTeacher(store, save=False, crop_store=store)
    if cfg.teacher.cache.mode != "off" and not data.streamed:
        def open_cache():
            try:
                return TeacherCache(teachers, data, cfg.teacher.cache, Path(cfg.out_dir) / ".teacher-cache", log, bf16)
            except MemoryError as err:
                log(f"{err}: running the teacher online instead")
                return None

        cache = None
        if ctx.main:  # rank 0 reads, builds and saves the table; the others then read it
            cache = open_cache()
            if cache is not None and cfg.teacher.cache.mode == "full":
                cache.build(cfg.eval_batch_size, progress)
        ctx.barrier()
        if not ctx.main:
            cache = open_cache()
        if cache is not None:
            return TableTeacher(cache, save=True)
    return OnlineTeacher(teachers, bf16)


class LogitDistiller:
    """CE, label smoothing, KL at any τ (τ = ∞ included) or MSE on logits — Kim Eq. 2 and
    Müller A.5, as :func:`kdlab.losses.distillation_loss_parts` computes them. Its parts are
    ``ce`` (or ``ls`` with smoothing) and ``kd``, weighted so that they sum to the loss."""

    adapters = None  # logit objectives train nothing beside the student
    unused_parameters = False  # every student parameter gets a gradient each step (DDP's default)

    def __init__(self, student: nn.Module, source, loss_cfg, device_type: str, bf16: bool):
        self.student, self.source = student, source  # (the source may be attached later: ``source = ...``)
        self.device_type, self.bf16 = device_type, bf16  # the forward's autocast (losses stay float32)
        self.loss_kwargs = dict(alpha=loss_cfg.alpha, kd=loss_cfg.kd, tau=loss_cfg.tau,
                                kl_scaling=loss_cfg.kl_scaling, mse_reduction=loss_cfg.mse_reduction,
                                smoothing=loss_cfg.smoothing, smoothing_mode=loss_cfg.smoothing_mode)

    @property
    def part_names(self) -> tuple[str, ...]:
        """The names of the loss parts every batch returns, in order (known before any batch,
        so every rank sums the same ones)."""
        alpha, smoothing = self.loss_kwargs["alpha"], self.loss_kwargs["smoothing"]
        return (("ce" if smoothing == 0 else "ls",) if alpha < 1 else ()) + (("kd",) if alpha > 0 else ())

    @property
    def module(self) -> nn.Module:
        """What trains (and what DDP wraps): the student; logit objectives add no module."""
        return self.student

    def __call__(self, data, module, x, y, index, views):
        """(loss, student logits, {part: weighted term}) of one batch; ``module`` is
        :attr:`module` or its DDP wrapper."""
        with autocast(self.bf16, self.device_type):
            logits = data.forward(module, x)  # rows: one per sample, or per target token
        loss, parts = distillation_loss_parts(logits, y, self.source(x, index, views), **self.loss_kwargs)
        return loss, logits, parts

    def start_epoch(self, epoch: int) -> None:
        """An epoch (0-based) begins: methods with a schedule of their own (DKD's warm-up) set it."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps beside the student's (adapters, memory banks): nothing here."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, main: bool) -> None:
        """Training ended (or stopped to resume later): a lazy teacher table is saved."""
        self.source.finish(main)

