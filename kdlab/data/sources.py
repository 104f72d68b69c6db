"""Readers for the dataset formats kdlab knows. Each returns numpy arrays
(train_x, train_y, test_x, test_y); images are uint8 (N, C, H, W), signals float32."""

from __future__ import annotations

import functools
import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_digits_arrays(test_size: int = 297, seed: int = 0):
    """scikit-learn's bundled 8×8 digits (1797 images, 0..16 scaled to uint8 0..255).
    There is no official test split: a seeded ``test_size`` images are held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'kdlab[demo]'") from None

    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:test_size], order[test_size:]
    return images[train], labels[train], images[test], labels[test]


@functools.lru_cache(maxsize=4)
def load_mnist1d_arrays(num_samples: int = 5000, seed: int = 42):
    """MNIST-1D (Greydanus 2020) generated locally by the ``mnist1d`` package (never its
    download path). Its own 80/20 train/test split; signals (N, 1, 40) float32.
    Generation takes ~1 s per 1,000 examples, so results are cached in the process
    (read-only arrays: callers copy what they change)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("MNIST-1D needs the mnist1d package: pip install 'kdlab[demo]'") from None

    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG: leave it as found
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = (np.asarray(data["x"], dtype=np.float32)[:, None, :], np.asarray(data["y"], np.int64),
              np.asarray(data["x_test"], dtype=np.float32)[:, None, :], np.asarray(data["y_test"], np.int64))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (LeCun's MNIST format; gzipped or not): magic 0x0000 + dtype + ndim,
    big-endian int32 dims, then the data."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4)
    body = np.frombuffer(data, dtypes[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {tuple(dims)} but holds {body.size} values (truncated?)")
    return body.reshape(tuple(int(d) for d in dims))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing dataset file {root / stem}[.gz]")


def load_idx_arrays(root: str | Path):
    """MNIST / Fashion-MNIST IDX files in ``root``: train-images-idx3-ubyte[.gz], ..."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    arrays = []
    for split in ("train", "t10k"):
        images = read_idx(_find(root, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
        arrays += [images.astype(np.uint8)[:, None], labels.astype(np.int64)]
    return tuple(arrays)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold: dicts, lists, bytes, numbers and numpy
    arrays. Anything else (e.g. ``os.system``) is refused, never imported."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: not part of a CIFAR batch")


def read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _RestrictedUnpickler(handle, encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # truncated or not a pickle
        raise DataError(f"{path}: not a readable CIFAR batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: a CIFAR batch must be a dict, got {type(batch).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar_arrays(root: str | Path, num_classes: int):
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python pickles
    from ``root`` (the ``cifar-10-batches-py`` / ``cifar-100-python`` folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    if num_classes == 10:
        train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    else:
        train_files, test_files, key = ["train"], ["test"], "fine_labels"

    def read(files):
        xs, ys = [], []
        for name in files:
            path = root / name
            if not path.is_file():
                raise DataError(f"missing dataset file {path}")
            batch = read_cifar_batch(path)
            if "data" not in batch or key not in batch:
                raise DataError(f"{path}: CIFAR batch without 'data' and '{key}'")
            data = np.asarray(batch["data"], dtype=np.uint8)
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = read(train_files)
    test_x, test_y = read(test_files)
    return train_x, train_y, test_x, test_y
