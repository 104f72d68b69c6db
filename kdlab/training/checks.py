"""What is checked before a run dir exists: the memory the run's big allocations will
take, what the kind of data allows of teacher sources (exact table, crop store), and
what a torchrun run needs (rows of every batch for every rank; SyncBatchNorm on GPUs)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import Config
from ..data import Dataset
from ..device import memory_limit_bytes
from ..errors import ConfigError
from ..runs import read_json
from ..teacher_cache import table_bytes
from ..translate import decode_passes_bytes, decoder_size, describe_beam_batch


def estimate_memory(cfg: Config, data: Dataset, num_params: int) -> dict[str, int]:
    """Bytes of the allocations that grow with the config, before any is made."""
    if cfg.optim.optimizer == "adam":  # two moment buffers instead of one
        items = {"model (weights, gradients, Adam moments, checkpoint copy)": 20 * num_params}
    else:
        items = {"model (weights, gradients, momentum, checkpoint copy)": 16 * num_params}
    if cfg.optim.ema_decay:
        items["weight EMA (and its checkpoint copy)"] = 8 * num_params
    mi = cfg.mutual_information
    if mi.every_steps:
        examples = sum(min(mi.per_class, int((data.train_y == c).sum())) for c in mi.classes)
        per_input = math.prod(data.input_shape) * (data.train_x.element_size() + 4)
        items["mutual-information probe (inputs × views, pairwise densities)"] = (
            examples * mi.views * (per_input + 8 * data.num_classes) + 24 * examples**2)
    if cfg.teacher_in_step and cfg.teacher.cache.mode != "off":
        size = table_bytes(len(data.train_y), data.augmentation.num_views, data.num_classes, cfg.teacher.cache.dtype)
        if size <= cfg.teacher.cache.max_gb * 1e9:  # larger: refused by the cache itself (online teacher)
            items["teacher cache"] = size
    if data.tokens and cfg.decode.beam > 1:  # the final beam search, while the model state above is still held
        size, where = decode_passes_bytes(data, cfg.decode, decoder_size(cfg.model.name, data.num_classes),
                                          threads=cfg.threads)
        items[f"decode.beam={cfg.decode.beam} beam search, {describe_beam_batch(where)}"] = size
    return items


def check_memory(cfg: Config, data: Dataset, num_params: int, device: torch.device) -> None:
    """Refuse, with the numbers, a run whose estimated allocations exceed the limit."""
    limit = memory_limit_bytes(cfg.memory_limit_gb, device)
    if limit is None:
        return
    items = estimate_memory(cfg, data, num_params)
    need = sum(items.values())
    if need > limit:
        biggest = max(items, key=items.get)
        raise ConfigError(f"the run would need ~{need / 1e9:,.3g} GB ({biggest}: {items[biggest] / 1e9:,.3g} GB) but the "
                          f"limit is {limit / 1e9:,.3g} GB (memory_limit_gb; default 90% of {device.type} memory)")


def check_teacher_source(cfg: Config, data) -> None:
    """What the data kind allows: finite views (in memory) take the exact teacher cache and
    the MI probe; streamed crops take the teacher store (top-k: KL at a finite τ only)."""
    if data.streamed:
        if cfg.mutual_information.every_steps:
            raise ConfigError("mutual_information.every_steps: the MI probe needs in-memory data with finite views; "
                              f"{cfg.data.name} is streamed from disk")
        if cfg.teacher_in_step and cfg.teacher.cache.mode != "off":
            raise ConfigError(f"teacher.cache.mode={cfg.teacher.cache.mode}: the exact (sample, view) table needs "
                              f"finite views; {cfg.data.name}'s random resized crops are unbounded: use "
                              "teacher.store.crops=M (stored crops) or the online teacher (mode=off)")
        store_cfg = cfg.teacher.store if cfg.teacher is not None else None
        if store_cfg is not None and store_cfg.crops and store_cfg.top_k is not None:
            if cfg.loss.kd != "kl" or math.isinf(cfg.loss.tau):
                raise ConfigError("teacher.store.top_k: a top-k store holds probabilities at the loss's τ: it serves "
                                  "KL at a finite τ only (use the full store for τ=inf or MSE)")
            if store_cfg.top_k >= data.num_classes:
                raise ConfigError(f"teacher.store.top_k={store_cfg.top_k} must be below the {data.num_classes} classes")
    elif cfg.teacher is not None and cfg.teacher.store.crops:
        raise ConfigError("teacher.store.crops: the crop store is for streamed data (data.name=imagefolder); "
                          "in-memory data has the exact teacher cache (teacher.cache.mode=lazy|full)")


def check_processes(cfg: Config, data, ctx, device: torch.device) -> None:
    """Multi-process runs: every rank gets rows of every global batch; SyncBatchNorm on GPUs."""
    if not ctx.active:
        if cfg.sync_batchnorm:
            raise ConfigError("sync_batchnorm=true: it shares BatchNorm statistics between the processes of a torchrun "
                              "run, and this is one process; start it with torchrun --nproc_per_node=N, or leave "
                              "sync_batchnorm off")
        return
    if cfg.sync_batchnorm and device.type != "cuda":
        raise ConfigError("sync_batchnorm=true: torch's SyncBatchNorm runs on GPUs only; this run is on the CPU "
                          f"({ctx.world} gloo processes): leave it off here")
    if data.tokens:
        if data.smallest_batch() < ctx.world:
            raise ConfigError(f"data.max_tokens={data.max_tokens}: a batch of {data.smallest_batch()} sentence(s) "
                              f"cannot be shared by {ctx.world} processes (each needs rows of every batch)")
        return
    n = len(data.train_y)
    last = n % cfg.optim.batch_size or cfg.optim.batch_size
    if min(cfg.optim.batch_size, last) < ctx.world:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size}: with {n} training samples the last batch has "
                          f"{last}, fewer than the {ctx.world} processes (each needs rows of every batch)")


def check_init_run(cfg: Config, data) -> None:
    """``model.init_run`` must be a finished run of the same model and classes."""
    run = Path(cfg.model.init_run)
    if not (run / "result.json").is_file():
        raise ConfigError(f"model.init_run: {run} is not a finished run (no result.json): finish it first")
    info = read_json(run / "result.json")
    if info.get("model") != cfg.model.name or info.get("num_classes") != data.num_classes:
        raise ConfigError(f"model.init_run: {run} trained {info.get('model')} with {info.get('num_classes')} classes; "
                          f"this run trains {cfg.model.name} with {data.num_classes}")
