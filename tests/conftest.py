"""Shared fixtures: tiny files in the real dataset formats.

The suite runs on the CPU wherever it runs (CUDA hidden before torch starts): its
exactness checks (bit-identical resume, cache = online) assume deterministic kernels.
GPU speed is measured by ``benchmarks/train_speed.py --device cuda``.
"""

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    data = header + body
    path.write_bytes(gzip.compress(data) if compress else data)


def write_idx_dataset(root: Path, n_train=40, n_test=20, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), compress)
    return root


def write_cifar(root: Path, num_classes: int, n_per_file=12, seed=0):
    """CIFAR python-pickle batches as the originals: dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if num_classes == 10:
        files, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        files, key = ["train", "test"], b"fine_labels"
    for name in files:
        batch = {b"data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
                 key: [int(v) for v in rng.integers(0, num_classes, n_per_file)], b"batch_label": b"x"}
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return root


@pytest.fixture
def cifar10_dir(tmp_path):
    return write_cifar(tmp_path / "cifar-10-batches-py", 10)


@pytest.fixture
def cifar100_dir(tmp_path):
    return write_cifar(tmp_path / "cifar-100-python", 100, n_per_file=60)


def write_cifar_batch(path: Path, data, labels, key: bytes = b"fine_labels") -> None:
    """One CIFAR python-pickle batch with the given 'data' and labels (any values: for
    malformed-file tests)."""
    with open(path, "wb") as handle:
        pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, handle, protocol=2)


def config_with(base: dict, **extra):
    """A validated Config: ``base`` with ``extra`` keys on top (a dict value updates that
    section, anything else replaces the key) — the tests' way to vary a run."""
    from kdlab.config import build_config

    data = dict(base)
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(data)


def write_image_folder(root: Path, train_per_class: int = 12, val_per_class: int = 4, classes: int = 4,
                       size: int = 24, seed: int = 0) -> Path:
    """ImageNet's layout (root/train/<class>/*, root/val/<class>/*) of real images:
    scikit-learn's 8×8 digits, upscaled and saved by Pillow, half PNG and half JPEG, in
    sizes and aspect ratios that vary from image to image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            picks = rng.choice(np.flatnonzero(bunch.target == label), per_class, replace=False)
            for k, i in enumerate(picks):
                width, height = size + int(rng.integers(0, size // 2)), size + int(rng.integers(0, size // 3))
                image = Image.fromarray(images[i]).resize((width, height), Image.BILINEAR).convert("RGB")
                suffix = ".png" if k % 2 == 0 else ".jpg"
                image.save(folder / f"{split}_{i:04d}{suffix}")
    return root


# --- processes (from /proc), for the kill tests ------------------------------------------

def _process_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of ``pid``, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def process_descendants(pid: int) -> dict[int, tuple[str, str]]:
    """pid -> (start time, command line) of every live descendant of ``pid``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _process_stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                parents[int(entry.name)] = stat
    found, frontier = {}, [pid]
    while frontier:
        current = frontier.pop()
        for child, (_, parent, start) in parents.items():
            if parent == current and child not in found:
                try:
                    command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    command = ""
                found[child] = (start, command)
                frontier.append(child)
    return found


def process_alive(pid: int, start: str) -> bool:
    """``pid`` is alive and is still the process that started at ``start`` (not a reuse)."""
    stat = _process_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start
