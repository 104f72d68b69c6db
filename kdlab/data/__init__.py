"""Datasets in memory as tensors, split train/validation/test, optional label noise.

``load_dataset(cfg)`` returns a :class:`Dataset`. Images stay uint8 in memory; a batch
is augmented raw (zero padding = black pixels) and then normalised with the training
split's per-channel mean and std (:meth:`Dataset.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .augment import AUGMENTATIONS, Augmentation, get_augmentation
from .sources import (
    FASHION_MNIST_DEBIAN_DIR,
    load_cifar_arrays,
    load_digits_arrays,
    load_idx_arrays,
    load_mnist1d_arrays,
)

DATASETS = {
    # name: (default augmentation, number of classes)
    "digits": ("none", 10),
    "mnist1d": ("shift1d", 10),
    "mnist": ("shift2", 10),
    "fashion-mnist": ("shift2", 10),
    "cifar10": ("crop_flip", 10),
    "cifar100": ("crop_flip", 100),
}

__all__ = ["Dataset", "load_dataset", "add_label_noise", "Augmentation", "get_augmentation", "AUGMENTATIONS", "DATASETS"]


@dataclass
class Dataset:
    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augmentation: Augmentation
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    noisy_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clean_train_y: torch.Tensor | None = None
    _device_stats: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw batch -> normalised float32 (uint8 images are scaled to [0, 1] first)."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, std = self._stats_on(x.device)
        return (x - mean.view(shape)) / std.view(shape)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean/std on ``device``, copied there once (not in every step)."""
        if self.mean.device == device:
            return self.mean, self.std
        cached = self._device_stats.get(device)
        if cached is None:
            cached = self._device_stats[device] = (self.mean.to(device), self.std.to(device))
        return cached

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def add_label_noise(labels: np.ndarray, num_classes: int, rate: float, kind: str, seed: int):
    """Flip exactly round(rate·N) labels, chosen uniformly without replacement.

    ``symmetric`` (Kim §6): each chosen label becomes a uniformly drawn *different*
    class (so ``rate`` is the true fraction of wrong labels; the convention that draws
    from all K classes corrupts only rate·(K−1)/K). ``asymmetric``: class k → (k+1) mod K.
    Returns (noisy labels, sorted flipped indices).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    labels = labels.copy()
    count = int(round(rate * len(labels)))
    chosen = np.sort(rng.choice(len(labels), size=count, replace=False))
    if kind == "symmetric":
        offsets = rng.integers(1, num_classes, size=count)
    elif kind == "asymmetric":
        offsets = np.ones(count, dtype=np.int64)
    else:
        raise ValueError(f"unknown label noise {kind!r}: use 'symmetric' or 'asymmetric'")
    labels[chosen] = (labels[chosen] + offsets) % num_classes
    return labels, chosen


def _read_arrays(cfg):
    if cfg.name == "digits":
        return load_digits_arrays(seed=cfg.split_seed)
    if cfg.name == "mnist1d":
        return load_mnist1d_arrays(cfg.num_samples, seed=cfg.generator_seed)
    if cfg.name in ("mnist", "fashion-mnist"):
        root = cfg.root or (FASHION_MNIST_DEBIAN_DIR if cfg.name == "fashion-mnist" else None)
        if root is None:
            raise DataError("data.root is required for mnist (a directory of IDX files)")
        if not Path(root).is_dir() and cfg.name == "fashion-mnist" and not cfg.root:
            raise DataError(
                f"Fashion-MNIST not found at {root}: `apt-get install dataset-fashion-mnist` or set data.root"
            )
        return load_idx_arrays(root)
    if cfg.name in ("cifar10", "cifar100"):
        if not cfg.root:
            raise DataError(f"data.root is required for {cfg.name} (the folder of python-pickle batches)")
        return load_cifar_arrays(cfg.root, 10 if cfg.name == "cifar10" else 100)
    raise DataError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")


def load_dataset(cfg) -> Dataset:
    """Build the dataset a :class:`kdlab.config.DataConfig` describes."""
    default_aug, num_classes = DATASETS.get(cfg.name, (None, None))
    train_x, train_y, test_x, test_y = _read_arrays(cfg)
    if train_y.size and (train_y.min() < 0 or train_y.max() >= num_classes):
        raise DataError(f"{cfg.name}: labels outside 0..{num_classes - 1}")
    val_size = cfg.val_size
    if val_size is None:
        val_size = len(train_y) // 10 if cfg.name in ("digits", "mnist1d") else 10000
    if not 0 <= val_size < len(train_y):
        raise DataError(
            f"data.val_size={val_size} must be smaller than the {len(train_y)} training examples of {cfg.name}"
        )
    order = np.random.default_rng(cfg.split_seed).permutation(len(train_y))
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[train_idx], train_y[train_idx]

    clean_train_y, noisy = None, np.zeros(0, np.int64)
    if cfg.label_noise > 0:
        clean_train_y = torch.from_numpy(train_y.copy())
        train_y, noisy = add_label_noise(train_y, num_classes, cfg.label_noise, cfg.noise_type, cfg.noise_seed)

    as_float = train_x.astype(np.float32) / (255.0 if train_x.dtype == np.uint8 else 1.0)
    axes = (0,) + tuple(range(2, as_float.ndim))
    mean = torch.from_numpy(as_float.mean(axis=axes))
    std = torch.from_numpy(as_float.std(axis=axes)).clamp_min(1e-6)
    aug_name = default_aug if cfg.augment == "auto" else cfg.augment
    t = torch.from_numpy
    return Dataset(
        name=cfg.name, num_classes=num_classes,
        train_x=t(np.array(train_x)), train_y=t(np.array(train_y)),
        val_x=t(np.array(val_x)), val_y=t(np.array(val_y)),
        test_x=t(np.array(test_x)), test_y=t(np.array(test_y)),
        augmentation=get_augmentation(aug_name), mean=mean, std=std,
        noisy_indices=noisy, clean_train_y=clean_train_y,
    )
