"""Where and in what precision a run computes: the device (``auto``, ``cpu``, ``cuda[:N]``,
a torchrun rank's ``cuda:LOCAL_RANK``), bf16 autocast, channels-last layout, and the
memory a device has. Used by training, evaluation and decoding alike."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .errors import ConfigError
from .runs import system_memory_bytes


def resolve_device(name: str, ctx=None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> a usable torch.device, or a one-line error.
    Under torchrun on CUDA each rank takes ``cuda:LOCAL_RANK``."""
    if ctx is not None and ctx.active and ctx.backend == "nccl":
        return torch.device("cuda", ctx.local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but CUDA is not available to this torch "
                              f"({torch.__version__}); use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_bf16(cfg, device: torch.device) -> bool:
    """``bf16: auto`` (the default) is bf16 autocast on CUDA and float32 on the CPU."""
    return cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's first "model name"), else what platform reports:
    what reports and benchmarks record of the machine."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def autocast(enabled: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def physical_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return system_memory_bytes()


def memory_limit_bytes(memory_limit_gb: float | None, device: torch.device) -> float | None:
    """The limit big allocations are checked against: ``memory_limit_gb``, else 90% of the
    device's physical memory (None where the OS does not say)."""
    if memory_limit_gb:
        return memory_limit_gb * 1e9
    total = physical_memory_bytes(device)
    return 0.9 * total if total else None
