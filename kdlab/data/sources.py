"""Readers for the dataset formats kdlab knows. Each returns numpy arrays
(train_x, train_y, test_x, test_y); images are uint8 (N, C, H, W), signals float32.

The built-in datasets (scikit-learn's digits, MNIST-1D generated and cached) are made
here; the files read from ``data.root`` (IDX, CIFAR pickles) by :mod:`kdlab.data.formats`,
whose names are re-exported here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .formats import (
    CIFAR_LABEL_KEYS,
    CIFAR_LAYOUTS,
    FILE_LAYOUTS,
    IDX_LAYOUT,
    FileLayout,
    check_dataset_dir,
    load_cifar_arrays,
    load_idx_arrays,
    read_cifar_batch,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_DEBIAN_DIR", "OPTIONAL_PACKAGES", "check_package", "load_digits_arrays", "MNIST1D_RATE",
    "MNIST1D_MAX_SAMPLES", "MNIST1D_CLASSES", "mnist1d_generated", "check_mnist1d_size", "load_mnist1d_arrays",
    # from kdlab.data.formats
    "FileLayout", "IDX_LAYOUT", "CIFAR_LAYOUTS", "CIFAR_LABEL_KEYS", "FILE_LAYOUTS", "check_dataset_dir", "read_idx",
    "load_idx_arrays", "read_cifar_batch", "load_cifar_arrays",
]

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


# --- which package each dataset needs (shared by the loaders and check_data_source) ---

# dataset: (module it needs, message when that module is missing)
OPTIONAL_PACKAGES = {
    "digits": ("sklearn", "the digits dataset needs scikit-learn: pip install 'kdlab[demo]'"),
    "mnist1d": ("mnist1d", "MNIST-1D needs the mnist1d package: pip install 'kdlab[demo]'"),
    "imagefolder": ("PIL", "image folders are decoded with Pillow: pip install 'kdlab[images]'"),
}


def check_package(dataset: str) -> None:
    """The optional package a built-in dataset needs is importable (not imported)."""
    module, message = OPTIONAL_PACKAGES[dataset]
    if importlib.util.find_spec(module) is None:
        raise DataError(message)


# --- built-in datasets ---


def load_digits_arrays(test_size: int = 297, seed: int = 0):
    """scikit-learn's bundled 8×8 digits (1797 images, 0..16 scaled to uint8 0..255).
    There is no official test split: a seeded ``test_size`` images are held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(OPTIONAL_PACKAGES["digits"][1]) from None

    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:test_size], order[test_size:]
    return images[train], labels[train], images[test], labels[test]


# mnist1d's make_dataset is pure Python: measured ~1,450 examples/s (2,000 and 8,000
# examples, one core of a 2-core x86 VM), linear in num_samples. 1,000,000 takes ~12 min.
MNIST1D_RATE = 1400  # examples per second, rounded down
MNIST1D_MAX_SAMPLES = 1_000_000
MNIST1D_CLASSES = 10


def mnist1d_generated(num_samples: int) -> int:
    """How many signals mnist1d's make_dataset makes when asked for ``num_samples``: it draws
    ``num_samples // 10`` per class (5,005 gives 5,000; under 10, none: it fails)."""
    return num_samples // MNIST1D_CLASSES * MNIST1D_CLASSES


def _duration(seconds: float) -> str:
    return f"~{seconds / 3600:.0f} h" if seconds >= 5400 else f"~{max(1, round(seconds / 60))} min"


def check_mnist1d_size(num_samples: int, key: str = "data.num_samples") -> None:
    """``num_samples`` (config key ``key``) small enough to generate in reasonable time and at
    least one signal per class (ConfigError otherwise, saying how long it would take when too
    many); checked before generating anything."""
    if num_samples > MNIST1D_MAX_SAMPLES:
        raise ConfigError(
            f"config key '{key}': {num_samples:,} MNIST-1D examples would take "
            f"{_duration(num_samples / MNIST1D_RATE)} to generate (about {MNIST1D_RATE:,}/s here); "
            f"at most {MNIST1D_MAX_SAMPLES:,}")
    if mnist1d_generated(num_samples) == 0:
        raise ConfigError(f"config key '{key}': the MNIST-1D generator makes {key.rsplit('.', 1)[-1]} // "
                          f"{MNIST1D_CLASSES} signals per class, so at least {MNIST1D_CLASSES} (got {num_samples})")


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def _mnist1d_cache_path(num_samples: int, seed: int) -> Path:
    """Where generated MNIST-1D arrays are kept between processes (``$KDLAB_CACHE/mnist1d`` or
    ``~/.cache/kdlab/mnist1d``), named by everything the generator's output depends on: the
    size, the seed and the versions of mnist1d, NumPy and SciPy (its interpolation)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "none"

    root = Path(os.environ.get("KDLAB_CACHE") or Path.home() / ".cache" / "kdlab") / "mnist1d"
    return root / f"n{int(num_samples)}-s{int(seed)}-mnist1d{v('mnist1d')}-np{v('numpy')}-sp{v('scipy')}.npz"


def _read_mnist1d_cache(path: Path, num_samples: int):
    """The cached arrays, or None when there are none or they are unreadable or the wrong size
    (then they are generated again and the file replaced)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = tuple(np.array(f[k]) for k in _MNIST1D_KEYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (len(arrays[0]) + len(arrays[2]) != mnist1d_generated(num_samples) or arrays[0].dtype != np.float32
            or arrays[1].dtype != np.int64):
        return None
    return arrays


def _write_mnist1d_cache(path: Path, arrays) -> None:
    """Write atomically (a unique temporary file, then rename): concurrent runs may race, each
    writes identical bytes and the last rename wins. An unwritable cache only costs time."""
    from ..runs import atomic_save_npz  # (0644 like every file kdlab writes; mkstemp alone makes 0600)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(path, **dict(zip(_MNIST1D_KEYS, arrays)))
    except OSError:
        pass


@functools.lru_cache(maxsize=4)
def load_mnist1d_arrays(num_samples: int = 5000, seed: int = 42):
    """MNIST-1D (Greydanus 2020) generated locally by the ``mnist1d`` package (never its
    download path). Its own 80/20 train/test split of ``mnist1d_generated(num_samples)``
    signals (whole tens: the generator draws num_samples // 10 per class), (N, 1, 40) float32.
    Generation takes ~0.7 s per 1,000 examples (at most MNIST1D_MAX_SAMPLES), so results
    are cached on disk (:func:`_mnist1d_cache_path`) and in the process (read-only arrays:
    callers copy what they change)."""
    check_mnist1d_size(num_samples)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError(OPTIONAL_PACKAGES["mnist1d"][1]) from None

    path = _mnist1d_cache_path(num_samples, seed)
    arrays = _read_mnist1d_cache(path, num_samples)
    if arrays is None:
        args = get_dataset_args()
        args.num_samples, args.seed = int(num_samples), int(seed)
        state = np.random.get_state()  # make_dataset reseeds numpy's global RNG: leave it as found
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(state)
        arrays = (np.asarray(data["x"], dtype=np.float32)[:, None, :], np.asarray(data["y"], np.int64),
                  np.asarray(data["x_test"], dtype=np.float32)[:, None, :], np.asarray(data["y_test"], np.int64))
        _write_mnist1d_cache(path, arrays)
    for array in arrays:
        array.flags.writeable = False
    return arrays
