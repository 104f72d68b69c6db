"""One run over several processes: torchrun + torch.distributed (DDP), nothing home-made.

``torchrun --nproc_per_node=N -m kdlab train CONFIG`` (``--nnodes`` and a rendezvous
endpoint for several machines) starts N processes; each reads torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins one process group: NCCL on
CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU (so CI tests the same code).

What the loop does with it (kdlab/train.py):

- every rank draws the same seeded order and views (one generator, same seed) and takes
  its contiguous slice of each *global* batch (``optim.batch_size`` is the global batch),
  so N processes see exactly the batches of one process;
- DDP wraps the student only (teachers stay frozen and unwrapped, as timm's distillation
  task does); each rank's loss is its rows' mean scaled by ``N · local / global`` rows,
  so DDP's gradient average is the global batch's mean gradient, whatever the split;
- the epoch's sums are all-reduced, evaluation is sharded by batch and gathered;
- rank 0 alone holds the run lock and writes the run dir (metrics, checkpoints,
  TensorBoard, eval outputs, result); the others read the checkpoint to resume.

A rank that dies ends the run: torchrun stops the others and exits non-zero; the last
checkpoint resumes it (with any process count: the global batches are the same).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import RunError, first_line


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # collectives (no-ops in one process) ---------------------------------------------

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's picklable ``value`` on every rank."""
        if not self.active:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def rank0_decides(self, decide, share=lambda result: result):
        """Rank 0 runs ``decide()`` and every rank hears ``share(result)``: returns (the
        result on rank 0, None elsewhere; the shared value). When ``decide`` raises, rank 0
        re-raises and every other rank raises a RunError quoting it, so no rank waits
        in a collective that will never come."""
        if self.main:
            try:
                result = decide()
            except BaseException as err:
                self.broadcast(("error", first_line(err)))
                raise
            shared = share(result)
            self.broadcast(("ok", shared))
            return result, shared
        status, shared = self.broadcast(None)
        if status == "error":
            raise RunError(f"rank {self.rank}: rank 0 stopped the run: {shared}")
        return None, shared

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def gather_batches(self, local: list) -> list:
        """Batches evaluated round-robin (batch b on rank b mod N), back in batch order on
        every rank."""
        if not self.active:
            return local
        parts = [None] * self.world
        dist.all_gather_object(parts, local)
        total = sum(len(p) for p in parts)
        return [parts[b % self.world][b // self.world] for b in range(total)]


SINGLE = Context()


def context_from_env(device_name: str) -> Context:
    """The process group torchrun's environment describes (joined on first call), or a
    single-process context when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RunError(f"WORLD_SIZE={world} but {key} is not set: start multi-process runs with torchrun")
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        timeout = timedelta(seconds=float(os.environ.get("KDLAB_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group(backend, timeout=timeout)
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]),
                   backend=dist.get_backend())


def shard(n: int, ctx: Context) -> slice:
    """This rank's contiguous part of ``n`` rows (torch.tensor_split's sizes)."""
    base, extra = divmod(n, ctx.world)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (1 if ctx.rank < extra else 0))
