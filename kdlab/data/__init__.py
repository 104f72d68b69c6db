"""Datasets in memory as tensors, split train/validation/test, optional label noise.

``load_dataset(cfg)`` returns a :class:`Dataset`. Images stay uint8 in memory; a batch
is augmented raw (zero padding = black pixels) and then normalised with the training
split's per-channel mean and std (:meth:`Dataset.prepare`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..distributed import shard
from ..errors import ConfigError, DataError
from .augment import AUGMENTATIONS, Augmentation, get_augmentation
from .imagefolder import load_imagefolder, parse_builtin
from .rows import sample_rows
from .noise import add_label_noise
from .sources import (
    FASHION_MNIST_DEBIAN_DIR,
    FILE_LAYOUTS,
    MNIST1D_CLASSES,
    OPTIONAL_PACKAGES,
    check_dataset_dir,
    check_mnist1d_size,
    check_package,
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
    "imagefolder": ("resized_crop_flip", None),  # streamed from disk (imagefolder.py); classes from the folders
    "translation": ("none", None),  # sentence pairs -> target-token rows (translation.py); classes = vocabulary
}

__all__ = ["Dataset", "load_dataset", "check_data_source", "add_label_noise", "Augmentation", "get_augmentation",
           "AUGMENTATIONS", "DATASETS"]


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
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

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

    streamed = False  # in memory (the fast path); kdlab.data.imagefolder streams from disk
    tokens = False  # rows are samples (kdlab.data.translation: target tokens)

    # the batch protocol (kdlab/data/rows.py): rows are samples
    num_train = property(sample_rows.num_train)
    steps_per_epoch = sample_rows.steps_per_epoch
    global_rows = sample_rows.global_rows
    inputs = sample_rows.inputs
    forward = staticmethod(sample_rows.forward)

    def split_labels(self, split: str) -> torch.Tensor:
        return self.split(split)[1]

    def epoch_batches(self, generator: torch.Generator, batch_size: int, device: torch.device,
                      start_batch: int = 0, ctx=None):
        """One epoch in the generator's order: (augmented raw batch on ``device``, labels,
        sample indices, view ids, 0 skipped). The training split is copied to the device
        once; the order and the views are drawn on the CPU, batch by batch. The first
        ``start_batch`` batches are drawn (the generator moves as it did) but not made. With a
        multi-process ``ctx`` (kdlab.distributed), every rank draws the same global batches
        and keeps its contiguous slice of each."""
        if device not in self._on_device:
            self._on_device[device] = (self.train_x.to(device), self.train_y.to(device))
        train_x, train_y = self._on_device[device]
        order = torch.randperm(len(self.train_y), generator=generator)
        for number, begin in enumerate(range(0, len(order), batch_size)):
            index = order[begin : begin + batch_size]
            views = self.augmentation.sample(len(index), generator)
            if number < start_batch:
                continue
            if ctx is not None and ctx.active:
                part = shard(len(index), ctx)
                index, views = index[part], views[part]
            index_d = index.to(device, non_blocking=True)
            yield self.augmentation.apply(train_x[index_d], views), train_y[index_d], index, views, 0

    def eval_batches(self, split: str, batch_size: int, device: torch.device, ctx=None):
        """Raw (unaugmented) batches of ``split`` on ``device`` (with a multi-process ``ctx``:
        batch b on rank b mod N)."""
        x = self.split(split)[0]
        for number, start in enumerate(range(0, len(x), batch_size)):
            if ctx is None or number % ctx.world == ctx.rank:
                yield x[start : start + batch_size].to(device)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def _data_root(cfg) -> Path:
    """data.root, or Debian's Fashion-MNIST folder when it is unset and installed;
    a DataError saying what to set otherwise (nothing is read)."""
    if cfg.root:
        return Path(cfg.root)
    layout = FILE_LAYOUTS[cfg.name]
    if cfg.name == "fashion-mnist":
        if FASHION_MNIST_DEBIAN_DIR.is_dir():
            return FASHION_MNIST_DEBIAN_DIR
        raise DataError(f"fashion-mnist: data.root is not set and Debian's copy is not at {FASHION_MNIST_DEBIAN_DIR}; "
                        f"`apt-get install dataset-fashion-mnist` or set data.root ({layout.describe()})")
    folder = f"/path/to/{layout.folder or cfg.name}"
    raise DataError(f"{cfg.name}: data.root is not set ({layout.describe()}); set it: `kdlab train ... "
                    f"data.root={folder}`, or `kdlab reproduce ... --set data.root={folder}`")


def check_data_source(cfg) -> None:
    """Cheap check that what a :class:`kdlab.config.DataConfig` needs is there, without
    reading or decoding any dataset file: a known dataset name; for built-in datasets the
    optional package (importable, not imported) and, for MNIST-1D, a ``data.num_samples``
    that can be generated in reasonable time (ConfigError); for file datasets, data.root
    (or Debian's Fashion-MNIST) and every file the loader will open, by the same names.
    DataError with what is missing and how to fix it; a sweep calls this for each data
    config before writing anything."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.name in OPTIONAL_PACKAGES:
        check_package(cfg.name)
    if cfg.extra_test and cfg.name != "mnist1d":
        raise ConfigError(f"config key 'data.extra_test': held-out signals are generated for MNIST-1D only "
                          f"(data.name=mnist1d); {cfg.name} has a fixed test set: remove the key")
    if cfg.name == "mnist1d":
        check_mnist1d_size(cfg.num_samples)
        if cfg.extra_test:
            check_mnist1d_size(_extra_test_request(cfg.extra_test), "data.extra_test")
    if cfg.name in FILE_LAYOUTS:
        check_dataset_dir(_data_root(cfg), FILE_LAYOUTS[cfg.name], cfg.name)
    if cfg.name == "translation":
        _check_translation_source(cfg)
        return
    if cfg.name == "imagefolder":
        if cfg.decoder == "torchcodec":
            _check_torchcodec()
        if not cfg.root:
            raise DataError("imagefolder: data.root is not set (a folder with train/<class>/ and val/<class>/ "
                            "image folders, ImageNet's layout); set it, e.g. data.root=/path/to/imagenet")
        if cfg.root.startswith("builtin:"):  # made from Debian's Fashion-MNIST on first use
            parse_builtin(cfg.root)
            if not FASHION_MNIST_DEBIAN_DIR.is_dir():
                raise DataError(f"data.root={cfg.root} is made from Debian's Fashion-MNIST: "
                                "`apt-get install dataset-fashion-mnist`")
            return
        for split in ("train", "val"):
            if not (Path(cfg.root) / split).is_dir():
                raise DataError(f"imagefolder: {Path(cfg.root) / split} is not a directory (data.root must hold "
                                "train/<class>/ and val/<class>/ image folders)")


def _check_torchcodec() -> None:
    """TorchCodec's image decoders import beside the installed torch (a build for another
    torch fails on import)."""
    try:
        importlib.import_module("torchcodec.decoders")
    except Exception as err:  # (ImportError, or OSError/RuntimeError from a build for another torch)
        import torch

        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.decoder=torchcodec: torchcodec does not import beside torch {torch.__version__} "
                        f"({reason[:200]}); install the torchcodec release made for this torch "
                        "(pip install 'kdlab[images]'), or set data.decoder=pillow") from None


def _check_translation_source(cfg) -> None:
    """sentencepiece/sacrebleu installed; the built-in catalogues present, or the folder there."""
    import importlib.util

    from .text import BUILTIN, LOCALE_DIR, PINNED_CATALOGUES

    for module in ("sentencepiece", "sacrebleu"):
        if importlib.util.find_spec(module) is None:
            raise DataError(f"translation needs {module}: pip install 'kdlab[text]'")
    root = cfg.root or BUILTIN
    if root == BUILTIN:
        missing = sorted({package for name, package in PINNED_CATALOGUES.items()
                          if not (LOCALE_DIR / f"{name}.mo").is_file()})
        if missing:
            raise DataError(f"{BUILTIN}: pinned catalogues are missing from {LOCALE_DIR}: apt-get install "
                            f"{' '.join(missing)}")
    elif not Path(root).is_dir():
        raise DataError(f"data.root={root}: no such directory (parallel text: train.en/train.de, valid.*, test.*, "
                        "or train.tsv/valid.tsv/test.tsv)")


# data.extra_test: the extra signals come from the generator under another seed, so that they are
# independent draws of the same distribution and never repeat the training signals (which the
# generator makes from generator_seed); one offset, far from the seeds people pick (mod 2**32, the
# generator's seed range). mnist1d standardises each generated set by its own mean and std, which
# differ between the two sets by sampling error only (measured at generator_seed 42, before that
# standardisation: the extra set's mean within 0.6% of a std of the standard set's, its std within
# 0.7%, at 500 and 1,000 extra signals; 0.2% and 0.02% at 19,000).
EXTRA_TEST_SEED_OFFSET = 1_000_000


def _extra_test_request(extra_test: int) -> int:
    """num_samples to ask the generator for ``extra_test`` signals: it makes whole tens (one tenth
    per class), so round up; the first ``extra_test`` are kept (at most 9 are drawn and dropped)."""
    return -(-extra_test // MNIST1D_CLASSES) * MNIST1D_CLASSES


def _read_arrays(cfg):
    """(train_x, train_y, test_x, test_y) of the dataset; check_data_source(cfg) has passed."""
    if cfg.name == "digits":
        return load_digits_arrays(seed=cfg.split_seed)
    if cfg.name == "mnist1d":
        train_x, train_y, test_x, test_y = load_mnist1d_arrays(cfg.num_samples, seed=cfg.generator_seed)
        if cfg.extra_test:  # appended after the standard test split, which stays the first rows
            extra = load_mnist1d_arrays(_extra_test_request(cfg.extra_test),
                                        seed=(cfg.generator_seed + EXTRA_TEST_SEED_OFFSET) % 2**32)
            # both parts of the generator's own split are held out; the first extra_test of them
            test_x = np.concatenate([test_x, np.concatenate([extra[0], extra[2]])[:cfg.extra_test]])
            test_y = np.concatenate([test_y, np.concatenate([extra[1], extra[3]])[:cfg.extra_test]])
        return train_x, train_y, test_x, test_y
    if cfg.name in ("mnist", "fashion-mnist"):
        return load_idx_arrays(_data_root(cfg))
    return load_cifar_arrays(_data_root(cfg), DATASETS[cfg.name][1])


def _check_labels(name: str, split: str, y: np.ndarray, num_classes: int) -> None:
    """A split is not empty and its labels are in 0..num_classes-1 (the first bad one is named)."""
    if len(y) == 0:
        raise DataError(f"{name}: the {split} split is empty")
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise DataError(f"{name}: {split} labels outside 0..{num_classes - 1} (found {bad[0]})")


def _check_arrays(name: str, num_classes: int, train_x, train_y, test_x, test_y) -> None:
    """Both splits non-empty with labels in range (so the validation split too, taken from
    train), and train and test inputs of one shape."""
    _check_labels(name, "training", train_y, num_classes)
    _check_labels(name, "test", test_y, num_classes)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{name}: training inputs have shape {tuple(train_x.shape[1:])} "
                        f"but test inputs {tuple(test_x.shape[1:])}")


def load_dataset(cfg) -> Dataset:
    """Build the dataset a :class:`kdlab.config.DataConfig` describes. Checked first:
    the source (check_data_source), then the arrays (_check_arrays) and that the
    augmentation fits their shape (Augmentation.check, a ConfigError on data.augment)."""
    check_data_source(cfg)
    if cfg.name == "translation":
        from .translation import TranslationData

        return TranslationData(cfg)
    if cfg.name == "imagefolder":
        if cfg.augment not in ("auto", "none", "resized_crop_flip"):
            raise ConfigError(f"config key 'data.augment': {cfg.augment} is for in-memory data; image folders take "
                              "auto (= resized_crop_flip, ImageNet's RandomResizedCrop + flip) or none")
        return load_imagefolder(cfg)
    default_aug, num_classes = DATASETS[cfg.name]
    train_x, train_y, test_x, test_y = _read_arrays(cfg)
    _check_arrays(cfg.name, num_classes, train_x, train_y, test_x, test_y)
    augmentation = get_augmentation(default_aug if cfg.augment == "auto" else cfg.augment)
    augmentation.check(train_x.shape[1:], cfg.name)
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
    t = torch.from_numpy
    return Dataset(
        name=cfg.name, num_classes=num_classes,
        train_x=t(np.array(train_x)), train_y=t(np.array(train_y)),
        val_x=t(np.array(val_x)), val_y=t(np.array(val_y)),
        test_x=t(np.array(test_x)), test_y=t(np.array(test_y)),
        augmentation=augmentation, mean=mean, std=std,
        noisy_indices=noisy, clean_train_y=clean_train_y,
    )
