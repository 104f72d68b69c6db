"""Readers for the dataset files read from ``data.root`` into memory: IDX (MNIST,
Fashion-MNIST) and CIFAR python pickles, and the files each format needs
(:class:`FileLayout`). Each loader returns numpy arrays (train_x, train_y, test_x,
test_y), images uint8 (N, C, H, W). Re-exported by :mod:`kdlab.data.sources`.

Every reader checks a file's structure before using it and raises a one-line
:class:`~kdlab.errors.DataError` naming the file and the problem (never a traceback):
IDX headers and body sizes, gzip streams, CIFAR batch keys, shapes and label types.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


def _one_line(err: BaseException) -> str:
    """``Type: message`` of an exception, whitespace collapsed to one line."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# --- which files each format needs (shared by the loaders and check_data_source) ---


@dataclass(frozen=True)
class FileLayout:
    """The files a dataset folder must hold. ``gz_ok``: each may also be ``name.gz``."""

    what: str  # e.g. "CIFAR-100 python pickles"
    train: tuple[str, ...]
    test: tuple[str, ...]
    gz_ok: bool = False
    folder: str = ""  # the usual folder name, for the examples in messages

    @property
    def files(self) -> tuple[str, ...]:
        return self.train + self.test

    def describe(self) -> str:
        """e.g. ``a folder of the CIFAR-100 python pickles: train, test``."""
        return f"a folder of the {self.what}: {', '.join(self.files)}" + (", each optionally .gz" if self.gz_ok else "")

    def find(self, root: Path, name: str) -> Path | None:
        """The file ``name`` in ``root`` (``name.gz`` too when allowed), or None."""
        for candidate in (name, name + ".gz") if self.gz_ok else (name,):
            if (root / candidate).is_file():
                return root / candidate
        return None


IDX_LAYOUT = FileLayout(
    "IDX files", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), gz_ok=True)
CIFAR_LAYOUTS = {
    10: FileLayout("CIFAR-10 python pickles", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                   folder="cifar-10-batches-py"),
    100: FileLayout("CIFAR-100 python pickles", ("train",), ("test",), folder="cifar-100-python"),
}
CIFAR_LABEL_KEYS = {10: "labels", 100: "fine_labels"}
FILE_LAYOUTS = {"mnist": IDX_LAYOUT, "fashion-mnist": IDX_LAYOUT, "cifar10": CIFAR_LAYOUTS[10],
                "cifar100": CIFAR_LAYOUTS[100]}


def check_dataset_dir(root: str | Path, layout: FileLayout, dataset: str = "") -> Path:
    """``root`` is a directory holding every file of ``layout`` (only their existence is
    checked; nothing is opened). Returns ``root`` as a Path; DataError otherwise."""
    root, prefix = Path(root), f"{dataset}: " if dataset else ""
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"{prefix}data directory {root} {state} (data.root must be {layout.describe()})")
    missing = [name for name in layout.files if layout.find(root, name) is None]
    if missing:
        raise DataError(f"{prefix}missing dataset file(s) in {root}: {', '.join(missing)} "
                        f"(data.root must be {layout.describe()})")
    return root


# --- IDX (MNIST, Fashion-MNIST) ---

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 1 << 24  # bytes read at a time: memory follows what a file holds, not what its header claims
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _open_maybe_gz(path: Path):
    """A binary handle on ``path``, decompressing when it starts with the gzip magic."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_idx_header(path: Path, handle) -> tuple[np.dtype, tuple[int, ...]]:
    """The magic number (0x00 0x00, a known type code, ndim ≥ 1) and ndim dims, all > 0."""
    magic = handle.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: not an IDX file ({len(magic)} bytes, shorter than the 4-byte magic number)")
    if magic[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{magic.hex()})")
    if magic[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{magic[2]:02x}")
    ndim = magic[3]
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    raw_dims = handle.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: IDX header cut short: {ndim} dimensions need {4 * ndim} bytes, "
                        f"only {len(raw_dims)} follow the magic number")
    dims = struct.unpack(f">{ndim}i", raw_dims)
    if min(dims) <= 0:
        raise DataError(f"{path}: IDX header declares shape {dims}; every dimension must be positive")
    return np.dtype(_IDX_DTYPES[magic[2]]), dims


def _read_up_to(handle, size: int) -> bytearray:
    """At most ``size`` bytes, read in chunks, so an absurd ``size`` costs only what is there."""
    data = bytearray()
    while len(data) < size:
        chunk = handle.read(min(_CHUNK, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _count_rest(handle) -> int:
    """Bytes left in ``handle`` (read and dropped in chunks; for gzip this also checks the CRC)."""
    count = 0
    while chunk := handle.read(_CHUNK):
        count += len(chunk)
    return count


def _read_idx_body(path: Path, handle, dtype: np.dtype, dims: tuple[int, ...]) -> bytearray:
    """Exactly prod(dims) values (sizes in Python ints: no overflow); fewer or more is an error."""
    expected = math.prod(dims) * dtype.itemsize
    body = _read_up_to(handle, expected)
    if len(body) < expected:
        raise DataError(f"{path}: IDX header says shape {dims} ({expected:,} bytes of data) "
                        f"but the file holds only {len(body):,} (truncated?)")
    extra = _count_rest(handle)
    if extra:
        raise DataError(f"{path}: IDX header says shape {dims} ({expected:,} bytes of data) "
                        f"but the file holds {expected + extra:,} (trailing data or a wrong header)")
    return body


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (LeCun's MNIST format; gzipped or not): 0x00 0x00, a type code, ndim,
    then ndim big-endian int32 dims, then exactly prod(dims) values. The header is checked
    before the body is read, and the body is read only up to the size the header declares;
    a corrupt or truncated gzip stream is a DataError naming the file, like the rest."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as handle:
            dtype, dims = _read_idx_header(path, handle)
            body = _read_idx_body(path, handle, dtype, dims)
    except _GZIP_ERRORS as err:
        raise DataError(f"{path}: corrupt or truncated gzip file ({_one_line(err)})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({_one_line(err)})") from None
    return np.frombuffer(body, dtype).reshape(dims)


def _check_idx_pair(images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray) -> None:
    """Images: unsigned bytes (N, rows, cols), any size; labels: N integers."""
    if images.ndim != 3:
        raise DataError(f"{images_path}: images must have 3 dimensions (N, rows, cols), found shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{images_path}: images must be unsigned bytes (IDX type 0x08), found {images.dtype.name}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels must have 1 dimension (N,), found shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: labels must be integers, found {labels.dtype.name}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images):,} images but {labels_path} "
                        f"holds {len(labels):,} labels")


def load_idx_arrays(root: str | Path):
    """MNIST / Fashion-MNIST: the four IDX files of IDX_LAYOUT in ``root`` (each optionally
    .gz). Images are unsigned bytes (N, rows, cols) of any size (28×28 for both datasets),
    returned as (N, 1, rows, cols); labels N integers. Every file is checked (read_idx,
    _check_idx_pair) and all must exist before any is read."""
    root = check_dataset_dir(root, IDX_LAYOUT)
    arrays = []
    for images_name, labels_name in (IDX_LAYOUT.train, IDX_LAYOUT.test):
        images_path, labels_path = IDX_LAYOUT.find(root, images_name), IDX_LAYOUT.find(root, labels_name)
        images, labels = read_idx(images_path), read_idx(labels_path)
        _check_idx_pair(images_path, images, labels_path, labels)
        arrays += [images.astype(np.uint8, copy=False)[:, None], labels.astype(np.int64)]
    return tuple(arrays)


# --- CIFAR python pickles ---


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold: dicts, lists, bytes, numbers and numpy
    arrays. Anything else (e.g. ``os.system``) is refused, never imported."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        ("__builtin__", "bytes"), ("builtins", "bytes"),  # protocol 2 writes b"" as bytes()
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: not part of a CIFAR batch")


def read_cifar_batch(path: Path) -> dict:
    """One pickled CIFAR batch: a dict (bytes keys decoded to str). Truncated files,
    non-pickles and pickles of anything but plain data are DataErrors naming the file."""
    try:
        with open(path, "rb") as handle:
            batch = _RestrictedUnpickler(handle, encoding="bytes").load()
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    except Exception as err:  # truncated or not a pickle
        raise DataError(f"{path}: not a readable CIFAR batch ({_one_line(err)})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: a CIFAR batch must be a dict, got {type(batch).__name__}")
    return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _as_array(path: Path, key: str, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as err:  # e.g. ragged lists
        raise DataError(f"{path}: '{key}' is not an array ({_one_line(err)})") from None


def _cifar_images(path: Path, value) -> np.ndarray:
    """'data': (N, 3072) integers in 0..255 (one 3×32×32 image per row) -> uint8 (N, 3, 32, 32)."""
    data = _as_array(path, "data", value)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' has shape {data.shape} ({data.size:,} values); a CIFAR batch "
                        f"holds one row of 3072 = 3×32×32 bytes per image")
    if data.dtype.kind not in "iu":
        raise DataError(f"{path}: 'data' must hold bytes 0..255, found {data.dtype.name}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: 'data' must hold bytes 0..255, found {data.min()}..{data.max()}")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)


def _cifar_labels(path: Path, key: str, value, count: int, num_classes: int) -> np.ndarray:
    """``key``: ``count`` integers in 0..num_classes-1 -> int64 (N,)."""
    labels = _as_array(path, key, value)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):  # [] reads as float64
        raise DataError(f"{path}: '{key}' must be a list of integers, found {labels.dtype.name} "
                        f"of shape {labels.shape}")
    if len(labels) != count:
        raise DataError(f"{path}: '{key}' holds {len(labels):,} labels for {count:,} images")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{path}: '{key}' outside 0..{num_classes - 1} (found {bad[0]})")
    return labels.astype(np.int64)


def _read_cifar_file(path: Path, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: its keys 'data' and ``key``, checked by _cifar_images/_cifar_labels."""
    batch = read_cifar_batch(path)
    missing = [name for name in ("data", key) if name not in batch]
    if missing:
        raise DataError(f"{path}: CIFAR batch without {' and '.join(repr(m) for m in missing)}")
    images = _cifar_images(path, batch["data"])
    return images, _cifar_labels(path, key, batch[key], len(images), num_classes)


def load_cifar_arrays(root: str | Path, num_classes: int):
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python pickles
    from ``root`` (the ``cifar-10-batches-py`` / ``cifar-100-python`` folder). All files
    must exist before any is read; each is checked by _read_cifar_file."""
    layout, key = CIFAR_LAYOUTS[num_classes], CIFAR_LABEL_KEYS[num_classes]
    root = check_dataset_dir(root, layout)

    def read(names):
        pairs = [_read_cifar_file(root / name, key, num_classes) for name in names]
        return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])

    train_x, train_y = read(layout.train)
    test_x, test_y = read(layout.test)
    return train_x, train_y, test_x, test_y
